"""Probe: the GPU kernels of one bench_conv cell, per implementation (GPU machine).

    python scripts/profile_mode.py [--config L1m] [--dtype float32] [--mode double] [--impls ours,cueq] [--calls 5]

Runs the cell's calls (bench_conv's make_impl / run_mode on its Cu graph) under torch.profiler and prints, per
implementation, every GPU kernel (and memset / copy) with its count and GPU time per call, largest first: where
a mode's time goes beyond the implementation's own kernels (the loss glue of ``double``, fills, reductions).
"""
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_conv as BC  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main():
    a = BC.cell_parser("L1m", "double", "ours,cueq", 5).parse_args()
    dev = torch.device("cuda")
    args, graph, cfg, dtype, data, _ = BC.cell_inputs(a.config, a.dtype, dev, a.impls.split(","))
    print(f"{torch.cuda.get_device_name()}: {a.config} {a.dtype} {a.mode}, {len(graph['sender'])} edges, "
          f"{a.calls} calls; GPU us per call")
    for impl in a.impls.split(","):
        b = BC.make_impl(impl, cfg, dtype, dev, args)(data)
        for _ in range(3):
            BC.run_mode(b, a.mode)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.calls):
                BC.run_mode(b, a.mode)
            torch.cuda.synchronize()
        per = defaultdict(lambda: [0, 0.0])
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per[ev.name][0] += 1
                per[ev.name][1] += ev.time_range.elapsed_us()
        total = sum(t for _, t in per.values()) / a.calls
        print(f"== {impl}: {total:.0f} us of GPU work per call")
        for name, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1]):
            print(f"  {t / a.calls:9.1f} us  x{n / a.calls:4.1f}  {name[:110]}")
        del b
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
