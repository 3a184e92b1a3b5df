"""A CUDA-graph-captured energy + forces (+ stress) step.

Per step, an eager mace call on a 2048-atom system launches about 800 kernels and is bound by host time
(benchmarks/results/step_breakdown_h100.txt: ~28 ms wall for ~10 ms of kernels). :class:`GraphStep` captures
the model call once in a ``torch.cuda.CUDAGraph`` over static input buffers and replays it.

Edges change every MD step, so the edge buffers have a capacity above the current count; the unused tail holds
*null edges*: sender = receiver (spread over the atoms, so no receiver gets a long run of them) and a shift of
length ``NULL_EDGE_LENGTH_FACTOR * r_max``. Beyond the cutoff, mace's radial embedding is exactly zero (its
polynomial envelope is masked with ``x < r_max``), so are the radial MLP's outputs (no biases) and the
tensor-product weights, hence the messages, their gradients and the virial terms: the result is the same as
without padding. Only interaction blocks whose per-edge weights are functions of the radial embedding alone
are allowed (:data:`NULL_EDGE_SAFE_BLOCKS`); others raise. The step is re-captured when the atoms, the
boundary conditions, whether stress is computed, or an edge count above the capacity require it.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

#: Interaction blocks (mace 0.3.16) whose edge weights come from the radial embedding only (zero beyond r_max).
NULL_EDGE_SAFE_BLOCKS = (
    "RealAgnosticInteractionBlock", "RealAgnosticResidualInteractionBlock",
    "RealAgnosticDensityInteractionBlock", "RealAgnosticDensityResidualInteractionBlock",
)
#: Null edges sit at this multiple of r_max (beyond the cutoff, far from it).
NULL_EDGE_LENGTH_FACTOR = 2.0
#: Edge capacity = count * (1 + EDGE_HEADROOM), rounded up to EDGE_CAPACITY_QUANTUM.
EDGE_HEADROOM = 0.15
EDGE_CAPACITY_QUANTUM = 4096
#: Eager calls on a side stream before capture (cuBLAS workspaces, kernel compilation, allocator warm-up).
WARMUP_CALLS = 2
#: cuda_graph="auto" captures systems up to this many atoms (host overhead matters most for small systems;
#: the captured call keeps per-atom gathered skip matrices, N x sum(u*w) elements per layer, in its pool).
AUTO_MAX_ATOMS = 8192


class GraphStepUnsupported(RuntimeError):
    pass


def check_model(model: torch.nn.Module) -> None:
    """Raise GraphStepUnsupported naming the first interaction block whose padded edges would not be exact."""
    for name, mod in model.named_modules():
        if not (hasattr(mod, "conv_tp") and hasattr(mod, "conv_tp_weights")):
            continue
        base = getattr(type(mod), "_mace_base", type(mod))
        if base.__name__ not in NULL_EDGE_SAFE_BLOCKS:
            raise GraphStepUnsupported(
                f"CUDA-graph step: {name} is a {base.__name__}, whose edge weights may not vanish beyond r_max, "
                f"so padded edges would change the result (supported: {', '.join(NULL_EDGE_SAFE_BLOCKS)}); "
                "use cuda_graph=False")


def capacity_for(num_edges: int) -> int:
    want = max(1, math.ceil(num_edges * (1.0 + EDGE_HEADROOM)))
    return -(-want // EDGE_CAPACITY_QUANTUM) * EDGE_CAPACITY_QUANTUM


def null_unit_shift(cell, r_max: float) -> Tuple[Optional[Tuple[int, int, int]], Tuple[float, float, float]]:
    """(integer unit shift or None, Cartesian shift) of a null edge.

    With stress, mace rebuilds shifts as unit_shifts @ cell, so the null edge needs an integer multiple of a
    nonzero cell vector longer than r_max; without stress the Cartesian shift is used as given.
    """
    target = NULL_EDGE_LENGTH_FACTOR * r_max
    best = None
    for i in range(3):
        norm = math.sqrt(sum(float(c) ** 2 for c in cell[i]))
        if norm > 1e-8 and (best is None or norm > best[1]):
            best = (i, norm)
    cart = (target, 0.0, 0.0)
    if best is None:
        return None, cart
    i, norm = best
    k = max(1, math.ceil(target / norm))
    unit = [0, 0, 0]
    unit[i] = k
    cart = tuple(k * float(c) for c in cell[i])
    return tuple(unit), cart


def write_null_edges(edge_index: torch.Tensor, shifts: torch.Tensor, unit_shifts: torch.Tensor, start: int,
                     num_atoms: int, cell_host, r_max: float) -> None:
    """Fill edges [start:] of the buffers with null edges, in place (see the module docstring)."""
    cap = edge_index.shape[1]
    if start >= cap:
        return
    unit, cart = null_unit_shift(cell_host, r_max)
    nodes = torch.arange(start, cap, device=edge_index.device) % num_atoms
    edge_index[:, start:].copy_(nodes.expand(2, -1))
    shifts[start:] = torch.tensor(cart, dtype=shifts.dtype).to(shifts.device)
    unit_shifts[start:] = torch.tensor(unit or (0, 0, 0), dtype=unit_shifts.dtype).to(unit_shifts.device)


class GraphStep:
    """Static buffers + captured graph for one (atoms, pbc, stress) signature and an edge capacity."""

    def __init__(self, model, batch: Dict[str, torch.Tensor], capacity: int, compute_stress: bool,
                 r_max: float, call_context, signature=None):
        self.model = model
        self.signature = signature  # what the static buffers were built for (atom count, pbc, stress)
        self.capacity = int(capacity)
        self.compute_stress = bool(compute_stress)
        self.r_max = float(r_max)
        self.call_context = call_context  # () -> context manager around the model call (grad mode, gathers)
        n = batch["positions"].shape[0]
        dev = batch["positions"].device
        self.num_atoms = n
        self.static = {k: v.clone() for k, v in batch.items() if k not in ("edge_index", "shifts", "unit_shifts")}
        self.static["positions"] = batch["positions"].detach().clone()
        self.static["edge_index"] = torch.empty(2, self.capacity, dtype=torch.long, device=dev)
        self.static["shifts"] = torch.empty(self.capacity, 3, dtype=batch["shifts"].dtype, device=dev)
        self.static["unit_shifts"] = torch.empty(self.capacity, 3, dtype=batch["unit_shifts"].dtype, device=dev)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.outputs: Optional[Dict[str, torch.Tensor]] = None

    def fits(self, signature, batch) -> bool:
        return signature == self.signature and batch["edge_index"].shape[1] <= self.capacity

    def load(self, batch, cell_host) -> None:
        s = self.static
        e = batch["edge_index"].shape[1]
        with torch.no_grad():
            s["positions"].copy_(batch["positions"])
            s["cell"].copy_(batch["cell"])
            s["node_attrs"].copy_(batch["node_attrs"])
            s["edge_index"][:, :e].copy_(batch["edge_index"])
            s["shifts"][:e].copy_(batch["shifts"])
            s["unit_shifts"][:e].copy_(batch["unit_shifts"])
            write_null_edges(s["edge_index"], s["shifts"], s["unit_shifts"], e, self.num_atoms, cell_host,
                             self.r_max)

    def _call(self):
        with self.call_context():
            return self.model(dict(self.static), compute_force=True, compute_stress=self.compute_stress,
                              training=False)

    def run(self, batch, cell_host) -> Dict[str, torch.Tensor]:
        """Load ``batch`` (``cell_host``: the cell as nested lists, for the null edges), capture on first use,
        replay; returns the static output tensors (overwritten by the next replay)."""
        self.load(batch, cell_host)
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self._call()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._call()
            self.outputs = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
            self.graph = graph
        self.graph.replay()
        return self.outputs
