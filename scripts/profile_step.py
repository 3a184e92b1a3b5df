"""Where does one get_forces() step of ours go? torch.profiler over a few steps of the bench_ase system.

    python scripts/profile_step.py [--steps 5]      (GPU machine)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402
from bench_ase import build_model  # noqa: E402

import mace_accel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    atoms = C.cu_atoms(8)
    model, _ = build_model(128, 6.0, 78.0, torch.float32, 0, "RealAgnosticResidualInteractionBlock")
    calc = mace_accel.MACEAccelCalculator(model, device="cuda", default_dtype="float32")
    atoms.calc = calc
    for _ in range(3):
        atoms.rattle(1e-3)
        atoms.get_forces()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            atoms.rattle(1e-3)
            atoms.get_forces()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
