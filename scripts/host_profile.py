"""Probe: host (CPU) time of our conv op per call, and where it goes (GPU machine).

    python scripts/host_profile.py [--config layer0] [--dtype float32]

Issues 200 forward+backward calls without synchronising (the GPU queue absorbs them), reports host
microseconds per call for fwd and fwd_bwd (receiver order forgotten before each call, as bench_conv does),
in 3 rounds (the host's speed drifts); then prints cProfile's top entries for fwd_bwd.
(host_profile_launch_ab_h100.txt came from a version that also timed a raw cuLaunchKernel path, removed.)
"""
import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402

import mace_accel  # noqa: E402
from mace_accel.backends import cuda as B  # noqa: E402
from tp_cases import mace_conv_args  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="layer0")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    dev = torch.device("cuda")
    s, r, n, e = C.cu_graph_on(dev, announce=False)
    dtype = getattr(torch, a.dtype)
    node, sh, mid, ins = mace_conv_args(a.config)
    with C.default_dtype(dtype):
        conv = mace_accel.TensorProductConv(node, sh, mid, ins, check_inputs=False).to(dev)
    x = torch.randn(n, node.dim, device=dev, dtype=dtype, requires_grad=True)
    y = torch.randn(e, sh.dim, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(e, conv.weight_numel, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(n, mid.dim, device=dev, dtype=dtype)

    def fwd():
        B._CSR_CACHE.clear()
        return conv(x, y, w, s, r, n)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), (x, y, w), g)

    for rnd in range(3):  # the host's speed drifts: three rounds
        for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            host = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
            gpu = C.time_fn(fn, dev, 3, 50)["median_ms"] * 1e3
            print(f"round {rnd} {a.config} {a.dtype} {name}: host {host:.0f} us per call, CUDA-event median "
                  f"{gpu:.0f} us", flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        fwd_bwd()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)
    pstats.Stats(pr).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
