"""Sweep: does a kernel-layout switch of codegen help each conv kernel? (GPU machine)

    python scripts/layout_sweep.py --tables pointer_x [--configs layer0 medium1 large1] [--repeats 2]
    python scripts/layout_sweep.py --tables stream_rows pointer_x --kinds bwd    # both off, then both on
    python scripts/layout_sweep.py --tables min_blocks --min-blocks 4 --configs medium1 --kinds double_nogg

Switches (off, on, repeated ``--repeats`` times, so the spread between equal settings shows):
* ``pointer_x``: codegen.POINTER_X_LOADS (sender rows loaded as ``*(x_row + i)``);
* ``stream_rows``: codegen.STREAM_RECEIVER_ROWS (per-receiver rows L2 evict-first: the forward's output rows,
  the backward kinds' output-gradient rows);
* ``stream_w``: codegen.STREAM_WEIGHTS (weight rows read, dW written L2 evict-first; was
  ``prefetch_sweep.py --stream``);
* ``min_blocks``: codegen.MIN_BLOCKS_PER_SM (on: ``__launch_bounds__`` asks for ``--min-blocks`` resident blocks
  per SM, capping the registers per thread).

For each MACE-MP-0 layer config, dtype and kernel call of part_sweep.sweep_calls on the benchmark's Cu graph,
sets the switch for that (kind, dtype) and times the call alone (receiver order memoised; CUDA events, median
of 20 after 3 warm-ups). Neither switch may change a value beyond the atomics' rounding: each result is
compared with the first setting's. Prints one line per (cell, setting).
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

TABLES = {"pointer_x": codegen.POINTER_X_LOADS, "stream_rows": codegen.STREAM_RECEIVER_ROWS,
          "stream_w": codegen.STREAM_WEIGHTS, "min_blocks": codegen.MIN_BLOCKS_PER_SM}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", nargs="+", choices=sorted(TABLES), required=True)
    ap.add_argument("--configs", nargs="*", default=["layer0", "medium1", "large1"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--kinds", nargs="*", default=list(KINDS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--min-blocks", type=int, default=3, help="the min_blocks switch's value when on")
    a = ap.parse_args()
    tables = [TABLES[t] for t in a.tables]
    label = "+".join(a.tables)
    settings = [False, True] * a.repeats
    dev = torch.device("cuda")
    s, r, n, e = C.cu_graph_on(dev)
    plans = mp0_plans(a.configs)
    reset = restoring(*tables)

    def apply(kind, dname, setting):
        for table in tables:
            off, on = (0, a.min_blocks) if table is codegen.MIN_BLOCKS_PER_SM else (False, True)
            set_switch(table, kind, dname, on if setting else off)

    run_sweep(a, plans, (s, r, n, e), dev, settings, apply,
              lambda plan, kname, dname, d: f"{label} {'on ' if d else 'off'}", reset)


if __name__ == "__main__":
    main()
