"""MACEAccelCalculator against mace's own MACECalculator, on the bundled model (CPU; GPU tests marked)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import mace_accel  # noqa: F401  (sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD before e3nn is imported)
from mace_accel.calculator import MACEAccelCalculator

MODEL = Path(mace_accel.__file__).resolve().parent / "data" / "bundled.model"
RTOL = 1e-10

pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason=f"bundled model missing: {MODEL}")


def _latest_step(calc):
    """The calculator's most recently used captured CUDA-graph step."""
    return next(reversed(calc._graph_steps.values()))


def _has_cuda() -> bool:
    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ref_calc():
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=str(MODEL), device="cpu", default_dtype="float64")


@pytest.fixture(scope="module")
def calc():
    return MACEAccelCalculator(MODEL, device="cpu", default_dtype="float64", accelerate=False)


def _alloy(rep=(2, 2, 1), seed=0, strain=0.03, rattle=0.1) -> Atoms:
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(rep)
    symbols = rng.choice(["Cu", "Ni", "Al", "Ag"], size=len(atoms), p=[0.4, 0.3, 0.15, 0.15])
    atoms.set_chemical_symbols(symbols.tolist())
    eps = rng.normal(scale=strain, size=(3, 3))
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
    atoms.rattle(rattle, seed=seed + 1)
    return atoms


def _cluster(n=13, seed=0) -> Atoms:
    atoms = _alloy(rep=(2, 2, 2), seed=seed)
    centre = atoms.positions.mean(axis=0)
    order = np.argsort(np.linalg.norm(atoms.positions - centre, axis=1))
    cl = atoms[order[:n]]
    cl.pbc = False
    cl.cell = np.zeros((3, 3))
    cl.positions -= centre
    return cl


def _results(calc, atoms):
    a = atoms.copy()
    a.calc = calc
    out = {"energy": a.get_potential_energy(), "forces": a.get_forces(),
           "energies": a.get_potential_energies(), "free_energy": a.get_potential_energy(force_consistent=True)}
    if abs(np.linalg.det(a.cell.array)) > 1e-12:
        out["stress"] = a.get_stress()
    return out


def _ref_cell(atoms, r_max):
    """The cell mace's get_neighborhood substitutes (used by mace for the stress volume)."""
    from mace.data.neighborhood import get_neighborhood

    _, _, _, cell = get_neighborhood(atoms.positions, r_max, pbc=tuple(bool(p) for p in atoms.pbc),
                                     cell=atoms.cell.array.copy())
    return cell


def _assert_close(a, b, rtol=RTOL, what=""):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    scale = max(np.abs(b).max(), 1e-300)
    err = np.abs(a - b).max() / scale
    assert err <= rtol, f"{what}: max relative error {err:.3e} > {rtol:.0e}"


def _compare(atoms, calc, ref_calc):
    got, ref = _results(calc, atoms), _results(ref_calc, atoms)
    _assert_close(got["energy"], ref["energy"], what="energy")
    _assert_close(got["free_energy"], ref["energy"], what="free_energy")
    _assert_close(got["forces"], ref["forces"], what="forces")
    _assert_close(got["energies"], ref["energies"], what="energies")
    assert np.isclose(got["energies"].sum(), got["energy"], rtol=1e-12, atol=1e-12)
    if all(atoms.pbc):
        _assert_close(got["stress"], ref["stress"], what="stress")
    elif "stress" in got:
        # mace divides the virial by the volume of a cell it enlarges along open directions; compare virials
        v_got = got["stress"] * abs(np.linalg.det(atoms.cell.array))
        v_ref = ref["stress"] * abs(np.linalg.det(_ref_cell(atoms, calc.r_max)))
        _assert_close(v_got, v_ref, rtol=1e-8, what="virial")
    return got, ref


# ------------------------------------------------------------------------------------- parity with mace
def test_model_metadata(calc):
    assert calc.atomic_numbers == [13, 28, 29, 47]
    assert 4.0 <= calc.r_max <= 6.0
    assert MODEL.stat().st_size <= 2 * 1024 * 1024
    assert next(calc.model.parameters()).dtype == torch.float64


