"""ASE calculator for (accelerated) MACE models that builds the model input on the target device.

Unlike mace's own ``MACECalculator`` this does not go through ``AtomicData`` / ``torch_geometric`` /
matscipy: the input dict (positions, one-hot node attributes, edges from the torch neighbour list, shifts,
cell, batch, ptr, head) is assembled directly with torch on the model's device. Per step, the only host
traffic is uploading positions (and cell) and downloading the results in one packed tensor (plus a few
scalar synchronisations inside the neighbour list).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes  # noqa: E402
from ase.data import chemical_symbols  # noqa: E402
from ase.stress import full_3x3_to_voigt_6_stress  # noqa: E402

from .gather import FastRowGather  # noqa: E402
from .graph import AUTO_MAX_ATOMS, GraphStep, GraphStepUnsupported, capacity_for, check_model  # noqa: E402
from .neighbours import check_cell, neighbour_list  # noqa: E402

__all__ = ["MACEAccelCalculator", "build_batch", "load_model"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, torch.float64: torch.float64,
           torch.float32: torch.float32}


def _resolve_dtype(default_dtype) -> torch.dtype:
    try:
        return _DTYPES[default_dtype]
    except KeyError:
        raise ValueError(f"default_dtype must be 'float64' or 'float32', got {default_dtype!r}") from None


def load_model(model: Union[str, Path, torch.nn.Module], device="cpu") -> torch.nn.Module:
    """A mace model from a path (``torch.load(weights_only=False)``) or a copy of the given module."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"MACE model file not found: {path}")
        return torch.load(path, weights_only=False, map_location=torch.device(device))
    if isinstance(model, torch.nn.Module):
        return copy.deepcopy(model)
    raise TypeError(f"model must be a path or a torch.nn.Module, got {type(model).__name__}")


def _cell_volume(cell: np.ndarray) -> float:
    return float(abs(np.linalg.det(cell)))


def build_batch(
    positions: torch.Tensor,
    node_index: torch.Tensor,
    num_elements: int,
    cell: torch.Tensor,
    pbc: Sequence[bool],
    r_max: float,
    *,
    dtype: torch.dtype,
    head: int = 0,
    check: bool = True,
) -> Dict[str, torch.Tensor]:
    """The input dict of a mace model for one structure, built on ``positions.device``.

    Args:
        positions: ``[N, 3]`` (float64 recommended: the neighbour list runs on them before the cast).
        node_index: ``[N]`` int64, index of every atom's element in the model's ``atomic_numbers``.
        num_elements: ``len(model.atomic_numbers)``.
        cell: ``[3, 3]``, rows are cell vectors (rows of open directions may be zero).
        pbc: three booleans.
        r_max: the model's cutoff.
        dtype: floating dtype of the model.
        head: index of the head.
        check: let the neighbour list validate positions and cell (costs device->host syncs).
    """
    dev = positions.device
    n = positions.shape[0]
    edge_index, unit_shifts = neighbour_list(positions, cell, pbc, float(r_max), check=check)
    cell_d = cell.to(device=dev, dtype=dtype)
    unit_shifts_d = unit_shifts.to(dtype)
    return {
        "positions": positions.to(dtype),
        "node_attrs": torch.nn.functional.one_hot(node_index, num_elements).to(dtype),
        "edge_index": edge_index,
        "shifts": unit_shifts_d @ cell_d,
        "unit_shifts": unit_shifts_d,
        "cell": cell_d,
        "batch": torch.zeros(n, dtype=torch.long, device=dev),
        "ptr": torch.tensor([0, n], dtype=torch.long, device=dev),
        "head": torch.tensor([head], dtype=torch.long, device=dev),
        "weight": torch.ones(1, dtype=dtype, device=dev),
        "pbc": torch.tensor([list(bool(p) for p in pbc)], dtype=torch.bool, device=dev),
    }


