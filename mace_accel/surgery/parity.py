"""Parity check: the accelerated model against the original on a probe structure.

The probe is a small rattled, slightly sheared periodic cell made of the model's own elements (first and
last of its element table included, to catch indexing errors), so every output path (energy, forces through
autograd, stress through the cell displacement) is exercised. The input batch is built with mace's own data
utilities on the CPU, as mace's calculator does.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Dict, Optional

import numpy as np
import torch

from .core import _dtype, model_device, model_dtype
from .errors import ParityError

#: Maximum relative deviation allowed per dtype and quantity (relative to the largest reference magnitude).
TOLERANCES = {
    torch.float64: {"energy": 1e-10, "forces": 1e-10, "stress": 1e-10},
    torch.float32: {"energy": 1e-5, "forces": 1e-4, "stress": 1e-4},
}


def probe_atoms(model: torch.nn.Module, n_atoms: int = 8, seed: int = 0, spacing: float = 2.3):
    """A rattled, sheared periodic cell of ``n_atoms`` atoms (simple cubic, ``spacing`` Angstrom) using the
    model's elements. The cell is smaller than a typical r_max on purpose (periodic images count)."""
    import ase

    rng = np.random.default_rng(seed)
    zs = [int(z) for z in model.atomic_numbers.cpu().tolist()]
    if len(zs) <= n_atoms:
        chosen = [zs[i % len(zs)] for i in range(n_atoms)]
    else:
        middle = list(rng.choice(zs[1:-1], size=n_atoms - 2, replace=False))
        chosen = [zs[0], zs[-1]] + [int(z) for z in middle]
    rng.shuffle(chosen)
    side = max(1, round(n_atoms ** (1 / 3)))
    grid = [(i, j, k) for i in range(side) for j in range(side) for k in range(side)]
    while len(grid) < n_atoms:  # non-cubic counts: extra sites on a shifted sub-lattice
        i, j, k = grid[len(grid) % (side ** 3)]
        grid.append((i + 0.5, j + 0.5, k + 0.5))
    frac = np.array(grid[:n_atoms], dtype=float) / side
    cell = np.eye(3) * side * spacing
    cell = cell @ (np.eye(3) + np.array([[0.03, 0.02, -0.01], [0.0, -0.02, 0.04], [0.01, 0.0, 0.02]]))
    atoms = ase.Atoms(numbers=chosen, scaled_positions=frac, cell=cell, pbc=True)
    atoms.positions += rng.normal(scale=0.15, size=(n_atoms, 3))
    atoms.wrap()
    return atoms


def default_head(model) -> str:
    heads = list(getattr(model, "heads", None) or ["Default"])
    if len(heads) == 1:
        return heads[0]
    for h in heads:
        if h.lower() == "default":
            return h
    return heads[0]


def atoms_to_batch(model, atoms, dtype: torch.dtype, device, head: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """mace's own path from ase.Atoms to a model input (built on the CPU, then moved)."""
    from mace import data as mace_data
    from mace.tools import torch_geometric, torch_tools, utils

    heads = list(getattr(model, "heads", None) or ["Default"])
    head = head or default_head(model)
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers.cpu().tolist()])
    with torch_tools.default_dtype(dtype):
        config = mace_data.config_from_atoms(atoms, head_name=head)
        data = mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=float(model.r_max), heads=heads)
    loader = torch_geometric.dataloader.DataLoader(dataset=[data], batch_size=1, shuffle=False, drop_last=False)
    batch = next(iter(loader)).to(device)
    out = batch.to_dict()
    for k, v in out.items():
        if torch.is_tensor(v) and torch.is_floating_point(v):
            out[k] = v.to(dtype)
    return out