@pytest.mark.parametrize("rep,seed", [((1, 1, 2), 0), ((2, 2, 1), 1), ((2, 2, 2), 2)])
def test_periodic_matches_mace(calc, ref_calc, rep, seed):
    got, _ = _compare(_alloy(rep, seed), calc, ref_calc)
    assert np.abs(got["stress"]).max() > 1e-4  # strained cell: a nonzero stress was actually compared


def test_triclinic_small_cell_many_images(calc, ref_calc):
    atoms = bulk("Ni", "fcc", a=3.52)  # primitive cell, 1 atom: cutoff >> cell, many images
    atoms.set_cell(atoms.cell.array @ np.array([[1.02, 0.03, 0], [0, 0.99, 0.01], [0, 0, 1.0]]), scale_atoms=True)
    atoms = atoms.repeat((2, 1, 1))
    atoms.symbols[1] = "Al"
    atoms.rattle(0.05, seed=3)
    _compare(atoms, calc, ref_calc)


def test_cluster_matches_mace(calc, ref_calc):
    atoms = _cluster(13, seed=4)
    got, _ = _compare(atoms, calc, ref_calc)
    assert "stress" not in got
    a = atoms.copy()
    a.calc = calc
    from ase.calculators.calculator import PropertyNotImplementedError

    with pytest.raises(PropertyNotImplementedError, match="zero volume"):
        a.get_stress()


def test_cluster_in_box_and_mixed_pbc_match_mace(calc, ref_calc):
    atoms = _cluster(15, seed=5)
    atoms.cell = np.diag([20.0, 21.0, 22.0])
    _compare(atoms, calc, ref_calc)  # non-periodic in a box: stress = virial / box volume
    slab = _alloy((2, 2, 2), seed=6)
    for pbc in [(True, True, False), (False, True, False), (True, False, True)]:
        s = slab.copy()
        s.pbc = pbc
        _compare(s, calc, ref_calc)


def test_float32_close_to_float64(ref_calc):
    c32 = MACEAccelCalculator(str(MODEL), device="cpu", default_dtype="float32", accelerate=False)
    assert next(c32.model.parameters()).dtype == torch.float32
    atoms = _alloy((2, 2, 1), seed=8)
    got, ref = _results(c32, atoms), _results(ref_calc, atoms)
    assert abs(got["energy"] - ref["energy"]) < 1e-4 * len(atoms)
    assert np.abs(got["forces"] - ref["forces"]).max() < 1e-3
    assert np.abs(got["stress"] - ref["stress"]).max() < 1e-4
    assert got["forces"].dtype == np.float64


def test_module_input_is_not_modified():
    model = torch.load(MODEL, weights_only=False, map_location="cpu")
    dtype = next(model.parameters()).dtype
    c = MACEAccelCalculator(model, default_dtype="float32", accelerate=False)
    assert next(model.parameters()).dtype == dtype
    atoms = _alloy((1, 1, 1), seed=9)
    atoms.calc = c
    assert np.isfinite(atoms.get_potential_energy())


def test_results_update_when_atoms_move(calc):
    atoms = _alloy((2, 1, 1), seed=10)
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    atoms.positions[0] += [0.05, 0.0, 0.0]
    assert atoms.get_potential_energy() != e0
    atoms.set_chemical_symbols(["Ag"] * len(atoms))
    e2 = atoms.get_potential_energy()
    assert e2 != e0


def test_forces_are_energy_gradient(calc):
    atoms = _alloy((1, 1, 1), seed=12)
    atoms.calc = calc
    f = atoms.get_forces()
    h = 1e-5
    for i, d in [(0, 0), (2, 1), (3, 2)]:
        a = atoms.copy()
        a.calc = calc
        a.positions[i, d] += h
        ep = a.get_potential_energy()
        a.positions[i, d] -= 2 * h
        em = a.get_potential_energy()
        assert abs(-(ep - em) / (2 * h) - f[i, d]) < 1e-6


