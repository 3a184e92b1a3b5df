"""Probe: where does our conv's time go? Per-kernel GPU time of each bench_conv cell (GPU machine).

    python scripts/conv_breakdown.py [--configs layer0 medium large] [--dtypes float32 float64]

For each layer config, dtype and mode (fwd, fwd_bwd, double) on the benchmark's Cu graph, runs our
TensorProductConv the way bench_conv times it (receiver order forgotten before every call, so the sort is
paid) under torch.profiler and prints the GPU time per kernel name, summed over the profiled calls and divided
by their number. Also prints the CUDA-event median of the same call, to compare with the sum of kernels
(the difference is GPU idle time: host launch overhead). The double mode is bench_conv's (gout constant, so the
fused double backward without d/dgout) unless ``--gout-grad``.
"""
import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402

import mace_accel  # noqa: E402
from mace_accel.backends import cuda as cuda_backend  # noqa: E402
from tp_cases import mace_conv_args  # noqa: E402

REPS = 10


def make_call(conv, s, r, n, mode, x, y, w, g):
    def fwd():
        cuda_backend._CSR_CACHE.clear()
        return conv(x, y, w, s, r, n)

    if mode == "fwd":
        return lambda: fwd()
    if mode == "fwd_bwd":
        def fb():
            out = fwd()
            return torch.autograd.grad(out, (x, y, w), g)
        return fb

    def dbl():  # bench_conv's double when g needs no gradient (the no-gg kernel), else also d/dg
        out = fwd()
        gx, gy, gw = torch.autograd.grad(out, (x, y, w), g, create_graph=True)
        return torch.autograd.grad((gx * x.detach()).sum() + (gy * y.detach()).sum() + (gw * w.detach()).sum(),
                                   (x, y, w, g) if g.requires_grad else (x, y, w))
    return dbl


def profile(fn, dev):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    with tprof(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPS):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:70]] += ev.device_time / REPS / 1000.0  # ms
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["layer0", "medium1", "large1"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd_bwd", "double"])
    ap.add_argument("--gout-grad", action="store_true",
                    help="double: also the gradient w.r.t. gout (the fused kernel with d/dgout; bench_conv's "
                         "double does not ask for it)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    s, r, n, e = C.cu_graph_on(dev)
    for cfg in a.configs:
        node, sh, mid, ins = mace_conv_args(cfg)
        for dname in a.dtypes:
            dtype = getattr(torch, dname)
            with C.default_dtype(dtype):
                conv = mace_accel.TensorProductConv(node, sh, mid, ins, check_inputs=False).to(dev)
            x = torch.randn(n, node.dim, device=dev, dtype=dtype, requires_grad=True)
            y = torch.randn(e, sh.dim, device=dev, dtype=dtype, requires_grad=True)
            w = torch.randn(e, conv.weight_numel, device=dev, dtype=dtype, requires_grad=True)
            g = torch.randn(n, mid.dim, device=dev, dtype=dtype, requires_grad=a.gout_grad)
            for mode in a.modes:
                fn = make_call(conv, s, r, n, mode, x, y, w, g)
                t = C.time_fn(fn, dev, 5, 20)["median_ms"]
                per = profile(fn, dev)
                tot = sum(per.values())
                print(f"\n{cfg} {dname} {mode}: event median {t:.3f} ms, sum of kernels {tot:.3f} ms", flush=True)
                for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
                    if v > 0.002:
                        print(f"   {v:7.3f}  {k}")


if __name__ == "__main__":
    main()
