"""Sweep: the fused double-backward kernel with and without the gradient w.r.t. gout (GPU machine).

    python scripts/double_sweep.py [--configs layer0 medium1 large1] [--dtypes float32 float64]
                                   [--budgets 96 64 48 0] [--min-blocks]

For each MACE-MP-0 layer config and dtype on the benchmark's Cu graph, times ``double_backward`` alone
(receiver order memoised; CUDA events, median of 20 after 3 warm-ups) with ``need_gg`` on (the four outputs)
and off (gx, gy, gw only: what a second pass from a constant upstream gradient asks for), the latter under
several output-part budgets (``codegen.DOUBLE_NO_GG_MAX_LANE_WORDS``; 0 = one part). Every run's gx, gy,
gw are compared with the need_gg run's (max relative difference: rounding only, atomics' order). Then, at the
default budget, need_gg off under each ``--min-blocks`` value (``codegen.MIN_BLOCKS_PER_SM[(KIND_DOUBLE,
dtype, False)]``: a register cap of 65536 / (blocks * threads per block) per thread).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import part_sweep as P  # noqa: E402
import torch  # noqa: E402

from mace_accel.backends import cuda as B  # noqa: E402
from mace_accel.backends.cuda import codegen  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["layer0", "medium1", "large1"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--budgets", nargs="*", type=int, default=[96, 64, 48, 0])
    ap.add_argument("--min-blocks", nargs="*", type=int, default=[])
    a = ap.parse_args()
    dev = torch.device("cuda")
    s, r, n, e = P.C.cu_graph_on(dev)
    plans = P.mp0_plans(a.configs)
    default = codegen.PART_MAX_LANE_WORDS[codegen.KIND_DOUBLE]
    reset = P.restoring(codegen.PART_MAX_LANE_WORDS, codegen.DOUBLE_NO_GG_MAX_LANE_WORDS, codegen.MIN_BLOCKS_PER_SM)
    P.C.gpu_warmup(dev)
    for cfg in a.configs:
        plan = plans[cfg]
        for dname in a.dtypes:
            x, y, w, g, ggx, ggy, ggw = P.sweep_inputs(plan, getattr(torch, dname), n, e, dev)

            def call(need_gg):
                return B.double_backward(plan, x, y, w, g, ggx, ggy, ggw, s, r, need_gg=need_gg)

            ref = call(True)
            t = P.C.time_fn(lambda: call(True), dev, 3, 20)["median_ms"]
            parts = P.call_spec(plan, "double", dname).num_parts
            print(f"{cfg:8s} {dname} double need_gg=1 budget {default:3d} parts {parts} {t:8.3f} ms", flush=True)
            for budget in a.budgets:
                codegen.PART_MAX_LANE_WORDS[codegen.KIND_DOUBLE] = budget or P.ONE_PART
                codegen.DOUBLE_NO_GG_MAX_LANE_WORDS[dname] = budget or P.ONE_PART
                res = call(False)
                diff = P.maxrel(res[:3], ref[:3])
                assert res[3] is None
                t = P.C.time_fn(lambda: call(False), dev, 3, 20)["median_ms"]
                parts = P.call_spec(plan, "double_nogg", dname).num_parts
                print(f"{cfg:8s} {dname} double need_gg=0 budget {budget:3d} parts {parts} {t:8.3f} ms  "
                      f"maxrel (gx, gy, gw) vs need_gg=1 {diff:.1e}", flush=True)
                del res
            reset()
            for mb in a.min_blocks:
                P.set_switch(codegen.MIN_BLOCKS_PER_SM, codegen.KIND_DOUBLE, dname, mb)
                res = call(False)
                diff = P.maxrel(res[:3], ref[:3])
                t = P.C.time_fn(lambda: call(False), dev, 3, 20)["median_ms"]
                print(f"{cfg:8s} {dname} double need_gg=0 min_blocks {mb} {t:8.3f} ms  maxrel vs need_gg=1 "
                      f"{diff:.1e}", flush=True)
                del res
            reset()


if __name__ == "__main__":
    main()
