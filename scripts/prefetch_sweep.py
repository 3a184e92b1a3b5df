"""Sweep: how many edges ahead should each conv kernel prefetch its weight rows into L2? (GPU machine)

    python scripts/prefetch_sweep.py [--distances 0 1 2 4 8] [--configs layer0 medium1 large1]
    python scripts/prefetch_sweep.py --stream     # STREAM_WEIGHTS off / on instead, default distances

For each MACE-MP-0 layer config, dtype and kernel kind (forward, atomic backward, fused double backward) on
the benchmark's Cu graph, sets ``codegen.PREFETCH_EDGES`` for that (kind, dtype) and times the kernel call
alone (receiver order memoised; CUDA events, median of 20 after 3 warm-ups). Each result is compared with
the distance-0 result: the prefetch is a hint and must not change any value (forward: bitwise; the atomic
kernels: rounding of the atomics' order only). Prints one line per (cell, distance).
"""
import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402
from part_sweep import KINDS, maxrel  # noqa: E402

from mace_accel.backends import cuda as B  # noqa: E402
from mace_accel.backends.cuda import codegen  # noqa: E402
from mace_accel.plan import build_plan  # noqa: E402
from mace_accel.problem import TPProblem  # noqa: E402
from tp_cases import mace_conv_args  # noqa: E402

SPEC_ARGS = {"fwd": (True,), "bwd": (False, codegen.DX_ATOMIC, True, True),
             "double": (False, codegen.DX_ATOMIC, True, True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--distances", nargs="*", type=int, default=[0, 1, 2, 4, 8])
    ap.add_argument("--configs", nargs="*", default=["layer0", "medium1", "large1"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--kinds", nargs="*", default=list(KINDS))
    ap.add_argument("--stream", action="store_true", help="sweep codegen.STREAM_WEIGHTS (off, on) instead")
    a = ap.parse_args()
    table, label = (codegen.STREAM_WEIGHTS, "stream_w") if a.stream else (codegen.PREFETCH_EDGES, "prefetch")
    settings = [False, True] if a.stream else a.distances
    dev = torch.device("cuda")
    s, r, n, e = C.cu_graph_on(dev)
    plans = {}
    for cfg in a.configs:
        node, sh, mid, ins = mace_conv_args(cfg)
        plans[cfg] = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    saved = dict(table)
    jobs = []
    for cfg in a.configs:
        for dt in a.dtypes:
            for kname in a.kinds:
                kind = KINDS[kname]
                for d in settings:
                    table[(kind, dt)] = d
                    jobs.append((plans[cfg], B._spec(plans[cfg], kind, dt, *SPEC_ARGS[kname])))
    with ThreadPoolExecutor(12) as pool:  # compile every variant first (NVRTC; the disk cache keeps them)
        list(pool.map(lambda j: B._function(j[0], j[1], 0), jobs))
    print(f"compiled {len(jobs)} kernels", flush=True)
    C.gpu_warmup(dev)
    for cfg in a.configs:
        plan = plans[cfg]
        for dname in a.dtypes:
            dtype = getattr(torch, dname)
            x, ggx = (torch.randn(n, plan.in1_dim, device=dev, dtype=dtype) for _ in range(2))
            y, ggy = (torch.randn(e, plan.in2_dim, device=dev, dtype=dtype) for _ in range(2))
            w, ggw = (torch.randn(e, plan.weight_numel, device=dev, dtype=dtype) for _ in range(2))
            g = torch.randn(n, plan.out_dim, device=dev, dtype=dtype)
            calls = {
                "fwd": lambda: B.forward(plan, x, y, w, s, r, n),
                "bwd": lambda: B.backward(plan, x, y, w, g, s, r, True, True, True),
                "double": lambda: B.double_backward(plan, x, y, w, g, ggx, ggy, ggw, s, r),
            }
            for kname in a.kinds:
                kind = KINDS[kname]
                ref = None
                for d in settings:
                    table[(kind, dname)] = d
                    res = calls[kname]()
                    diff = 0.0 if ref is None else maxrel(res, ref)
                    ref = res if ref is None else ref
                    t = C.time_fn(calls[kname], dev, 3, 20)["median_ms"]
                    print(f"{cfg:8s} {dname} {kname:6s} {label} {int(d):2d} {t:8.3f} ms  maxrel vs first {diff:.1e}",
                          flush=True)
                    del res
                table.clear()
                table.update(saved)


if __name__ == "__main__":
    main()
