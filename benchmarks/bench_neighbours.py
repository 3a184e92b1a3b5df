"""Neighbour-list benchmark: the calculator's neighbour list through the CUDA kernels and through torch ops on
the GPU, and matscipy on the CPU (what mace's own calculator uses), on the same rattled fcc Cu structures.

    python benchmarks/bench_neighbours.py [--sizes 3 8 16] [--cutoff 6.0] [--reps 20] [--out FILE]

Wall time per call with a synchronise after it (the neighbour list ends with a device->host read of the edge
count, so its wall time is what a step pays), median over ``--reps`` after warm-up. Every result is checked
against matscipy's edge set first. Writes JSON (default under benchmarks/results/).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def wall_ms(fn, device, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    C.synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        C.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 8, 16], help="fcc supercell repeats (4 atoms each)")
    ap.add_argument("--cutoff", type=float, default=6.0)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from matscipy.neighbours import neighbour_list as matscipy_nl

    from mace_accel.calculator.neighbours import neighbour_list

    device = C.resolve_device(a.device)
    rows = []
    for size in a.sizes:
        atoms = C.cu_atoms(size)
        pos = torch.as_tensor(atoms.get_positions(), dtype=torch.float64, device=device)
        cell = torch.as_tensor(atoms.cell.array, dtype=torch.float64, device=device)
        i, j, s = matscipy_nl("ijS", atoms, a.cutoff)
        ref = set(zip(i.tolist(), j.tolist(), map(tuple, s.tolist())))
        row = {"atoms": len(atoms), "edges": len(i), "cutoff": a.cutoff}
        impls = {"matscipy (CPU)": lambda: matscipy_nl("ijS", atoms, a.cutoff)}
        backends = ("cuda", "torch") if device.type == "cuda" else ("torch",)
        for backend in backends:
            def call(backend=backend):
                return neighbour_list(pos, cell, (True,) * 3, a.cutoff, check=False, backend=backend)

            ei, sh = call()
            got = set(zip(ei[0].tolist(), ei[1].tolist(), map(tuple, sh.tolist())))
            if got != ref:
                raise RuntimeError(f"backend {backend!r}: {len(got ^ ref)} edges differ from matscipy's "
                                   f"({len(atoms)} atoms)")
            impls[f"ours, {backend} on {device.type}"] = call
        for name, fn in impls.items():
            row[name] = wall_ms(fn, device, a.reps)
        rows.append(row)
        print(f"{len(atoms):6d} atoms, {len(i):8d} edges: " + ", ".join(
            f"{k} {v:.3f} ms" for k, v in row.items() if isinstance(v, float) and k != "cutoff"), flush=True)
    out = {"benchmark": "neighbour_list", "env": C.env_info(device), "args": vars(a), "results": rows,
           "notes": "wall ms per call, synchronised, median; edge sets checked against matscipy first"}
    path = a.out or C.default_out("bench_neighbours", device)
    C.write_json(path, out)
    print("wrote", path)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