def evaluate(model, atoms, dtype: torch.dtype, device=None, compute_stress: Optional[bool] = None,
             head: Optional[str] = None, **kwargs) -> Dict[str, Optional[torch.Tensor]]:
    """Energy / forces / stress of ``model`` (already of ``dtype``) on ``atoms``, as float64 CPU tensors."""
    device = device if device is not None else model_device(model)
    batch = atoms_to_batch(model, atoms, dtype, device, head)
    if compute_stress is None:
        compute_stress = bool(np.all(atoms.pbc))
    out = model(batch, training=False, compute_force=True, compute_stress=compute_stress, **kwargs)
    res = {}
    for key in ("energy", "forces", "stress", "hessian", "interaction_energy", "node_energy"):
        v = out.get(key)
        res[key] = v.detach().to("cpu", torch.float64) if v is not None else None
    res["num_edges"] = int(batch["edge_index"].shape[1])
    return res


@dataclasses.dataclass
class ParityResult:
    dtype: str
    device: str
    num_atoms: int
    num_edges: int
    abs: Dict[str, float]
    rel: Dict[str, float]
    tol: Dict[str, float]
    passed: bool

    def __str__(self) -> str:
        parts = [f"{k} abs {self.abs[k]:.2e} rel {self.rel[k]:.2e} (tol {self.tol[k]:.0e})" for k in self.abs]
        verdict = "ok" if self.passed else "FAILED"
        return (f"parity {verdict} [{self.dtype}, {self.device}, {self.num_atoms} atoms, {self.num_edges} edges]: "
                + "; ".join(parts))


def compare(ref: Dict, new: Dict, dtype: torch.dtype, device: str, num_atoms: int,
            tolerances: Optional[Dict[str, float]] = None) -> ParityResult:
    tol = dict(TOLERANCES[dtype])
    tol.update(tolerances or {})
    a, r = {}, {}
    for key in ("energy", "forces", "stress"):
        x, y = ref.get(key), new.get(key)
        if x is None and y is None:
            continue
        if x is None or y is None or x.shape != y.shape:
            raise ParityError(f"{key}: one model returned {None if x is None else tuple(x.shape)}, the other "
                              f"{None if y is None else tuple(y.shape)}")
        d = float((x - y).abs().max()) if x.numel() else 0.0
        scale = float(x.abs().max()) if x.numel() else 0.0
        if not (math.isfinite(d) and math.isfinite(scale)):
            a[key], r[key] = float("nan"), float("nan")
            continue
        a[key] = d
        r[key] = d / scale if scale > 0 else (0.0 if d == 0 else float("inf"))
    passed = all(math.isfinite(r[k]) and r[k] <= tol[k] for k in r)
    return ParityResult(str(dtype).replace("torch.", ""), str(device), num_atoms, int(new.get("num_edges", 0)),
                        a, r, {k: tol[k] for k in r}, passed)


def check_parity(original: torch.nn.Module, accelerated: torch.nn.Module, dtype=None, atoms=None, *,
                 raise_on_failure: bool = True, tolerances: Optional[Dict[str, float]] = None,
                 head: Optional[str] = None) -> ParityResult:
    """Run both models in ``dtype`` (default: the accelerated model's) on ``atoms`` (default:
    :func:`probe_atoms`) on the accelerated model's device, and compare energy, forces and stress.

    Deviations are max |difference| and that divided by the largest reference magnitude. Raises
    :class:`~mace_accel.surgery.errors.ParityError` if a relative deviation exceeds the tolerance (float64:
    1e-10; float32: 1e-5 energy, 1e-4 forces/stress) unless ``raise_on_failure=False``. Neither input is
    modified (copies are cast where needed).
    """
    dt = _dtype(dtype) or model_dtype(accelerated)
    device = model_device(accelerated)
    if atoms is None:
        atoms = probe_atoms(original)

    def prepared(m):
        if model_dtype(m) == dt and model_device(m) == device:
            return m
        return copy.deepcopy(m).to(device=device, dtype=dt)

    ref = evaluate(prepared(original), atoms, dt, device, head=head)
    new = evaluate(prepared(accelerated), atoms, dt, device, head=head)
    result = compare(ref, new, dt, str(device), len(atoms), tolerances)
    if raise_on_failure and not result.passed:
        raise ParityError(f"accelerated model deviates from the original: {result}", result)
    return result
