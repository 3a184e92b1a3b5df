"""Where does one get_forces() step of ours go, in wall time? (GPU machine)

    python scripts/step_breakdown.py

Times, on the bench_ase system (2048 Cu atoms, MACE-MP-0-medium architecture, float32), with a
synchronize after each part: the calculator's batch building (neighbour list included), the model's
energy+forces call on a fixed batch, the GPU time of that call (CUDA events), the whole get_forces(), and
the same step through the calculator's CUDA-graph step, and that graph's replay alone.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402
from bench_ase import build_model  # noqa: E402

import mace_accel  # noqa: E402
from mace_accel.calculator.gather import FastRowGather  # noqa: E402


def wall(fn, reps=15, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def gpu(fn, reps=15):
    return C.time_fn(fn, torch.device("cuda"), 1, reps)["median_ms"]


def main():
    atoms = C.cu_atoms(8)
    model, _ = build_model(128, 6.0, 78.0, torch.float32, 0, "RealAgnosticResidualInteractionBlock")
    calc = mace_accel.MACEAccelCalculator(model, device="cuda", default_dtype="float32", cuda_graph=False)
    atoms.calc = calc
    atoms.get_forces()
    batch = calc.build_batch(atoms)
    m = calc.model

    def call():
        with torch.enable_grad(), FastRowGather():
            out = m(batch, compute_force=True, compute_stress=True, training=False)
        return out

    def step():
        atoms.rattle(1e-3)
        atoms.get_forces()

    print(f"batch build (neighbour list, {batch['edge_index'].shape[1]} edges): "
          f"{wall(lambda: calc.build_batch(atoms)):.2f} ms wall")
    print(f"model energy+forces+stress: {wall(call):.2f} ms wall, {gpu(call):.2f} ms GPU")
    print(f"get_forces() step, eager: {wall(step):.2f} ms wall")
    graph_calc = mace_accel.MACEAccelCalculator(model, device="cuda", default_dtype="float32", cuda_graph=True)
    atoms.calc = graph_calc
    atoms.get_forces()
    print(f"get_forces() step, CUDA-graph step: {wall(step):.2f} ms wall")
    graph_step = next(reversed(graph_calc._graph_steps.values()))  # the one just captured
    replay = graph_step.graph.replay
    print(f"graph replay alone: {wall(replay):.2f} ms wall, {gpu(replay):.2f} ms GPU "
          f"(edge capacity {graph_step.capacity})")


if __name__ == "__main__":
    main()
