"""Where does the conv backward's time go? Times the atomic backward kernel call alone with each subset of
its outputs (dx, dy, dw) on the benchmark's Cu graph (GPU machine).

    python scripts/bwd_breakdown.py [--configs medium1 large1] [--dtypes float32 float64]

First A/B's the backward and fused double (per-lane vs coalesced dx atomics; dy partial rows vs dy atomics),
then times the subsets.

Receiver order memoised; CUDA events, median of 20 after 3 warm-ups. One line per (config, dtype, outputs).
Leaving dx out removes the per-edge atomics into the sender rows, leaving dy out the warp reductions and the
partial-row stores, leaving dw out the per-edge weight-gradient stores.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402
from part_sweep import sweep_inputs  # noqa: E402

from mace_accel.backends import cuda as B  # noqa: E402
from mace_accel.backends.cuda import codegen  # noqa: E402
from mace_accel.plan import build_plan  # noqa: E402
from mace_accel.problem import TPProblem  # noqa: E402
from tp_cases import mace_conv_args  # noqa: E402

SUBSETS = [(1, 1, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["layer0", "medium1", "large1"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    a = ap.parse_args()
    dev = torch.device("cuda")
    s, r, n, e = C.cu_graph_on(dev)
    C.gpu_warmup(dev)
    for cfg in a.configs:
        node, sh, mid, ins = mace_conv_args(cfg)
        plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
        for dname in a.dtypes:
            x, y, w, g, ggx, ggy, ggw = sweep_inputs(plan, getattr(torch, dname), n, e, dev)
            saved = dict(codegen.COALESCED_DX_ATOMICS)
            for coalesced in (False, True):  # the dx atomics per lane vs staged through shared memory
                codegen.COALESCED_DX_ATOMICS = {**saved, dname: coalesced}  # part of the kernel spec
                tb = C.time_fn(lambda: B.backward(plan, x, y, w, g, s, r, True, True, True), dev, 3, 20)["median_ms"]
                td = C.time_fn(lambda: B.double_backward(plan, x, y, w, g, ggx, ggy, ggw, s, r), dev, 3, 20)["median_ms"]
                print(f"{cfg:8s} {dname} coalesced dx atomics {coalesced!s:5s}: bwd {tb:8.3f} ms, fused double "
                      f"{td:8.3f} ms", flush=True)
            codegen.COALESCED_DX_ATOMICS = saved  # the defaults for the subsets below
            for atomic_dy in (False, True):  # dy partial rows summed by torch vs added with atomics
                codegen.ATOMIC_DY = atomic_dy  # part of the kernel spec
                tb = C.time_fn(lambda: B.backward(plan, x, y, w, g, s, r, True, True, True), dev, 3, 20)["median_ms"]
                td = C.time_fn(lambda: B.double_backward(plan, x, y, w, g, ggx, ggy, ggw, s, r), dev, 3, 20)["median_ms"]
                print(f"{cfg:8s} {dname} atomic dy {atomic_dy!s:5s}: bwd {tb:8.3f} ms, fused double {td:8.3f} ms",
                      flush=True)
            codegen.ATOMIC_DY = True
            for sub in SUBSETS:
                t = C.time_fn(lambda: B.backward(plan, x, y, w, g, s, r, *map(bool, sub)), dev, 3, 20)["median_ms"]
                names = "+".join(nm for nm, on in zip(("dx", "dy", "dw"), sub) if on)
                print(f"{cfg:8s} {dname} bwd {names:9s} {t:8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
