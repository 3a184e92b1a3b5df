"""Sweep: how the float32 sender (dx) atomics are issued (GPU machine).

    python scripts/dx_atomic_sweep.py [--configs medium1 large1]

For each MACE-MP-0 layer config on the benchmark's Cu graph (float32), times the atomic backward (dx, dy, dw)
and the fused double backward with and without d/dgout alone (receiver order memoised; CUDA events, median of 20 after
3 warm-ups) with the dx atomics issued per lane (``COALESCED_DX_ATOMICS`` off) and staged through shared
memory so that consecutive lanes add consecutive elements (on). Each result is compared with the first
setting's (max relative difference: atomics' order only).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import part_sweep as P  # noqa: E402
import torch  # noqa: E402

from mace_accel.backends import cuda as B  # noqa: E402
from mace_accel.backends.cuda import codegen  # noqa: E402

SETTINGS = {"per-lane": False, "staged": True}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["medium1", "large1"])
    a = ap.parse_args()
    dev = torch.device("cuda")
    s, r, n, e = P.C.cu_graph_on(dev)
    plans = P.mp0_plans(a.configs)
    saved = dict(codegen.COALESCED_DX_ATOMICS)
    P.C.gpu_warmup(dev)
    for cfg in a.configs:
        plan = plans[cfg]
        x, y, w, g, ggx, ggy, ggw = P.sweep_inputs(plan, torch.float32, n, e, dev)
        calls = {"bwd": lambda: B.backward(plan, x, y, w, g, s, r, True, True, True),
                 "double": lambda: B.double_backward(plan, x, y, w, g, ggx, ggy, ggw, s, r),
                 "double_nogg": lambda: B.double_backward(plan, x, y, w, g, ggx, ggy, ggw, s, r, need_gg=False)[:3]}
        for kname, call in calls.items():
            ref = None
            for name, staged in SETTINGS.items():
                codegen.COALESCED_DX_ATOMICS["float32"] = staged
                res = call()
                diff = 0.0 if ref is None else P.maxrel(res, ref)
                ref = res if ref is None else ref
                t = P.C.time_fn(call, dev, 3, 20)["median_ms"]
                print(f"{cfg:8s} float32 {kname:11s} dx atomics {name:9s} {t:8.3f} ms  maxrel vs first {diff:.1e}",
                      flush=True)
            codegen.COALESCED_DX_ATOMICS.clear()
            codegen.COALESCED_DX_ATOMICS.update(saved)


if __name__ == "__main__":
    main()
