"""Sweep: how the float32 sender (dx) atomics are issued (GPU machine).

    python scripts/dx_atomic_sweep.py [--configs medium1 large1]

For each MACE-MP-0 layer config on the benchmark's Cu graph (float32), times the atomic backward (dx, dy, dw)
and the fused double backward with and without d/dgout alone (receiver order memoised; CUDA events, median of
20 after 3 warm-ups) with the dx atomics issued per lane (``COALESCED_DX_ATOMICS`` off) and staged through
shared memory so that consecutive lanes add consecutive elements (staged), and staged with 4 elements per
atomic (``VECTOR_DX_ATOMICS``, staged-v4). Each result is compared with the first
setting's (max relative difference: atomics' order only). (dx_atomic_sweep_h100.txt came from a version with
its own loop and a slightly different line format.)
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
    ap.add_argument("--configs", nargs="*", default=["medium1", "large1"])
    a = ap.parse_args()
    a.dtypes, a.kinds = ["float32"], ["bwd", "double", "double_nogg"]
    dev = torch.device("cuda")
    graph = P.C.cu_graph_on(dev)
    plans = P.mp0_plans(a.configs)
    reset = P.restoring(codegen.COALESCED_DX_ATOMICS, codegen.VECTOR_DX_ATOMICS)

    def apply(kind, dname, setting):
        codegen.COALESCED_DX_ATOMICS[dname] = setting != "per-lane"
        codegen.VECTOR_DX_ATOMICS[(kind, dname)] = setting == "staged-v4"

    def describe(plan, kname, dname, setting):
        return f"dx atomics {setting:9s}"

    P.run_sweep(a, plans, graph, dev, ["per-lane", "staged", "staged-v4"], apply, describe, reset)


if __name__ == "__main__":
    main()