class MACEAccelCalculator(Calculator):
    """ASE calculator for MACE models (optionally accelerated with :func:`mace_accel.accelerate`).

    Args:
        model: path of a mace ``.model`` file or a mace ``torch.nn.Module`` (it is copied, not modified).
        device: torch device, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        default_dtype: ``"float64"`` or ``"float32"``; the model is cast to it.
        accelerate: replace the model's tensor products with mace_accel's kernels
            (:func:`mace_accel.surgery.accelerate`).
        deterministic: run the model with ``torch.use_deterministic_algorithms(True, warn_only=True)``
            (restored afterwards), so that repeated calls give bitwise identical results on GPUs.
        head: name of the model head to use (default: the only head, or the one called "default").
        cuda_graph: capture the energy/forces/stress call in a CUDA graph and replay it each step, with the
            edges padded to a capacity (:mod:`mace_accel.calculator.graph`). ``"auto"`` (default): on CUDA,
            when not deterministic, every interaction block allows padded edges and the system has at most
            ``graph.AUTO_MAX_ATOMS`` atoms; if a capture fails it warns and runs eagerly. ``True``: always,
            and errors are raised. ``False``: eager calls.
        cuda_graph_cache: how many captured steps are kept, one per (atom count, pbc, stress) signature (NEB
            images or alternating structures replay their own graph instead of re-capturing); the least
            recently used one is freed first. Each holds its static buffers and the graph's memory.

    Properties: ``energy`` and ``free_energy`` (eV), ``forces`` (eV/Å), ``stress`` (eV/Å^3, Voigt order
    xx yy zz yz xz xy, ASE sign convention; available when the cell has a nonzero volume, for open or mixed
    boundary conditions it is the virial divided by that cell's volume), ``energies`` (per-atom energies in
    eV, including the isolated-atom energies E0; they sum to ``energy``).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model: Union[str, Path, torch.nn.Module],
        device: Union[str, torch.device] = "cpu",
        default_dtype: str = "float64",
        accelerate: bool = True,
        deterministic: bool = False,
        head: Optional[str] = None,
        cuda_graph: Union[bool, str] = "auto",
        cuda_graph_cache: int = 4,
        **kwargs,
    ):
        Calculator.__init__(self, **kwargs)
        self.device = torch.device(device)
        self.dtype = _resolve_dtype(default_dtype)
        self.default_dtype = "float64" if self.dtype == torch.float64 else "float32"
        self.deterministic = bool(deterministic)
        self.accelerated = bool(accelerate)

        model = load_model(model, device=self.device)
        for attr in ("atomic_numbers", "r_max"):
            if not hasattr(model, attr):
                raise TypeError(f"model has no attribute {attr!r}: not a mace model?")
        model = model.to(device=self.device, dtype=self.dtype)
        if accelerate:
            from mace_accel.surgery import accelerate as _accelerate  # lazy: optional/heavy

            kw = {"dtype": self.dtype, "device": self.device}
            try:
                if "deterministic" in inspect.signature(_accelerate).parameters:
                    kw["deterministic"] = self.deterministic
            except (TypeError, ValueError):
                pass
            model = _accelerate(model, **kw)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model

        self.atomic_numbers = [int(z) for z in model.atomic_numbers]
        self.r_max = float(model.r_max)
        self._z_lookup = np.full(max(self.atomic_numbers + [118]) + 1, -1, dtype=np.int64)
        self._z_lookup[self.atomic_numbers] = np.arange(len(self.atomic_numbers))

        heads = list(getattr(model, "heads", None) or ["Default"])
        self.available_heads = heads
        if head is None:
            if len(heads) == 1:
                head = heads[0]
            else:
                default = [h for h in heads if h.lower() == "default"]
                if not default:
                    raise ValueError(f"the model has several heads {heads}; choose one with head=...")
                head = default[0]
        if head not in heads:
            raise ValueError(f"head {head!r} not in the model's heads {heads}")
        self.head = head
        self._head_index = heads.index(head)
        self._node_cache: Optional[tuple] = None

        if cuda_graph not in (True, False, "auto"):
            raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
        use_graph = bool(cuda_graph) and self.device.type == "cuda" and not self.deterministic
        if use_graph:
            try:
                check_model(model)
            except GraphStepUnsupported:
                if cuda_graph is True:
                    raise
                use_graph = False
        if cuda_graph is True and not use_graph:
            raise ValueError("cuda_graph=True needs a CUDA device and deterministic=False")
        self.cuda_graph = use_graph
        self._cuda_graph_option = cuda_graph
        if isinstance(cuda_graph_cache, bool) or not isinstance(cuda_graph_cache, int) or cuda_graph_cache < 1:
            raise ValueError(f"cuda_graph_cache must be an int >= 1, got {cuda_graph_cache!r}")
        self.cuda_graph_cache = cuda_graph_cache
        self._graph_steps: "OrderedDict[tuple, GraphStep]" = OrderedDict()  # least recently used first

    # ------------------------------------------------------------------ input
    def _check_atoms(self, atoms) -> None:
        if atoms is None or len(atoms) == 0:
            raise ValueError("MACEAccelCalculator: the Atoms object is empty (no atoms)")
        pos = atoms.get_positions()
        if not np.all(np.isfinite(pos)):
            bad = np.where(~np.isfinite(pos).all(axis=1))[0]
            raise ValueError(f"positions contain NaN or inf (atoms {bad[:10].tolist()}"
                             f"{' ...' if len(bad) > 10 else ''})")
        numbers = atoms.get_atomic_numbers()
        in_table = numbers < len(self._z_lookup)
        known = np.zeros(len(numbers), dtype=bool)
        known[in_table] = self._z_lookup[numbers[in_table]] >= 0
        if not known.all():
            missing = sorted(set(int(z) for z in numbers[~known]))
            names = ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z)
                              for z in missing)
            have = ", ".join(chemical_symbols[z] for z in self.atomic_numbers)
            raise ValueError(f"element(s) {names} not supported by the model (it knows {have})")
        pbc = tuple(bool(p) for p in atoms.pbc)
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        if any(pbc):
            check_cell(torch.from_numpy(cell), pbc)

    def _node_index(self, numbers: np.ndarray) -> torch.Tensor:
        cache = self._node_cache
        if cache is not None and cache[0].shape == numbers.shape and np.array_equal(cache[0], numbers):
            return cache[1]
        idx = torch.from_numpy(self._z_lookup[numbers]).to(self.device)
        self._node_cache = (numbers.copy(), idx)
        return idx

    def build_batch(self, atoms) -> Dict[str, torch.Tensor]:
        """The model input dict for ``atoms`` (validated), on the calculator's device."""
        self._check_atoms(atoms)
        positions = torch.as_tensor(atoms.get_positions(), dtype=torch.float64).to(self.device)
        cell = torch.as_tensor(np.asarray(atoms.cell.array), dtype=torch.float64)  # the neighbour list reads it here
        return build_batch(
            positions,
            self._node_index(atoms.get_atomic_numbers()),
            len(self.atomic_numbers),
            cell,
            tuple(bool(p) for p in atoms.pbc),
            self.r_max,
            dtype=self.dtype,
            head=self._head_index,
            check=False,  # validated on the host by _check_atoms
        )

    # ------------------------------------------------------------------ compute
    @contextlib.contextmanager
    def _determinism(self):
        if not self.deterministic:
            yield
            return
        prev = torch.are_deterministic_algorithms_enabled()
        prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn)

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        if properties is None:
            properties = self.implemented_properties
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        batch = self.build_batch(atoms)
        n = len(atoms)
        has_volume = _cell_volume(atoms.cell.array) > 1e-12
        out = None
        if self._use_graph(n):
            try:
                out = self._graph_call(batch, atoms, has_volume)
            except RuntimeError as exc:
                if self._cuda_graph_option is True:
                    raise
                # "auto": say why, then run eagerly from now on (the results below are computed either way)
                self._graph_steps.clear()
                self.cuda_graph = False
                warnings.warn(f"MACEAccelCalculator: CUDA-graph capture failed, running eager model calls "
                              f"from now on (pass cuda_graph=False to silence this): {type(exc).__name__}: {exc}",
                              RuntimeWarning, stacklevel=2)
        if out is None:
            with self._call_context():
                out = self.model(batch, compute_force=True, compute_stress=has_volume, training=False)
        parts = [out["energy"].detach().reshape(1), out["node_energy"].detach().reshape(n),
                 out["forces"].detach().reshape(3 * n)]
        if has_volume:
            parts.append(out["stress"].detach().reshape(9))
        flat = torch.cat([p.to(torch.float64) for p in parts]).cpu().numpy()  # one device->host copy

        energy = float(flat[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": flat[1:1 + n].copy(),
            "forces": flat[1 + n:1 + 4 * n].reshape(n, 3).copy(),
        }
        if has_volume:
            self.results["stress"] = full_3x3_to_voigt_6_stress(flat[1 + 4 * n:].reshape(3, 3))

    @contextlib.contextmanager
    def _call_context(self):
        gather = FastRowGather() if (self.device.type == "cuda" and not self.deterministic) \
            else contextlib.nullcontext()
        with self._determinism(), torch.enable_grad(), gather:
            yield

    def _graph_call(self, batch, atoms, has_volume: bool):
        """The model call through a captured CUDA graph (see :mod:`mace_accel.calculator.graph`), one per
        signature, at most ``cuda_graph_cache`` of them."""
        signature = (len(atoms), tuple(bool(p) for p in atoms.pbc), bool(has_volume))
        step = self._graph_steps.get(signature)
        if step is None or not step.fits(signature, batch):
            self._graph_steps.pop(signature, None)  # a capture too small for this edge count: free it first
            while len(self._graph_steps) >= self.cuda_graph_cache:
                self._graph_steps.popitem(last=False)  # the least recently used
            try:
                step = self._capture(batch, has_volume, signature)
            except torch.cuda.OutOfMemoryError:
                if not self._graph_steps:
                    raise
                self._graph_steps.clear()  # the other signatures' graphs hold memory: free them, try once more
                torch.cuda.empty_cache()
                step = self._capture(batch, has_volume, signature)
            self._graph_steps[signature] = step
        self._graph_steps.move_to_end(signature)
        return step.run(batch, np.asarray(atoms.cell.array, dtype=np.float64).tolist())

    def _capture(self, batch, has_volume: bool, signature):
        return GraphStep(self.model, batch, capacity_for(batch["edge_index"].shape[1]), has_volume, self.r_max,
                         self._call_context, signature)

    def _use_graph(self, n: int) -> bool:
        if not self.cuda_graph:
            return False
        return self._cuda_graph_option is True or n <= AUTO_MAX_ATOMS

    def get_property(self, name, atoms=None, allow_calculation=True):
        if name == "stress":
            a = atoms if atoms is not None else self.atoms
            if a is not None and _cell_volume(a.cell.array) <= 1e-12:
                raise PropertyNotImplementedError(
                    "stress is not defined for a cell with zero volume (give the Atoms a cell, e.g. a box "
                    "around a molecule)"
                )
        return Calculator.get_property(self, name, atoms, allow_calculation)

    def __repr__(self) -> str:
        return (f"MACEAccelCalculator(device={str(self.device)!r}, default_dtype={self.default_dtype!r}, "
                f"accelerate={self.accelerated}, elements={[chemical_symbols[z] for z in self.atomic_numbers]}, "
                f"r_max={self.r_max})")
