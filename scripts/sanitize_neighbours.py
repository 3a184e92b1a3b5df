"""Probe: the neighbour-list kernels on a few systems, for compute-sanitizer (GPU machine).

    compute-sanitizer --tool memcheck --kernel-name kns=mace_accel_nl python scripts/sanitize_neighbours.py

Runs the CUDA path of ``calculator.neighbours.neighbour_list`` (kernels/neighbours.cu: count and fill) on a
periodic fcc Cu block, a triclinic cell with mixed boundary conditions and a cutoff above the cell height (several
periodic images), an open cluster and a single atom in a small cell, in one chunk and in many (``NL_MAX_SLOTS``
small), and checks each edge list against the torch path's.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402

from mace_accel.calculator import neighbours  # noqa: E402


def main():
    rng = np.random.default_rng(3)
    atoms = C.cu_atoms(3)
    tri = np.array([[4.0, 0.3, 0.0], [1.2, 3.5, 0.0], [0.5, -0.7, 5.0]])
    cases = [(atoms.positions, atoms.cell.array, (True,) * 3, 6.0),
             (rng.random((40, 3)) @ tri, tri, (True, False, True), 7.5),
             (rng.random((30, 3)) * 9.0, np.zeros((3, 3)), (False,) * 3, 3.0),
             (np.array([[0.3, 0.2, 0.1]]), np.array([[2.0, 0, 0], [0.7, 2.2, 0], [0.1, 0.4, 2.5]]), (True,) * 3, 7.0)]
    for max_slots in (neighbours.NL_MAX_SLOTS, 97):
        neighbours.NL_MAX_SLOTS = max_slots
        for pos, cell, pbc, cutoff in cases:
            p = torch.tensor(pos, dtype=torch.float64, device="cuda")
            c = torch.tensor(np.asarray(cell, dtype=float))
            ek, sk = neighbours.neighbour_list(p, c, pbc, cutoff, backend="cuda")
            et, st = neighbours.neighbour_list(p, c, pbc, cutoff, backend="torch")
            same = torch.equal(ek, et) and torch.equal(sk, st)
            print(f"{len(pos):4d} atoms, pbc {pbc}, cutoff {cutoff}, max slots {max_slots}: {ek.shape[1]} edges, "
                  f"{'identical to' if same else 'DIFFERENT from'} the torch path", flush=True)
            if not same:
                raise SystemExit(1)


if __name__ == "__main__":
    main()
