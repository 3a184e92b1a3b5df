"""Probe: mace's o3.Linear layers as e3nn's modules against SplitLinear (surgery/linear.py), in one process.

    python scripts/linear_ab.py [--rounds 6]          (GPU machine)

Two calculators on the bench_ase system (2048 Cu atoms, MACE-MP-0-medium architecture, float32): the default
accelerated model, and the same with every SplitLinear swapped back to e3nn's o3.Linear. Per round and
calculator: the median wall time of 15 CUDA-graph get_forces() steps, and the CUDA-event median of 10 replays of
its captured graph (the step's GPU time). Prints both per round, their medians, and the largest force difference
between the two models.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402
from bench_ase import build_model  # noqa: E402

import mace_accel  # noqa: E402
from mace_accel.surgery.linear import SplitLinear, restore_linear  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    dev = torch.device("cuda")
    atoms = C.cu_atoms(8)
    model, _ = build_model(128, 6.0, 78.0, torch.float32, 0, "RealAgnosticResidualInteractionBlock")
    calcs = {"SplitLinear": mace_accel.MACEAccelCalculator(model, device="cuda", default_dtype="float32"),
             "e3nn Linear": mace_accel.MACEAccelCalculator(model, device="cuda", default_dtype="float32")}
    n_split = sum(isinstance(m, SplitLinear) for m in calcs["e3nn Linear"].model.modules())
    for m in calcs["e3nn Linear"].model.modules():
        restore_linear(m)
    forces = {}
    for name, calc in calcs.items():
        atoms.calc = calc
        forces[name] = atoms.get_forces().copy()
    diff = abs(forces["SplitLinear"] - forces["e3nn Linear"]).max()
    print(f"{torch.cuda.get_device_name()}: {n_split} o3.Linear layers swapped; max |dF| between the models "
          f"{diff:.3e} eV/A")
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
    for k in calcs:
        print(f"  {k:12s} graph step median {statistics.median(steps[k]):.2f} ms, graph replay (CUDA events) "
              f"median {statistics.median(gpu[k]):.2f} ms")


if __name__ == "__main__":
    main()
