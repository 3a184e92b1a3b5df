"""Probe: does bench_conv's timer add host time to a host-bound cell? (GPU machine)

    python scripts/event_overhead_check.py

bench_conv's time_fn records a fresh pair of CUDA events around each call, and torch creates a CUDA event on its
first record, so each timed call of a host-bound cell also pays two event creations. Prints the host cost of
recording a fresh pair against re-recording an existing pair, then the layer-0 float32 fwd+bwd cell timed by
time_fn and by the same loop with its events created (recorded once and synchronised) before the timed calls,
in 15 alternating rounds on the benchmark graph.
"""
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402
from host_profile import conv_calls  # noqa: E402


def _per_pair_us(f, calls=2000):
    for _ in range(50):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return us


def time_precreated(fn, reps=20, warmup=6):
    """time_fn's loop with its events created before the timed calls; median span in us."""
    for _ in range(warmup):
        fn()
        torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        e.record()
    torch.cuda.synchronize()
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def main():
    dev = torch.device("cuda")
    torch.zeros(1, device=dev)
    pre = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def fresh_pair():
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        b.record()

    def re_pair():
        pre[0].record()
        pre[1].record()

    for name, f in (("fresh pair record", fresh_pair), ("re-record pair", re_pair)) * 3:
        print(f"{name:20s} {_per_pair_us(f):7.2f} us per pair")
    _, fwd_bwd, _, _ = conv_calls("layer0", "float32", 0)
    a, b = [], []
    for rnd in range(15):
        a.append(C.time_fn(fwd_bwd, dev, warmup=6, reps=20)["median_ms"] * 1e3)
        b.append(time_precreated(fwd_bwd))
        print(f"round {rnd:2d}: time_fn {a[-1]:7.1f}  pre-created events {b[-1]:7.1f}", flush=True)
    print(f"median time_fn {statistics.median(a):.1f} us, pre-created {statistics.median(b):.1f} us")


if __name__ == "__main__":
    main()
