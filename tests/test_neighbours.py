"""The torch neighbour list against matscipy (which mace's get_neighborhood uses)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

matscipy_neighbours = pytest.importorskip("matscipy.neighbours")

from mace_accel.calculator.neighbours import neighbour_list  # noqa: E402


def _reference(pos, cell, pbc, cutoff):
    """Set of (sender, receiver, shift) from matscipy, open directions handled like mace's get_neighborhood."""
    cell = np.array(cell, dtype=float)
    big = (np.abs(pos).max() + 1) * 5 * cutoff
    for d in range(3):
        if not pbc[d]:
            cell[d] = 0.0
            cell[d, d] = big
    i, j, s = matscipy_neighbours.neighbour_list("ijS", positions=pos, cell=cell, pbc=pbc, cutoff=cutoff)
    keep = ~((i == j) & (s == 0).all(axis=1))
    return set(zip(i[keep].tolist(), j[keep].tolist(), map(tuple, s[keep].tolist())))


def _ours(pos, cell, pbc, cutoff, **kw):
    ei, s = neighbour_list(torch.tensor(pos), torch.tensor(np.asarray(cell, dtype=float)), pbc, cutoff, **kw)
    assert ei.dtype == torch.long and s.dtype == torch.long
    assert ei.shape[0] == 2 and s.shape == (ei.shape[1], 3)
    edges = list(zip(ei[0].tolist(), ei[1].tolist(), map(tuple, s.tolist())))
    assert len(set(edges)) == len(edges), "duplicate edges"
    assert bool((ei[1, 1:] >= ei[1, :-1]).all()), "edges not sorted by receiver"
    # edge vectors are below the cutoff with mace's convention
    vec = torch.tensor(pos)[ei[1]] - torch.tensor(pos)[ei[0]] + s.double() @ torch.tensor(np.asarray(cell, float))
    if vec.numel():
        assert float(vec.norm(dim=1).max()) < cutoff
    return set(edges)


def _random_case(rng, n_max=40):
    n = int(rng.integers(1, n_max))
    pbc = tuple(bool(x) for x in rng.random(3) < 0.6)
    while True:
        cell = np.diag(rng.uniform(2.0, 9.0, 3)) + rng.normal(scale=1.5, size=(3, 3))  # triclinic
        if abs(np.linalg.det(cell)) > 2.0:
            break
    pos = rng.random((n, 3)) @ cell + rng.normal(scale=2.0, size=(n, 3))  # some atoms outside the cell
    cutoff = float(rng.uniform(1.0, 8.0))  # often larger than the cell: several images
    return pos, cell, pbc, cutoff


@pytest.mark.parametrize("seed", range(6))
def test_random_cells_match_matscipy(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        pos, cell, pbc, cutoff = _random_case(rng)
        kw = dict(max_candidates=int(rng.choice([64, 1000, 1 << 21])), bins_per_cutoff=int(rng.integers(1, 4)))
        assert _ours(pos, cell, pbc, cutoff, **kw) == _reference(pos, cell, pbc, cutoff), (pbc, cutoff, kw)


@pytest.mark.parametrize("pbc", [(True, True, True), (False, False, False), (True, False, True),
                                 (False, True, False)])
def test_fixed_pbc_patterns(pbc):
    rng = np.random.default_rng(42)
    cell = np.array([[4.0, 0.3, 0.0], [1.2, 3.5, 0.0], [0.5, -0.7, 5.0]])
    pos = rng.random((17, 3)) @ cell
    for cutoff in (1.5, 3.0, 6.5, 11.0):
        assert _ours(pos, cell, pbc, cutoff) == _reference(pos, cell, pbc, cutoff)


def test_cutoff_much_larger_than_cell_single_atom():
    # one atom in a small cell: all its periodic images within the cutoff, never the zero-shift self pair
    cell = np.array([[2.0, 0.0, 0.0], [0.7, 2.2, 0.0], [0.1, 0.4, 2.5]])
    pos = np.array([[0.3, 0.2, 0.1]])
    edges = _ours(pos, cell, (True,) * 3, 7.0)
    assert edges == _reference(pos, cell, (True,) * 3, 7.0)
    assert (0, 0, (0, 0, 0)) not in edges and len(edges) > 100


def test_open_boundaries_far_apart_and_zero_cell():
    pos = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1e4, 0.0, 0.0], [1e4, 1.5, 0.0], [-3e3, 2e3, 7e3]])
    edges = _ours(pos, np.zeros((3, 3)), (False,) * 3, 2.0)
    assert edges == {(0, 1, (0, 0, 0)), (1, 0, (0, 0, 0)), (2, 3, (0, 0, 0)), (3, 2, (0, 0, 0))}


