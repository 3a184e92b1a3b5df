"""Sweep: how many edges ahead should each conv kernel prefetch its weight rows into L2? (GPU machine)

    python scripts/prefetch_sweep.py [--distances 0 1 2 4 8] [--configs layer0 medium1 large1]

For each MACE-MP-0 layer config, dtype and kernel kind (forward, atomic backward, fused double backward;
also double_nogg: without d/dgout) on the benchmark's Cu graph, sets ``codegen.PREFETCH_EDGES`` for that
(kind, dtype) and times the kernel call alone (receiver order memoised; CUDA events, median of 20 after 3
warm-ups). Each result is compared with the distance-0 result: the prefetch is a hint and must not change any
value (forward: bitwise; the atomic kernels: rounding of the atomics' order only). Prints one line per (cell,
distance). STREAM_WEIGHTS off / on, once this script's ``--stream``: ``scripts/layout_sweep.py --tables
stream_w``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402
from part_sweep import KINDS, mp0_plans, restoring, run_sweep, set_switch  # noqa: E402

from mace_accel.backends.cuda import codegen  # noqa: E402



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--distances", nargs="*", type=int, default=[0, 1, 2, 4, 8])
    ap.add_argument("--configs", nargs="*", default=["layer0", "medium1", "large1"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--kinds", nargs="*", default=list(KINDS))
    a = ap.parse_args()
    dev = torch.device("cuda")
    s, r, n, e = C.cu_graph_on(dev)
    plans = mp0_plans(a.configs)
    run_sweep(a, plans, (s, r, n, e), dev, a.distances,
              lambda kind, dname, d: set_switch(codegen.PREFETCH_EDGES, kind, dname, d),
              lambda plan, kname, dname, d: f"prefetch {d:2d}", restoring(codegen.PREFETCH_EDGES))


if __name__ == "__main__":
    main()
