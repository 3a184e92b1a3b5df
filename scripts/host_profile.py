"""Probe: host (CPU) time of our conv op per call, and where it goes (GPU machine).

    python scripts/host_profile.py [--config layer0] [--dtype float32]

Issues 200 forward+backward calls without synchronising (the GPU queue absorbs them), reports host
microseconds per call for fwd and fwd_bwd (receiver order forgotten before each call, as bench_conv does),
in 3 rounds (the host's speed drifts); then prints cProfile's top entries for fwd_bwd. ``--micro`` first times
the building blocks (an identity autograd.Function forward + backward, one CuPy launch of a tiny kernel, a small
torch.zeros, the unordered receiver grouping), so runs on different hosts can be compared.
(host_profile_launch_ab_h100.txt came from a version that also timed a raw cuLaunchKernel path, removed.)
"""
import argparse
import cProfile
import importlib
import os
import pstats
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402

import mace_accel  # noqa: E402
from mace_accel.backends import cuda as B  # noqa: E402
from tp_cases import mace_conv_args  # noqa: E402


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g


def host_us(fn, calls=300, sync=None):
    """Host microseconds per call of ``fn`` over ``calls`` calls, after 20 warm-up calls (compile, caches);
    ``sync`` (default torch.cuda.synchronize) runs before and after the timed calls."""
    sync = sync or torch.cuda.synchronize
    for _ in range(20):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) / calls * 1e6
    sync()
    return us


def micro(dev, receiver, num_rows):
    t = torch.randn(64, device=dev, requires_grad=True)
    keys = receiver.long().contiguous()
    counters = torch.zeros(2 * num_rows + 2, dtype=torch.int32, device=dev)
    fn = B._csr_function("count", B.device_index(dev))
    seg = torch.empty(num_rows + 1, dtype=torch.int64, device=dev)
    items = {
        "autograd.Function fwd+grad": lambda: torch.autograd.grad(_Identity.apply(t), (t,), t),
        "torch.zeros(4k int32)": lambda: torch.zeros(2 * num_rows + 2, dtype=torch.int32, device=dev),
        "torch.empty(4k int64)": lambda: torch.empty(num_rows + 1, dtype=torch.int64, device=dev),
        "CuPy launch (1 block)": lambda: B.run_on_torch_stream(fn, dev, 1, B.CSR_THREADS, (
            B._ptr(keys), B._ptr(counters), B._ptr(seg), 0, num_rows)),
        "csr_unordered": lambda: B.csr_unordered(keys, num_rows),
    }
    for name, f in items.items():
        print(f"micro {name}: host {min(host_us(f) for _ in range(3)):.1f} us per call", flush=True)


def conv_case(config: str, dname: str, edges: int = 0, pkg=None, device: str = "cuda"):
    """Our conv for a MACE-MP-0 layer config and its inputs, as a namespace (conv, backend, x, y, w requiring
    grad, g, s, r, n): on the benchmark's Cu graph (its first ``edges`` edges when given), or with
    ``device="cpu"`` on a small random graph (for launch-stubbed runs). ``pkg``: the mace_accel package to use
    (default this tree's; scripts/host_ab.py passes a base revision's copy)."""
    pkg = pkg or mace_accel
    dev = torch.device(device)
    if dev.type == "cuda":
        s, r, n, e = C.cu_graph_on(dev, announce=False)
        if edges:
            e = min(edges, e)
            s, r = s[:e].contiguous(), r[:e].contiguous()
    else:
        n, e = 64, 512
        s, r = torch.randint(0, n, (e,)), torch.randint(0, n, (e,))
    dtype = getattr(torch, dname)
    node, sh, mid, ins = mace_conv_args(config)
    with C.default_dtype(dtype):
        conv = pkg.TensorProductConv(node, sh, mid, ins, check_inputs=False).to(dev)
    return SimpleNamespace(
        conv=conv, backend=importlib.import_module(f"{pkg.__name__}.backends.cuda"), s=s, r=r, n=n,
        x=torch.randn(n, node.dim, device=dev, dtype=dtype, requires_grad=True),
        y=torch.randn(e, sh.dim, device=dev, dtype=dtype, requires_grad=True),
        w=torch.randn(e, conv.weight_numel, device=dev, dtype=dtype, requires_grad=True),
        g=torch.randn(n, mid.dim, device=dev, dtype=dtype))


def conv_call_parser(calls: int) -> argparse.ArgumentParser:
    """The arguments of the probes that time :func:`conv_calls`: --config, --dtype, --edges (first edges of the
    benchmark graph) and --calls (per round; default ``calls``)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="layer0")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--edges", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=calls)
    return ap


def conv_calls(config: str, dname: str, edges: int = 0, pkg=None, device: str = "cuda"):
    """(fwd, fwd_bwd, receiver, num_nodes) of :func:`conv_case`'s conv, as bench_conv calls it: the receiver
    grouping is forgotten before each call; fwd_bwd = torch.autograd.grad of the output w.r.t. x, y, w."""
    c = conv_case(config, dname, edges, pkg, device)

    def fwd():
        c.backend._CSR_CACHE.clear()
        return c.conv(c.x, c.y, c.w, c.s, c.r, c.n)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), (c.x, c.y, c.w), c.g)

    return fwd, fwd_bwd, c.r, c.n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="layer0")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--no-cprofile", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda")
    fwd, fwd_bwd, r, n = conv_calls(a.config, a.dtype)

    if a.micro:
        micro(dev, r, n)
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
    if a.no_cprofile:
        return
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
