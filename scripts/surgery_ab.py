"""Probe: one of the surgery's class swaps against e3nn's module it replaces, in one process (GPU machine).

    python scripts/surgery_ab.py [--restore linear|radial|rowmatrix] [--rounds 6]

Two calculators on the bench_ase system (2048 Cu atoms, MACE-MP-0-medium architecture, float32): the default
accelerated model, and the same with one kind of swap undone: ``linear`` (every SplitLinear back to e3nn's
o3.Linear, surgery/linear.py) or ``radial`` (every FoldedFullyConnectedNet back to e3nn's FullyConnectedNet,
surgery/radial.py), or ``rowmatrix`` (not a swap: the second calculator's CUDA graph is captured with
FastRowGather's matmul form of mace's ``einsum("be,bec->bc", ...)`` turned off, calculator/gather.py). Per round
and
calculator: the median wall time of 15 CUDA-graph get_forces() steps, and the CUDA-event median of 10 replays of
its captured graph (the step's GPU time). Prints both per round, their medians, and the largest force difference
between the two models.
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402
from bench_ase import build_model  # noqa: E402

import mace_accel  # noqa: E402
from mace_accel.calculator import gather  # noqa: E402
from mace_accel.surgery.linear import SplitLinear, restore_linear  # noqa: E402
from mace_accel.surgery.radial import FoldedFullyConnectedNet, restore_radial  # noqa: E402

SWAPS = {"linear": ("SplitLinear", "e3nn Linear", SplitLinear, restore_linear),
         "radial": ("folded MLP", "e3nn MLP", FoldedFullyConnectedNet, restore_radial),
         "rowmatrix": ("matmul", "einsum", None, None)}


@contextlib.contextmanager
def einsum_kept():
    """FastRowGather leaves mace's row x matrix einsums alone while this is active."""
    real = gather._row_times_matrix
    gather._row_times_matrix = lambda args: None
    try:
        yield
    finally:
        gather._row_times_matrix = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--restore", choices=sorted(SWAPS), default="linear")
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    dev = torch.device("cuda")
    atoms = C.cu_atoms(8)
    model, _ = build_model(128, 6.0, 78.0, torch.float32, 0, "RealAgnosticResidualInteractionBlock")
    ours, theirs, cls, restore = SWAPS[a.restore]
    calcs = {ours: mace_accel.MACEAccelCalculator(model, device="cuda", default_dtype="float32"),
             theirs: mace_accel.MACEAccelCalculator(model, device="cuda", default_dtype="float32")}
    n_swapped = sum(isinstance(m, cls) for m in calcs[theirs].model.modules()) if cls else 0
    if restore is not None:
        for m in calcs[theirs].model.modules():
            restore(m)
    forces, captured = {}, {}
    for name, calc in calcs.items():
        atoms.calc = calc
        with (einsum_kept() if a.restore == "rowmatrix" and name == theirs else contextlib.nullcontext()):
            for _ in range(3):  # the CUDA graph is captured within these calls
                forces[name] = atoms.get_forces().copy()
        captured[name] = list(calc._graph_steps.values())
    diff = abs(forces[ours] - forces[theirs]).max()
    print(f"{torch.cuda.get_device_name()}: {n_swapped} modules swapped back ({a.restore}); max |dF| between the "
          f"models {diff:.3e} eV/A")
    steps, gpu = {k: [] for k in calcs}, {k: [] for k in calcs}
    for rnd in range(a.rounds):
        for name, calc in (calcs.items() if rnd % 2 == 0 else reversed(list(calcs.items()))):
            atoms.calc = calc
            ts = []
            for i in range(18):
                atoms.rattle(1e-3)
                t0 = time.perf_counter()
                atoms.get_forces()
                if i >= 3:
                    ts.append((time.perf_counter() - t0) * 1e3)
            steps[name].append(statistics.median(ts))

            replay = next(reversed(calc._graph_steps.values())).graph.replay
            gpu[name].append(C.time_fn(replay, dev, 2, 10)["median_ms"])
        print(f"round {rnd}: " + "  ".join(f"{k}: step {steps[k][-1]:.2f} ms, replay {gpu[k][-1]:.2f} ms"
                                           for k in calcs), flush=True)
    for name, calc in calcs.items():  # timed the graphs captured above (no re-capture since)
        if [id(s) for s in calc._graph_steps.values()] != [id(s) for s in captured[name]]:
            raise RuntimeError(f"{name}: its CUDA graph was re-captured during the rounds")
    for k in calcs:
        print(f"  {k:12s} graph step median {statistics.median(steps[k]):.2f} ms, graph replay (CUDA events) "
              f"median {statistics.median(gpu[k]):.2f} ms")


if __name__ == "__main__":
    main()
