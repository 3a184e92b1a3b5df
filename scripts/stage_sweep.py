"""Sweep: which rows should a conv kernel copy one edge ahead into shared memory? (GPU machine)

    python scripts/stage_sweep.py [--configs layer0 medium1 large1] [--dtypes float32 float64]
                                  [--kinds fwd bwd double_nogg] [--min-blocks 3]
                                  [--settings none:0:1 b:0:0 ...]

For each MACE-MP-0 layer config, dtype and kernel kind on the benchmark's Cu graph, times the kernel call
alone (receiver order memoised; CUDA events, median of 20 after 3 warm-ups) with ``codegen.STAGED_ROWS`` off,
"w" (weight rows) and "wx" (weight and sender rows; as much as fits the block's shared memory), and the
staged settings again with ``__launch_bounds__`` asking for ``--min-blocks`` resident blocks (the staged
kernels may need more registers than the plain ones). Each result is compared with the first setting's.
``--settings`` replaces that list: each STAGE:MIN_BLOCKS:PREFETCH[:AHEAD] ("none" for no stage; e.g.
"b:0:0" bulk-staged weight rows without the L2 prefetch, which would read every weight sector from L2 twice;
"r:0:0:3" the whole-row ring with 4 slots), or "default" for the tables as they are, "noring" for them
without codegen.ROW_RING, "eN" (e.g. "e64") for them with N edges per work item of the runs kernels
(codegen.RUN_EDGES), "sm90tables" for the sm_90 tables on an older target (MACE_ACCEL_ARCH=compute_80; there
"default" is codegen.PRE_SM90_STAGED_ROWS).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import part_sweep as P  # noqa: E402
import torch  # noqa: E402

from mace_accel.backends.cuda import codegen  # noqa: E402

#: settings by name: the tables as they are, with one change for the swept (kind, dtype)
NAMED_SETTINGS = {
    "default": lambda kind, dname: None,
    "noring": lambda kind, dname: codegen.ROW_RING.update({(kind, dname, seg): 0 for seg in (False, True)}),
    # for a target older than sm_90 (MACE_ACCEL_ARCH=compute_80): the sm_90 tables instead of
    # codegen.PRE_SM90_STAGED_ROWS (what such a target launched before v32)
    "sm90tables": lambda kind, dname: setattr(codegen, "PRE_SM90_TABLES", False),
}


def named_setting(t: str):
    """The function that applies setting ``t`` to the tables if ``t`` is a named one ("eN": N edges per runs
    item), else None."""
    if t in NAMED_SETTINGS:
        return NAMED_SETTINGS[t]
    if t[:1] == "e" and t[1:].isdigit():
        return lambda kind, dname: P.set_switch(codegen.RUN_EDGES, kind, dname, int(t[1:]))
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["layer0", "medium1", "large1"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--kinds", nargs="*", default=["fwd", "bwd", "double_nogg"])
    ap.add_argument("--min-blocks", type=int, default=3)
    ap.add_argument("--settings", nargs="*", default=None, help="STAGE:MIN_BLOCKS:PREFETCH[:AHEAD] each")
    a = ap.parse_args()
    dev = torch.device("cuda")
    graph = P.C.cu_graph_on(dev)
    plans = P.mp0_plans(a.configs)
    settings = [("", 0, None, 1), ("w", 0, None, 1), ("wx", 0, None, 1), ("w", a.min_blocks, None, 1),
                ("wx", a.min_blocks, None, 1)]
    if a.settings:
        settings = [t if named_setting(t) else
                    ("" if f[0] == "none" else f[0], int(f[1]), int(f[2]), int(f[3]) if len(f) > 3 else 1)
                    for t, f in ((t, t.split(":")) for t in a.settings)]
    reset_tables = P.restoring(codegen.STAGED_ROWS, codegen.MIN_BLOCKS_PER_SM, codegen.PREFETCH_EDGES,
                               codegen.STAGE_AHEAD, codegen.ROW_RING, codegen.RUN_EDGES)

    def reset(kind=None, dname=None):
        reset_tables()
        codegen.PRE_SM90_TABLES = True

    def apply(kind, dname, setting):
        reset()
        if isinstance(setting, str):
            named_setting(setting)(kind, dname)
            return
        codegen.PRE_SM90_TABLES = False  # an explicit stage, also for a target older than sm_90
        stage, mb, pf, ahead = setting
        for segmented in (False, True):  # the timed call picks its own
            codegen.ROW_RING[(kind, dname, segmented)] = ahead if stage == "r" else 0
        codegen.STAGE_AHEAD[(kind, dname)] = ahead
        if stage != "r":
            codegen.STAGED_ROWS[(kind, dname)] = stage
        P.set_switch(codegen.MIN_BLOCKS_PER_SM, kind, dname, mb)
        if pf is not None:
            codegen.PREFETCH_EDGES[(kind, dname)] = pf

    def describe(plan, kname, dname, setting):
        spec = P.call_spec(plan, kname, dname)
        return (f"stage {spec.stage or '-':2s} ahead {spec.stage_ahead} min_blocks {spec.min_blocks} "
                f"prefetch {spec.prefetch} edges {spec.edges_per_warp if not spec.segmented else '-'}")

    P.run_sweep(a, plans, graph, dev, settings, apply, describe, reset)


if __name__ == "__main__":
    main()
