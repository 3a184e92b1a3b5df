"""Probe (GPU machine): does a host-bound call read its host time per call under bench_conv's timing, and does
pinning the process's threads to a few cores change that time?

    python scripts/host_affinity.py [--config layer0] [--dtype float32] [--rounds 8] [--cores 2,3]

Times ours' ``torch.autograd.grad(conv(...), (x, y, w), g)`` on the benchmark's Cu graph (receiver grouping
forgotten per call, as bench_conv does) in alternating rounds: all cores allowed, then every thread of the
process (the autograd engine's device threads included) pinned to ``--cores``. Each round reports the median
of bench_conv's CUDA-event pairs (20 reps, no synchronisation between calls: ``_common.time_fn``) next to the
host microseconds per call over the same number of back-to-back calls.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402
from host_profile import conv_calls, host_us  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="layer0")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--cores", default="2,3")
    a = ap.parse_args()
    cores = {int(c) for c in a.cores.split(",")}
    _, fwd_bwd, _, _ = conv_calls(a.config, a.dtype)
    dev = torch.device("cuda")
    C.gpu_warmup(dev)
    for _ in range(20):
        fwd_bwd()
    torch.cuda.synchronize()
    settings = (("all cores", None), (f"pinned to {sorted(cores)}", cores))
    got = {name: ([], []) for name, _ in settings}
    print(f"{torch.cuda.get_device_name()}; {a.config} {a.dtype} fwd_bwd, full Cu graph; {os.cpu_count()} cores")
    for rnd in range(a.rounds):
        for name, pin in settings:
            C.pin_threads(pin)
            ev = C.time_fn(fwd_bwd, dev, warmup=3, reps=20)["median_ms"] * 1e3
            host = host_us(fwd_bwd, 20)
            got[name][0].append(ev)
            got[name][1].append(host)
            print(f"  round {rnd}: {name:16s} event median {ev:7.1f} us, host {host:7.1f} us per call", flush=True)
    C.pin_threads(None)
    for name, (ev, host) in got.items():
        print(f"  {name:16s} event median over rounds {statistics.median(ev):7.1f} us, host "
              f"{statistics.median(host):7.1f} us per call")


if __name__ == "__main__":
    main()
