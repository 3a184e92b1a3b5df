"""Sweep: forward edge unroll x __launch_bounds__ minimum blocks per SM (GPU machine).

    python scripts/occupancy_sweep.py [--configs layer0] [--unrolls 1 2 4] [--min-blocks 0 8]

A segmented forward runs one warp per (receiver segment, part, chunk), all resident at about once: with 2048
receivers x 4 chunks = 8192 warps, the registers per thread decide how many rounds ("waves") the SMs need
(71 registers -> 28 warps per SM -> 2.2 waves, i.e. 3 rounds; 64 -> 32 -> 1.9, i.e. 2 rounds). Times the
forward kernel call alone (receiver order memoised; CUDA events, median of 30) for each setting and checks
it against the default setting's output (bitwise: the summation order does not change).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402
from part_sweep import restoring  # noqa: E402

from mace_accel.backends import cuda as B  # noqa: E402
from mace_accel.backends.cuda import codegen  # noqa: E402
from mace_accel.plan import build_plan  # noqa: E402
from mace_accel.problem import TPProblem  # noqa: E402
from tp_cases import mace_conv_args  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["layer0"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--unrolls", nargs="*", type=int, default=[1, 2, 4])  # powers of two only (codegen)
    ap.add_argument("--min-blocks", nargs="*", type=int, default=[0, 8])
    a = ap.parse_args()
    dev = torch.device("cuda")
    s, r, n, e = C.cu_graph_on(dev)
    C.gpu_warmup(dev)
    reset = restoring(codegen.SMALL_FORWARD_UNROLL, codegen.MIN_BLOCKS_PER_SM)
    for cfg in a.configs:
        node, sh, mid, ins = mace_conv_args(cfg)
        plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
        for dname in a.dtypes:
            dtype = getattr(torch, dname)
            x = torch.randn(n, plan.in1_dim, device=dev, dtype=dtype)
            y = torch.randn(e, plan.in2_dim, device=dev, dtype=dtype)
            w = torch.randn(e, plan.weight_numel, device=dev, dtype=dtype)
            ref = B.forward(plan, x, y, w, s, r, n)
            for unroll in a.unrolls:
                for mb in a.min_blocks:
                    codegen.SMALL_FORWARD_UNROLL[dname] = unroll
                    # crossed with the unroll: the cap applies whether or not the forward unrolls
                    for unrolled in (False, True):
                        codegen.MIN_BLOCKS_PER_SM[(codegen.KIND_FORWARD, dname, unrolled)] = mb
                    out = B.forward(plan, x, y, w, s, r, n)
                    same = bool(torch.equal(out, ref))
                    t = C.time_fn(lambda: B.forward(plan, x, y, w, s, r, n), dev, 5, 30)["median_ms"]
                    print(f"{cfg:8s} {dname} fwd unroll {unroll} min_blocks {mb}: {t:.3f} ms  bitwise equal {same}",
                          flush=True)
            reset()


if __name__ == "__main__":
    main()