def test_mixed_pbc_slab_with_zero_open_cell_vector():
    rng = np.random.default_rng(3)
    cell = np.array([[5.0, 0.0, 0.0], [2.5, 4.3, 0.0], [0.0, 0.0, 0.0]])  # slab: z open, no z vector
    pos = rng.random((20, 3)) * [5.0, 4.3, 8.0]
    ours = _ours(pos, cell, (True, True, False), 4.0)
    assert ours == _reference(pos, cell, (True, True, False), 4.0)


def test_matches_mace_get_neighborhood():
    from mace.data.neighborhood import get_neighborhood

    rng = np.random.default_rng(7)
    cell = np.array([[6.0, 0.0, 0.0], [1.0, 5.5, 0.0], [0.3, 0.2, 6.2]])
    pos = rng.random((30, 3)) @ cell
    for pbc in [(True, True, True), (True, False, False), (False, False, False)]:
        ei, shifts, unit_shifts, mcell = get_neighborhood(pos, 4.5, pbc=pbc, cell=cell.copy())
        ref = set(zip(ei[0].tolist(), ei[1].tolist(), map(tuple, unit_shifts.astype(int).tolist())))
        assert _ours(pos, cell, pbc, 4.5) == ref


def test_bulk_2048_atoms_6A():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((8, 8, 8))
    atoms.rattle(0.05, seed=1)
    ei, s = neighbour_list(torch.tensor(atoms.positions), torch.tensor(atoms.cell.array), (True,) * 3, 6.0,
                           max_candidates=1 << 18)  # forces several chunks
    i, j, sm = matscipy_neighbours.neighbour_list("ijS", atoms, 6.0)
    assert ei.shape[1] == len(i) > 150_000
    a_rows = np.unique(np.column_stack([ei[0].numpy(), ei[1].numpy(), s.numpy()]), axis=0)
    b_rows = np.unique(np.column_stack([i, j, sm]), axis=0)
    assert a_rows.shape == b_rows.shape == (len(i), 5) and np.array_equal(a_rows, b_rows)


