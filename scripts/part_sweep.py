"""Sweep: how many output parts should each conv kernel run with? (GPU machine)

    python scripts/part_sweep.py [--budgets 0 96 64 48 32 24] [--configs layer0 medium1 large1]

For each MACE-MP-0 layer config, dtype and kernel kind (forward, atomic backward, fused double backward) on
the benchmark's Cu graph, sets the per-lane register budget (``codegen.PART_MAX_LANE_WORDS``; 0 = one part)
and times the kernel call alone (receiver order memoised; CUDA events, median of 20 after 3 warm-ups).
Every split result is compared with the first budget's (default 0: one part; max relative difference, must be
rounding only).
Prints one line per (cell, budget): parts, ms, and the relative difference.
"""
import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402

from mace_accel.backends import cuda as B  # noqa: E402
from mace_accel.backends.cuda import codegen  # noqa: E402
from mace_accel.plan import build_plan  # noqa: E402
from mace_accel.problem import TPProblem  # noqa: E402
from tp_cases import launched_specs, mace_conv_args  # noqa: E402

ONE_PART = 1 << 30
KINDS = {"fwd": codegen.KIND_FORWARD, "bwd": codegen.KIND_BACKWARD, "double": codegen.KIND_DOUBLE}
#: further calls sweep_calls offers (not swept by default): the fused double backward without d/dgout, the
#: deterministic variant's segmented backward (dy, dw; its dx is the separate grad-x kernel)
EXTRA_KINDS = {"double_nogg": codegen.KIND_DOUBLE, "bwd_det": codegen.KIND_BACKWARD}
#: every call name of sweep_calls -> its kernel kind
ALL_KINDS = {**KINDS, **EXTRA_KINDS}


def sweep_inputs(plan, dtype, n: int, e: int, dev):
    """Fresh random inputs of one conv problem on the benchmark graph: (x, y, w, g, ggx, ggy, ggw)."""
    x, ggx = (torch.randn(n, plan.in1_dim, device=dev, dtype=dtype) for _ in range(2))
    y, ggy = (torch.randn(e, plan.in2_dim, device=dev, dtype=dtype) for _ in range(2))
    w, ggw = (torch.randn(e, plan.weight_numel, device=dev, dtype=dtype) for _ in range(2))
    g = torch.randn(n, plan.out_dim, device=dev, dtype=dtype)
    return x, y, w, g, ggx, ggy, ggw


def sweep_calls(plan, inputs, s, r, n: int):
    """The backend calls the sweeps time: forward, atomic backward (dx, dy, dw), the deterministic variant's
    segmented backward (dy, dw), fused double backward (with and without d/dgout)."""
    x, y, w, g, ggx, ggy, ggw = inputs
    return {
        "fwd": lambda: B.forward(plan, x, y, w, s, r, n),
        "bwd": lambda: B.backward(plan, x, y, w, g, s, r, True, True, True),
        "bwd_det": lambda: B.backward(plan, x, y, w, g, s, r, False, True, True, deterministic=True),
        "double": lambda: B.double_backward(plan, x, y, w, g, ggx, ggy, ggw, s, r),
        "double_nogg": lambda: B.double_backward(plan, x, y, w, g, ggx, ggy, ggw, s, r, need_gg=False)[:3],
    }


def mp0_plans(configs):
    """{config: plan} of the MACE-MP-0 conv layers (tests/tp_cases.py)."""
    plans = {}
    for cfg in configs:
        node, sh, mid, ins = mace_conv_args(cfg)
        plans[cfg] = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    return plans


def precompile(jobs) -> None:
    """Compile every (plan, spec) first, in parallel (NVRTC; the disk cache makes reruns instant)."""
    jobs = list(jobs)
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda j: B._function(j[0], j[1], 0), jobs))
    print(f"compiled {len(jobs)} kernels", flush=True)


def call_spec(plan, kname: str, dt: str):
    """The spec the backend launches for sweep_calls' call ``kname`` on device 0, under the current tables and
    compile target (MACE_ACCEL_ARCH)."""
    return launched_specs(plan, dt, sm90=B.target_is_sm90(0))[kname]