# --------------------------------------------------------------------------------------- equivariance
def test_rotation_equivariance_cluster(calc, ref_calc):
    from scipy.spatial.transform import Rotation

    atoms = _cluster(17, seed=13)
    got = _results(calc, atoms)
    rot = Rotation.random(random_state=1234).as_matrix()
    r = atoms.copy()
    r.positions = atoms.positions @ rot.T + np.array([1.0, -2.0, 3.0])  # rotate + translate
    got_r = _results(calc, r)
    # (the bundled model's Wigner-3j/U-matrix constants are exact in float64, see scripts/train_bundled_model.py;
    # with float32-rounded constants equivariance would only hold to ~1e-9)
    assert abs(got_r["energy"] - got["energy"]) < 1e-12 * abs(got["energy"])
    fscale = np.abs(got["forces"]).max()
    np.testing.assert_allclose(got_r["forces"], got["forces"] @ rot.T, rtol=0, atol=1e-11 * fscale)
    np.testing.assert_allclose(got_r["energies"], got["energies"], rtol=0,
                               atol=1e-12 * np.abs(got["energies"]).max())
    # and the rotated structure still matches mace to round-off
    ref_r = _results(ref_calc, r)
    _assert_close(got_r["energy"], ref_r["energy"], what="rotated energy")
    _assert_close(got_r["forces"], ref_r["forces"], what="rotated forces")


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_error_nonfinite_positions(calc, value):
    atoms = _alloy((1, 1, 1))
    atoms.positions[1, 2] = value
    atoms.calc = calc
    with pytest.raises(ValueError, match="NaN or inf"):
        atoms.get_potential_energy()


def test_error_unknown_elements(calc):
    atoms = _alloy((1, 1, 1))
    atoms.symbols[0] = "Fe"
    atoms.symbols[2] = "Au"
    atoms.calc = calc
    with pytest.raises(ValueError, match=r"element\(s\) Fe, Au not supported.*Al, Ni, Cu, Ag"):
        atoms.get_forces()


def test_error_empty_atoms(calc):
    atoms = Atoms(cell=np.eye(3) * 5, pbc=True)
    atoms.calc = calc
    with pytest.raises(ValueError, match="empty"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("cell,pbc", [
    (np.zeros((3, 3)), (True, True, True)),
    (np.diag([4.0, 4.0, 0.0]), (True, True, True)),
    (np.diag([4.0, 0.0, 4.0]), (False, True, False)),
    (np.array([[4.0, 0, 0], [8.0, 0, 0], [0, 0, 4.0]]), (True, True, True)),
])
def test_error_zero_volume_periodic_cell(calc, cell, pbc):
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.3, 1.3, 0.5]], cell=cell, pbc=pbc)
    atoms.calc = calc
    with pytest.raises(ValueError, match="periodic"):
        atoms.get_potential_energy()


def test_error_bad_arguments():
    with pytest.raises(ValueError, match="default_dtype"):
        MACEAccelCalculator(MODEL, default_dtype="float16", accelerate=False)
    with pytest.raises(FileNotFoundError):
        MACEAccelCalculator("/nonexistent/model.model", accelerate=False)
    with pytest.raises(TypeError):
        MACEAccelCalculator(42, accelerate=False)


# -------------------------------------------------------------------------------------- dynamics
def _nve_drift(calc, steps=200, dt_fs=1.0):
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    atoms = _alloy((1, 1, 2), seed=14, strain=0.0, rattle=0.05)
    MaxwellBoltzmannDistribution(atoms, temperature_K=500, rng=np.random.default_rng(15))
    Stationary(atoms)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    etot = []
    dyn.attach(lambda: etot.append(atoms.get_total_energy()), interval=1)
    dyn.run(steps)
    etot = np.array(etot)
    return np.abs(etot - etot[0]).max() / len(atoms), atoms


def test_nve_energy_drift_like_mace(calc, ref_calc):
    drift, atoms = _nve_drift(calc)
    drift_ref, atoms_ref = _nve_drift(ref_calc)
    # same trajectory (to round-off) and the same energy conservation as the original model
    assert drift < 5e-3, f"energy drift {drift:.2e} eV/atom"
    assert drift <= 1.1 * drift_ref + 1e-6, (drift, drift_ref)
    assert np.abs(atoms.positions - atoms_ref.positions).max() < 1e-6


