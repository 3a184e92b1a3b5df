"""Sweep: the backward kernel with gout held in registers for a run vs read from L1 where used (GPU machine).

    python scripts/reload_sweep.py [--configs layer0 medium1 large1] [--dtypes float32 float64]

For each MACE-MP-0 layer config and dtype on the benchmark's Cu graph, times the atomic backward call alone
(dx, dy, dw; receiver order memoised; CUDA events, median of 20 after 3 warm-ups) with
``codegen.RELOAD_GOUT[(KIND_BACKWARD, dtype)]`` off and on, and compares the results (atomics' order only).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import part_sweep as P  # noqa: E402
import torch  # noqa: E402

from mace_accel.backends.cuda import codegen  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["layer0", "medium1", "large1"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    a = ap.parse_args()
    a.kinds = ["bwd"]
    dev = torch.device("cuda")
    s, r, n, e = P.C.cu_graph_on(dev)
    plans = P.mp0_plans(a.configs)
    P.C.gpu_warmup(dev)
    default = dict(codegen.RELOAD_GOUT)

    def apply(kind, dname, on):
        codegen.RELOAD_GOUT[(kind, dname)] = on

    def describe(plan, kind, dname, on):
        return f"reload_gout {int(on)}"

    def reset(kind, dname):
        codegen.RELOAD_GOUT.clear()
        codegen.RELOAD_GOUT.update(default)

    P.run_sweep(a, plans, (s, r, n, e), dev, [False, True], apply, describe, reset)


if __name__ == "__main__":
    main()
