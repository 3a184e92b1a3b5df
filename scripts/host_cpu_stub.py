"""Probe (CPU only): the host work of one conv call through the CUDA backend's Python path, launches stubbed.

    python scripts/host_cpu_stub.py [--config layer0] [--profile]

The CUDA backend's launch, compile and device functions are replaced by no-ops and CPU tensors are routed to it,
so everything the host does for an eager call (module, autograd.Function, ops layer, receiver grouping
bookkeeping, buffer allocation, argument packing) runs without a GPU, and can be timed and profiled on any
machine. Prints the best-of-5 microseconds per call of the whole fwd+bwd and of its pieces; ``--profile``
adds cProfile's top entries for fwd+bwd. (This is how the per-leaf exception in ops.engine_needs was found.)
The absolute numbers are this CPU's, not the GPU host's; the GPU-side view is scripts/host_profile.py.
"""
import argparse
import cProfile
import importlib
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # e3nn 0.4.4 on torch >= 2.6
import torch  # noqa: E402
from host_profile import conv_case  # noqa: E402

import mace_accel  # noqa: E402
from mace_accel.plan import get_plan  # noqa: E402

#: What stub_backend replaces in a package's CUDA backend (names a package lacks are skipped: scripts/host_ab.py
#: stubs older revisions too, whose launches all went through run_on_torch_stream).
_STUBS = (("run_on_torch_stream", lambda fn, device, blocks, threads, args: None),
          ("_launch_on", lambda fn, index, blocks, threads, args: None),  # every kernel launch goes through it
          ("target_is_sm90", lambda index: True),
          ("device_index", lambda d: 0), ("_raw_stream", lambda index: 0),
          ("_function", lambda plan, spec, idx: None), ("_csr_function", lambda suffix, idx: None))


def stub_backend(pkg=None):
    """Make ``pkg``'s (default this tree's mace_accel) CUDA backend launch, compile and query devices as no-ops,
    and route CPU tensors to it."""
    pkg = pkg or mace_accel
    B = importlib.import_module(f"{pkg.__name__}.backends.cuda")
    for name, fn in _STUBS:
        if hasattr(B, name):
            setattr(B, name, fn)
    importlib.import_module(f"{pkg.__name__}.ops")._BACKENDS[(False, "")] = B  # CPU tensors -> CUDA host path
    torch.cuda.is_current_stream_capturing = lambda: False


def best_us(fn, calls=2000):
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="layer0")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    stub_backend()
    c = conv_case(a.config, "float32", device="cpu")
    B, conv, x, y, w, g, s, r, n = c.backend, c.conv, c.x, c.y, c.w, c.g, c.s, c.r, c.n
    plan = get_plan(conv.plan.key)
    xd, yd, wd = x.detach(), y.detach(), w.detach()

    def fwd_bwd():
        B._CSR_CACHE.clear()  # as bench_conv: the receiver grouping is rebuilt in every call
        return torch.autograd.grad(conv(x, y, w, s, r, n), (x, y, w), g)

    pieces = {
        "fwd+bwd (module, autograd.grad)": fwd_bwd,
        "module forward, grad enabled": lambda: (B._CSR_CACHE.clear(), conv(x, y, w, s, r, n)),
        "backend forward, grouping rebuilt": lambda: (B._CSR_CACHE.clear(), B.forward(plan, xd, yd, wd, s, r, n)),
        "backend forward, grouping memoised": lambda: B.forward(plan, xd, yd, wd, s, r, n),
        "csr_unordered": lambda: B.csr_unordered(r, n),
        "backend backward (dx, dy, dw)": lambda: B.backward(plan, xd, yd, wd, g, s, r, True, True, True),
    }
    for name, fn in pieces.items():
        print(f"{name:38s} {best_us(fn):7.1f} us per call", flush=True)
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            fwd_bwd()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