def test_langevin_runs(calc):
    from ase import units
    from ase.md.langevin import Langevin

    atoms = _alloy((1, 1, 1), seed=16)
    atoms.calc = calc
    dyn = Langevin(atoms, timestep=1.0 * units.fs, temperature_K=300, friction=0.02,
                   rng=np.random.default_rng(17))
    dyn.run(20)
    assert np.isfinite(atoms.get_potential_energy())


def test_bfgs_relaxation_reduces_forces(calc):
    from ase.optimize import BFGS

    atoms = _alloy((1, 1, 2), seed=18, strain=0.0, rattle=0.15)
    atoms.calc = calc
    f0 = np.abs(atoms.get_forces()).max()
    e0 = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=60)
    assert np.abs(atoms.get_forces()).max() < 0.3 * f0
    assert atoms.get_potential_energy() < e0


def test_fire_cell_relaxation_reduces_forces_and_stress(calc):
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    atoms = _alloy((1, 1, 1), seed=19, strain=0.04, rattle=0.1)
    atoms.calc = calc
    filt = FrechetCellFilter(atoms)
    f0 = np.abs(filt.get_forces()).max()
    s0 = np.abs(atoms.get_stress()).max()
    e0 = atoms.get_potential_energy()
    FIRE(filt, logfile=None).run(fmax=0.02, steps=150)
    assert np.abs(filt.get_forces()).max() < 0.3 * f0
    assert np.abs(atoms.get_stress()).max() < 0.3 * s0
    assert atoms.get_potential_energy() < e0


# ---------------------------------------------------------------------------------------- accelerate
def test_accelerate_cpu_matches_mace(ref_calc):
    surgery = pytest.importorskip("mace_accel.surgery", reason="mace_accel.surgery not importable")
    if not hasattr(surgery, "accelerate"):
        pytest.skip("mace_accel.surgery has no accelerate() yet")
    c = MACEAccelCalculator(MODEL, device="cpu", default_dtype="float64", accelerate=True)
    for atoms in (_alloy((2, 2, 1), seed=20), _cluster(13, seed=21)):
        got, ref = _results(c, atoms), _results(ref_calc, atoms)
        _assert_close(got["energy"], ref["energy"], what="energy")
        _assert_close(got["forces"], ref["forces"], what="forces")
        _assert_close(got["energies"], ref["energies"], what="energies")
        if all(atoms.pbc):
            _assert_close(got["stress"], ref["stress"], what="stress")