def test_empty_and_errors():
    ei, s = neighbour_list(torch.zeros(0, 3, dtype=torch.float64), torch.eye(3) * 5, (True,) * 3, 3.0)
    assert ei.shape == (2, 0) and s.shape == (0, 3)
    # isolated atom
    ei, s = neighbour_list(torch.zeros(1, 3, dtype=torch.float64), None, (False,) * 3, 3.0)
    assert ei.shape == (2, 0)
    with pytest.raises(ValueError, match="zero length"):
        neighbour_list(torch.zeros(2, 3, dtype=torch.float64), torch.diag(torch.tensor([3.0, 3.0, 0.0])),
                       (True, True, True), 2.0)
    with pytest.raises(ValueError, match="linearly dependent"):
        cell = torch.tensor([[3.0, 0, 0], [6.0, 0, 0], [0, 0, 3.0]])
        neighbour_list(torch.zeros(2, 3, dtype=torch.float64), cell, (True, True, True), 2.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        neighbour_list(torch.tensor([[0.0, 0.0, float("nan")]]), None, (False,) * 3, 2.0)
    with pytest.raises(ValueError, match="cutoff"):
        neighbour_list(torch.zeros(2, 3, dtype=torch.float64), None, (False,) * 3, 0.0)


def test_float32_input_and_device_of_outputs():
    rng = np.random.default_rng(11)
    pos, cell, pbc, cutoff = _random_case(rng)
    ei, s = neighbour_list(torch.tensor(pos, dtype=torch.float32), torch.tensor(cell, dtype=torch.float32),
                           pbc, cutoff)
    assert ei.device == torch.device("cpu") and s.device == torch.device("cpu")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rng = np.random.default_rng(5)
    for _ in range(20):
        pos, cell, pbc, cutoff = _random_case(rng, n_max=200)
        ei, s = neighbour_list(torch.tensor(pos, device="cuda"), torch.tensor(cell, device="cuda"), pbc, cutoff)
        assert ei.is_cuda and s.is_cuda
        got = set(zip(ei[0].tolist(), ei[1].tolist(), map(tuple, s.tolist())))
        assert got == _reference(pos, cell, pbc, cutoff)
    # a large system on the GPU
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((17, 17, 17))  # 19652 atoms
    ei, s = neighbour_list(torch.tensor(atoms.positions, device="cuda"),
                           torch.tensor(atoms.cell.array, device="cuda"), (True,) * 3, 6.0)
    i, _, _ = matscipy_neighbours.neighbour_list("ijS", atoms, 6.0)
    assert ei.shape[1] == len(i)


def test_backend_argument():
    pos = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend must be one of"):
        neighbour_list(pos, None, (False,) * 3, 2.0, backend="gpu")
    with pytest.raises(ValueError, match="needs positions on a CUDA device"):
        neighbour_list(pos, None, (False,) * 3, 2.0, backend="cuda")
    ei, s = neighbour_list(torch.tensor([[0.0, 0, 0], [1.0, 0, 0]]), None, (False,) * 3, 2.0, backend="torch")
    assert ei.tolist() == [[1, 0], [0, 1]] and s.tolist() == [[0, 0, 0]] * 2


def _both_backends_on_gpu(pos, cell, pbc, cutoff):
    """The kernels' and the torch path's outputs for the same CUDA inputs are identical, order included."""
    p = torch.tensor(np.asarray(pos, dtype=float), device="cuda")
    c = torch.tensor(np.asarray(cell, dtype=float), device="cuda")
    ek, sk = neighbour_list(p, c, pbc, cutoff, backend="cuda")
    et, st = neighbour_list(p, c, pbc, cutoff, backend="torch")
    assert ek.is_cuda and sk.is_cuda and ek.dtype == sk.dtype == torch.long
    assert torch.equal(ek, et) and torch.equal(sk, st), (pbc, cutoff, ek.shape, et.shape)
    return set(zip(ek[0].tolist(), ek[1].tolist(), map(tuple, sk.tolist())))


@pytest.mark.gpu
def test_cuda_kernels_match_the_torch_path(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mace_accel.calculator import neighbours

    rng = np.random.default_rng(21)
    for _ in range(40):  # triclinic cells, mixed pbc, cutoffs above the cell height (several images)
        pos, cell, pbc, cutoff = _random_case(rng, n_max=120)
        assert _both_backends_on_gpu(pos, cell, pbc, cutoff) == _reference(pos, cell, pbc, cutoff)
    single = _both_backends_on_gpu([[0.3, 0.2, 0.1]], [[2.0, 0, 0], [0.7, 2.2, 0], [0.1, 0.4, 2.5]], (True,) * 3, 7.0)
    assert (0, 0, (0, 0, 0)) not in single and len(single) > 100
    far = [[0.0, 0, 0], [1.0, 0, 0], [1e4, 0, 0], [1e4, 1.5, 0], [-3e3, 2e3, 7e3]]
    assert len(_both_backends_on_gpu(far, np.zeros((3, 3)), (False,) * 3, 2.0)) == 4
    assert not _both_backends_on_gpu([[0.0, 0, 0], [5.0, 0, 0]], np.zeros((3, 3)), (False,) * 3, 2.0)
    ei, s = neighbour_list(torch.zeros(0, 3, dtype=torch.float64, device="cuda"), None, (False,) * 3, 2.0,
                           backend="cuda")
    assert ei.shape == (2, 0) and s.shape == (0, 3)
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((8, 8, 8))
    atoms.rattle(0.05, seed=1)
    real_empty = torch.empty

    def poisoned(*args, **kw):  # every buffer the kernel path allocates starts as garbage: unwritten edges show
        t = real_empty(*args, **kw)
        return t.fill_(-7) if not t.is_floating_point() else t.fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned)
    whole = _both_backends_on_gpu(atoms.positions, atoms.cell.array, (True,) * 3, 6.0)
    monkeypatch.setattr(neighbours, "NL_MAX_SLOTS", 1000)  # receivers in many chunks, some with no edges
    assert _both_backends_on_gpu(atoms.positions, atoms.cell.array, (True,) * 3, 6.0) == whole
    assert whole == _reference(atoms.positions, atoms.cell.array, (True,) * 3, 6.0)
