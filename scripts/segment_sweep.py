"""Sweep: should the atomic backward and the fused double backward (without d/dgout) walk one receiver's
whole CSR segment per work item instead of 32-edge runs? (GPU machine)

    python scripts/segment_sweep.py [--configs medium1 large1] [--dtypes float32 float64]

A segment item loads each gout row once per (receiver, chunk) instead of once per run that touches the
receiver (~3.4 times on the benchmark graph), and needs no flush at run ends; it trades the runs' even split
of the edges for one item per receiver. For each config, dtype and kind on the benchmark's Cu graph, times
the kernel launch alone (receiver grouping computed once; CUDA events, median of 20 after 3 warm-ups) with
the backend's spec (runs) and the same spec with ``segmented=True``, and compares the results.
"""
import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(__file__))
import part_sweep as P  # noqa: E402
import torch  # noqa: E402

from mace_accel.backends.cuda import codegen  # noqa: E402
from tp_cases import launch_edge_kernel  # noqa: E402


def launcher(plan, spec, inputs, s, r):
    """A closure that launches ``spec`` once on fresh outputs (tests/tp_cases.launch_edge_kernel)."""
    x, y, w, g, ggx, ggy, ggw = inputs
    extra = dict(ggx=ggx, ggy=ggy, ggw=ggw) if spec.kind == codegen.KIND_DOUBLE else {}
    return lambda: launch_edge_kernel(plan, spec, x, y, w, g, s, r, **extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["medium1", "large1"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--kinds", nargs="*", default=["bwd", "double_nogg"])
    a = ap.parse_args()
    dev = torch.device("cuda")
    s, r, n, e = P.C.cu_graph_on(dev)
    plans = P.mp0_plans(a.configs)
    jobs = []
    for cfg in a.configs:
        for dt in a.dtypes:
            for k in a.kinds:
                spec = P.call_spec(plans[cfg], k, dt)
                jobs += [(plans[cfg], spec), (plans[cfg], replace(spec, segmented=True))]
    P.precompile(jobs)
    P.C.gpu_warmup(dev)
    for cfg in a.configs:
        plan = plans[cfg]
        for dt in a.dtypes:
            inputs = P.sweep_inputs(plan, getattr(torch, dt), n, e, dev)
            for k in a.kinds:
                base = P.call_spec(plan, k, dt)
                ref = None
                for spec in (base, replace(base, segmented=True)):
                    run = launcher(plan, spec, inputs, s, r)
                    res = run()
                    diff = 0.0 if ref is None else P.maxrel(res, ref)
                    ref = res if ref is None else ref
                    t = P.C.time_fn(run, dev, 3, 20)["median_ms"]
                    print(f"{cfg:8s} {dt} {k:11s} {'segments' if spec.segmented else 'runs':8s} {t:8.3f} ms  "
                          f"maxrel vs runs {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