# ---------------------------------------------------------------------------------------------- GPU
def _gpu_parity(dtype: str, accelerate: bool, rtol: float):
    from mace.calculators import MACECalculator

    if accelerate:
        pytest.importorskip("mace_accel.surgery", reason="mace_accel.surgery not importable")
    ref = MACECalculator(model_paths=str(MODEL), device="cuda", default_dtype=dtype)
    c = MACEAccelCalculator(MODEL, device="cuda", default_dtype=dtype, accelerate=accelerate)
    for atoms in (_alloy((2, 2, 2), seed=30), _alloy((3, 3, 3), seed=31), _cluster(17, seed=32)):
        got, r = _results(c, atoms), _results(ref, atoms)
        _assert_close(got["energy"], r["energy"], rtol=rtol, what=f"{dtype} energy")
        _assert_close(got["forces"], r["forces"], rtol=rtol * 10, what=f"{dtype} forces")
        _assert_close(got["energies"], r["energies"], rtol=rtol * 10, what=f"{dtype} energies")
        if all(atoms.pbc):
            _assert_close(got["stress"], r["stress"], rtol=rtol * 10, what=f"{dtype} stress")


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("accelerate", [False, True])
def test_gpu_parity_float64(accelerate):
    _gpu_parity("float64", accelerate, rtol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("accelerate", [False, True])
def test_gpu_parity_float32(accelerate):
    _gpu_parity("float32", accelerate, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
def test_gpu_deterministic_repeatable():
    pytest.importorskip("mace_accel.surgery", reason="mace_accel.surgery not importable")
    c = MACEAccelCalculator(MODEL, device="cuda", default_dtype="float32", accelerate=True, deterministic=True)
    atoms = _alloy((3, 3, 3), seed=33)
    a = _results(c, atoms)
    c.reset()
    b = _results(c, atoms)
    assert a["energy"] == b["energy"] and np.array_equal(a["forces"], b["forces"])


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
def test_gpu_large_system_runs():
    c = MACEAccelCalculator(MODEL, device="cuda", default_dtype="float32",
                            accelerate=os.environ.get("MACE_ACCEL_TEST_ACCELERATE", "1") == "1")
    atoms = _alloy((8, 8, 8), seed=34, rattle=0.05)  # 2048 atoms
    got = _results(c, atoms)
    assert np.isfinite(got["forces"]).all() and got["forces"].shape == (2048, 3)


def test_fast_row_gather_is_exact_and_uses_index_select():
    from mace_accel.calculator.gather import FastRowGather

    pos = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 3, 3, 6, 1, 0])
    with FastRowGather(device_types=("cpu",)):
        a = pos[idx] - pos[idx.flip(0)]
        masked = pos[pos[:, 0] > 0]  # boolean masks pass through untouched
    b = pos.detach()[idx] - pos.detach()[idx.flip(0)]
    assert torch.equal(a.detach(), b)
    assert "IndexSelect" in a.grad_fn.next_functions[0][0].name()
    assert torch.equal(masked.detach(), pos.detach()[pos.detach()[:, 0] > 0])
    (g,) = torch.autograd.grad(a.square().sum(), pos)
    pos2 = pos.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad((pos2[idx] - pos2[idx.flip(0)]).square().sum(), pos2)
    assert torch.allclose(g, g2, rtol=1e-14, atol=1e-14)
    # a one-row source (one structure's cell) is expanded: same rows, its gradient a sum instead of atomics
    cell = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(5, dtype=torch.long)
    w = torch.randn(5, 3, 3, dtype=torch.float64)
    with FastRowGather(device_types=("cpu",)):
        rows = cell[zeros]
    assert rows.shape == (5, 3, 3) and torch.equal(rows.detach(), cell.detach()[zeros])
    (gc,) = torch.autograd.grad((rows * w).sum(), cell)
    assert torch.allclose(gc, w.sum(0, keepdim=True), rtol=1e-14, atol=1e-14)