def restoring(*tables):
    """A ``reset(kind, dtype)`` for run_sweep that puts each of ``tables`` (codegen's dicts) back as they are
    now."""
    saved = [(table, dict(table)) for table in tables]

    def reset(kind=None, dname=None):
        for table, copy in saved:
            table.clear()
            table.update(copy)
    return reset


def set_switch(table, kind: int, dname: str, value) -> None:
    """Set a per-kernel entry of one of codegen's tables for (kind, dtype): POINTER_X_LOADS and RUN_EDGES are
    keyed by need_gg too, so both of their entries are set (each call reads its own); MIN_BLOCKS_PER_SM by
    whether the kernel unrolls its edge loop, and only the entry for kernels that do not is set (the unrolled
    layer-0 forwards keep theirs)."""
    if table is codegen.POINTER_X_LOADS or table is codegen.RUN_EDGES:
        table[(kind, dname, True)] = table[(kind, dname, False)] = value
    elif table is codegen.MIN_BLOCKS_PER_SM:
        table[(kind, dname, False)] = value
    else:
        table[(kind, dname)] = value


def run_sweep(a, plans, graph, dev, settings, apply, describe, reset) -> None:
    """Time the call of each (config, dtype, kind) of ``a`` under every setting, in order: ``apply(kind, dtype,
    setting)`` sets it, ``describe(plan, call name, dtype, setting)`` names it in the printed line, ``reset(kind,
    dtype)`` restores the default after the kind. Each result is compared with the first setting's. The
    kernels of every setting are compiled first and the GPU is warmed up, so no compile or cold clock lands in
    a timing."""
    jobs = {}
    for cfg in a.configs:
        for dname in a.dtypes:
            for kname in a.kinds:
                for setting in settings:
                    apply(ALL_KINDS[kname], dname, setting)
                    spec = call_spec(plans[cfg], kname, dname)
                    jobs[(plans[cfg].key, spec)] = (plans[cfg], spec)
                reset(ALL_KINDS[kname], dname)
    precompile(jobs.values())
    C.gpu_warmup(dev)
    s, r, n, e = graph
    for cfg in a.configs:
        plan = plans[cfg]
        for dname in a.dtypes:
            calls = sweep_calls(plan, sweep_inputs(plan, getattr(torch, dname), n, e, dev), s, r, n)
            for kname in a.kinds:
                kind = ALL_KINDS[kname]
                ref = None
                for setting in settings:
                    apply(kind, dname, setting)
                    res = calls[kname]()
                    diff = 0.0 if ref is None else maxrel(res, ref)
                    ref = res if ref is None else ref
                    t = C.time_fn(calls[kname], dev, 3, 20)["median_ms"]
                    print(f"{cfg:8s} {dname} {kname:6s} {describe(plan, kname, dname, setting)} {t:8.3f} ms  "
                          f"maxrel vs first {diff:.1e}", flush=True)
                    del res
                reset(kind, dname)


def maxrel(a, b):
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-300)) for p, q in zip(a, b) if q is not None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="*", type=int, default=[0, 96, 64, 48, 32, 24])
    ap.add_argument("--configs", nargs="*", default=["layer0", "medium1", "large1"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--kinds", nargs="*", default=list(KINDS))
    a = ap.parse_args()
    dev = torch.device("cuda")
    s, r, n, e = C.cu_graph_on(dev)
    plans = mp0_plans(a.configs)

    def apply(kind, dname, budget):
        codegen.PART_MAX_LANE_WORDS[kind] = budget or ONE_PART

    def describe(plan, kname, dname, budget):
        parts = codegen.parts_for(plan, KINDS[kname], dname, codegen.DX_ATOMIC)
        return f"budget {budget:4d} parts {max(1, len(parts))} {[len(p) for p in parts]!s:22s}"

    def reset(kind, dname):
        codegen.PART_MAX_LANE_WORDS[kind] = ONE_PART

    run_sweep(a, plans, (s, r, n, e), dev, a.budgets, apply, describe, reset)

if __name__ == "__main__":
    main()