def test_fast_row_gather_turns_mace_row_times_matrix_into_one_matmul():
    """mace's einsum("be,bec->bc", unit_shifts, cell[batch[sender]]) on an expanded one-row cell becomes one
    [E, 3] @ [3, 3] matmul: same values, first and second-order gradients as the batched einsum."""
    from mace_accel.calculator.gather import FastRowGather

    gen = torch.Generator().manual_seed(3)
    shifts = torch.randn(11, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    cell = torch.randn(1, 3, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    batch = torch.zeros(11, dtype=torch.long)
    v = torch.randn(11, 3, dtype=torch.float64, generator=gen)
    with FastRowGather(device_types=("cpu",)):
        got = torch.einsum("be, bec -> bc", shifts, cell[batch])
        other = torch.einsum("be,bec->bc", shifts, cell[batch].clone())  # not an expanded row: untouched
        listed = torch.einsum("be,bec->bc", [shifts, cell[batch]])
    want = torch.einsum("be,bec->bc", shifts, cell[batch])
    assert "Mm" in got.grad_fn.name() and "Mm" not in other.grad_fn.name()
    assert torch.allclose(got, want, rtol=1e-14, atol=1e-14) and torch.allclose(listed, want, rtol=1e-14, atol=1e-14)
    for out in (got, want):
        g = torch.autograd.grad((out * v).square().sum(), (shifts, cell), create_graph=True)
        gg = torch.autograd.grad(g[0].square().sum() + g[1].square().sum(), (shifts, cell))
        out.grads = [t.detach() for t in g + gg]
    for a, b in zip(got.grads, want.grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    with FastRowGather(device_types=("cpu",)):  # shapes that do not pair up pass through to einsum
        with pytest.raises(RuntimeError):
            torch.einsum("be,bec->bc", shifts[:5], cell[batch])


# ---------------------------------------------------------------------------------------------- CUDA graph step
@pytest.mark.parametrize("kind", ["periodic", "cluster", "mixed"])
def test_null_edge_padding_is_exact(kind):
    """The graph step's padded edges (sender = receiver, beyond r_max) leave energy, forces, stress unchanged."""
    from mace_accel.calculator.graph import write_null_edges

    c = MACEAccelCalculator(MODEL, device="cpu", default_dtype="float64", accelerate=True)
    atoms = _alloy((2, 2, 2), seed=5) if kind != "cluster" else _cluster(13, seed=5)
    if kind == "mixed":
        atoms.pbc = (True, True, False)
    batch = c.build_batch(atoms)
    e = batch["edge_index"].shape[1]
    cap = e + 3 * len(atoms) + 5
    padded = dict(batch)
    padded["edge_index"] = torch.cat([batch["edge_index"], batch["edge_index"].new_empty(2, cap - e)], 1)
    padded["shifts"] = torch.cat([batch["shifts"], batch["shifts"].new_empty(cap - e, 3)])
    padded["unit_shifts"] = torch.cat([batch["unit_shifts"], batch["unit_shifts"].new_empty(cap - e, 3)])
    write_null_edges(padded["edge_index"], padded["shifts"], padded["unit_shifts"], e, len(atoms),
                     np.asarray(atoms.cell.array).tolist(), c.r_max)
    stress = kind != "cluster"
    outs = []
    for b in (batch, padded):
        b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
        with torch.enable_grad():
            o = c.model(b, compute_force=True, compute_stress=stress, training=False)
        outs.append(o)
    for key in ["energy", "forces"] + (["stress"] if stress else []):
        a, b = outs[0][key].detach(), outs[1][key].detach()
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), key


def test_cuda_graph_option_validation():
    with pytest.raises(ValueError, match="cuda_graph must be"):
        MACEAccelCalculator(MODEL, device="cpu", cuda_graph="yes")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        MACEAccelCalculator(MODEL, device="cpu", cuda_graph=True)
    assert MACEAccelCalculator(MODEL, device="cpu").cuda_graph is False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_cuda_graph_step_matches_eager(dtype):
    eager = MACEAccelCalculator(MODEL, device="cuda", default_dtype=dtype, cuda_graph=False)
    graph = MACEAccelCalculator(MODEL, device="cuda", default_dtype=dtype, cuda_graph=True)
    rtol = 1e-10 if dtype == "float64" else 1e-4
    atoms = _alloy((3, 3, 3), seed=40, rattle=0.05)
    capacities = []
    for step in range(6):  # edges change every step
        atoms.rattle(0.02, seed=100 + step)
        if step == 3:  # more edges than the capacity: re-captured with a larger one
            atoms.set_cell(atoms.cell.array * 0.8, scale_atoms=True)
        if step == 4:  # other elements, same atom count: node attributes are reloaded
            atoms.set_chemical_symbols(atoms.get_chemical_symbols()[::-1])
        a, b = _results(eager, atoms), _results(graph, atoms)
        capacities.append(_latest_step(graph).capacity)
        for key in ("energy", "forces", "stress"):
            np.testing.assert_allclose(b[key], a[key], rtol=rtol, atol=rtol * np.abs(a[key]).max(), err_msg=key)
    assert capacities[3] > capacities[2] and len(set(capacities[:3])) == 1
    cl = _cluster(13, seed=41)  # new signature: re-captured, no stress
    a, b = _results(eager, cl), _results(graph, cl)
    np.testing.assert_allclose(b["forces"], a["forces"], rtol=rtol, atol=rtol * np.abs(a["forces"]).max())


def test_null_unit_shift_is_beyond_the_cutoff():
    from mace_accel.calculator.graph import NULL_EDGE_LENGTH_FACTOR, capacity_for, null_unit_shift

    assert null_unit_shift([[0, 0, 0]] * 3, 5.0) == (None, (NULL_EDGE_LENGTH_FACTOR * 5.0, 0.0, 0.0))
    cell = [[2.0, 0, 0], [0, 3.0, 0], [0, 0, 0]]  # 2-D periodic slab: the longest nonzero vector is used
    unit, cart = null_unit_shift(cell, 5.0)
    assert unit == (0, 4, 0) and cart == (0.0, 12.0, 0.0)
    assert np.linalg.norm(np.array(unit) @ np.array(cell)) >= NULL_EDGE_LENGTH_FACTOR * 5.0
    assert capacity_for(1) >= 1 and capacity_for(10000) >= 11500 and capacity_for(10000) % 4096 == 0


def test_graph_step_refuses_blocks_whose_padded_edges_may_not_vanish():
    from mace_accel.calculator.graph import GraphStepUnsupported, check_model

    class OtherBlock(torch.nn.Module):  # edge weights from something else than the radial embedding
        def __init__(self):
            super().__init__()
            self.conv_tp = torch.nn.Identity()
            self.conv_tp_weights = torch.nn.Identity()

    model = torch.nn.Module()
    model.interactions = torch.nn.ModuleList([OtherBlock()])
    with pytest.raises(GraphStepUnsupported, match="interactions.0 is a OtherBlock"):
        check_model(model)
    c = MACEAccelCalculator(MODEL, device="cpu", accelerate=True)
    check_model(c.model)  # the bundled model's blocks are allowed


def test_captured_steps_are_kept_per_signature(calc, monkeypatch):
    """cuda_graph_cache: alternating structures replay their own captured step (one capture per signature),
    an edge count above a step's capacity re-captures that signature only, and beyond the cache size the least
    recently used step is freed; a capture that runs out of memory frees the others and retries once. The capture
    itself is stood in for (CPU); the GPU tests replay real graphs."""
    from mace_accel.calculator import calculator as C

    made = []

    class FakeStep:
        def __init__(self, model, batch, capacity, has_volume, r_max, ctx, signature):
            self.signature, self.capacity = signature, capacity
            made.append((signature, capacity))

        def fits(self, signature, batch):
            return signature == self.signature and batch["edge_index"].shape[1] <= self.capacity

        def run(self, batch, cell):
            return {"signature": self.signature}

    monkeypatch.setattr(C, "GraphStep", FakeStep)
    c = copy.copy(calc)
    c._graph_steps, c.cuda_graph_cache = C.OrderedDict(), 2
    a, b, d = _alloy(), _alloy(rep=(3, 2, 1)), _cluster()

    def call(atoms, edges):
        return c._graph_call({"edge_index": torch.zeros(2, edges, dtype=torch.long)}, atoms, True)

    for atoms in (a, b, a, b, a):
        assert call(atoms, 100)["signature"][0] == len(atoms)
    assert [s[0] for s, _ in made] == [len(a), len(b)]  # two captures for five calls
    call(a, 10 ** 6)  # more edges than a's capacity: a is captured again, b is kept
    assert len(made) == 3 and _latest_step(c).signature[0] == len(a)
    call(b, 100)
    assert len(made) == 3
    call(d, 100)  # a third signature with a cache of 2: a (least recently used) is freed, b stays
    assert len(made) == 4 and list(c._graph_steps) == [made[1][0], made[3][0]]
    with pytest.raises(ValueError, match="cuda_graph_cache"):
        MACEAccelCalculator(MODEL, device="cpu", accelerate=False, cuda_graph_cache=0)

    # a capture that runs out of memory while other signatures' graphs are kept: those are freed, one retry
    oom = [True]

    class TightStep(FakeStep):
        def __init__(self, *args):
            if oom[0] and len(c._graph_steps):
                oom[0] = False
                raise torch.cuda.OutOfMemoryError("stand-in")
            super().__init__(*args)

    monkeypatch.setattr(C, "GraphStep", TightStep)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert call(a, 100)["signature"][0] == len(a)
    assert not oom[0] and list(c._graph_steps) == [made[-1][0]]
