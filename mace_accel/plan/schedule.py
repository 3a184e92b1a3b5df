"""The static schedule: per path, the CG nonzeros (normalisation folded in) and every layout offset.

Work decomposition shared by all kernels (see docs/design.md):

* channels ``u`` of ``irreps_in1`` are split into *chunks* of :data:`WARP_SIZE`; one warp owns one
  (work item, chunk) pair and each lane owns one channel, so a lane's accumulators are the output
  components of its own channel only;
* a *work item* is a run of edges sharing an output row (a receiver segment in the deterministic variant,
  a fixed block of :data:`EDGES_PER_WARP` edges in the atomic one).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from ..problem import TPProblem
from .cg import wigner_3j
from .registry import PlanRegistry

#: Threads of a warp; one lane per channel.
WARP_SIZE = 32
#: Warps in one thread block of the conv kernels.
WARPS_PER_BLOCK = 4
#: Edges a warp walks in the atomic variant (over receiver-sorted edges) before it flushes and stops: the
#: default work item of the runs kernels (codegen.RUN_EDGES chooses it per kernel).
EDGES_PER_WARP = 32


@dataclass(frozen=True)
class PathPlan:
    index: int  # instruction index
    l1: int
    l2: int
    lo: int
    mul: int  # channels (multiplicity of in1 = of out)
    d1: int
    d2: int
    do: int
    in1_block: int
    in2_block: int
    out_block: int
    in1_offset: int  # element offset of the block in a row of x
    in2_offset: int
    out_offset: int
    weight_offset: int
    # (i, j, k, coefficient): out[u, k] += w[u] * coefficient * x[u, i] * y[j]
    nonzeros: Tuple[Tuple[int, int, int, float], ...]

    def dense(self) -> np.ndarray:
        """The path's [d1, d2, do] coefficient block built from the nonzeros (for the reference executor)."""
        c = np.zeros((self.d1, self.d2, self.do))
        for i, j, k, v in self.nonzeros:
            c[i, j, k] = v
        return c


@dataclass(frozen=True)
class TPPlan:
    problem: TPProblem
    key: str
    paths: Tuple[PathPlan, ...]
    in1_dim: int
    in2_dim: int
    out_dim: int
    weight_numel: int
    num_chunks: int  # ceil(max_mul / WARP_SIZE)

    # Derived facts the launcher and the code generator both need: computed once per plan (the unused_*
    # flags are read on every launch).
    @functools.cached_property
    def unused_in1(self) -> bool:
        """Some block of irreps_in1 feeds no path (its gradient is zero, and no kernel writes it)."""
        return {p.in1_block for p in self.paths} != set(range(len(self.problem.irreps_in1)))

    @functools.cached_property
    def unused_in2(self) -> bool:
        return {p.in2_block for p in self.paths} != set(range(len(self.problem.irreps_in2)))

    @functools.cached_property
    def unused_out(self) -> bool:
        """Some block of irreps_out receives no path (it is zero, and no kernel writes it)."""
        return {p.out_block for p in self.paths} != set(range(len(self.problem.irreps_out)))

    @functools.cached_property
    def lane_in1_dim(self) -> int:
        """Components of one channel over the in1 blocks the paths read (values a lane holds per operand)."""
        return lane_dims(self.paths)[0]

    @functools.cached_property
    def lane_out_dim(self) -> int:
        """Components of one channel over the output blocks the paths write (a lane's accumulators)."""
        return lane_dims(self.paths)[2]

    @property
    def nnz(self) -> int:
        return sum(len(p.nonzeros) for p in self.paths)

    def flops_per_edge(self) -> Dict[str, int]:
        """Multiply-adds counted as 2 flops, per edge, over all channels."""
        fwd = sum(p.mul * (2 * len(p.nonzeros) + 2 * p.do) for p in self.paths)
        return {"forward": fwd, "backward": 3 * fwd}


def build_plan(problem: TPProblem) -> TPPlan:
    in1, in2, out = problem.irreps_in1, problem.irreps_in2, problem.irreps_out
    o1, o2, oo = in1.offsets, in2.offsets, out.offsets
    paths = []
    for n, ins in enumerate(problem.instructions):
        a, b, c = in1[ins.i_in1], in2[ins.i_in2], out[ins.i_out]
        block = wigner_3j(a.ir.l, b.ir.l, c.ir.l)
        nz = tuple(
            (int(i), int(j), int(k), float(block[i, j, k] * ins.norm))
            for i, j, k in zip(*np.nonzero(block))
        )
        paths.append(PathPlan(
            index=n, l1=a.ir.l, l2=b.ir.l, lo=c.ir.l, mul=a.mul,
            d1=a.ir.dim, d2=b.ir.dim, do=c.ir.dim,
            in1_block=ins.i_in1, in2_block=ins.i_in2, out_block=ins.i_out,
            in1_offset=o1[ins.i_in1], in2_offset=o2[ins.i_in2], out_offset=oo[ins.i_out],
            weight_offset=ins.weight_offset, nonzeros=nz,
        ))
    max_mul = max(p.mul for p in paths)
    return TPPlan(
        problem=problem, key=problem.key(), paths=tuple(paths),
        in1_dim=in1.dim, in2_dim=in2.dim, out_dim=out.dim, weight_numel=problem.weight_numel,
        num_chunks=max(1, -(-max_mul // WARP_SIZE)),
    )


# ---- registry: torch ops receive a plan key (a string) and look the plan up here ---------------------
_REGISTRY = PlanRegistry(build_plan, "tensor-product", "TensorProduct/TensorProductConv")
register_plan = _REGISTRY.register
get_plan = _REGISTRY.get


def lane_dims(paths) -> Tuple[int, int, int]:
    """Components of one channel a lane holds for these paths (a plan's, or one output part's): (in1 values,
    in2 values, output values), each block counted once."""
    in1 = {p.in1_block: p.d1 for p in paths}
    in2 = {p.in2_block: p.d2 for p in paths}
    out = {p.out_block: p.do for p in paths}
    return sum(in1.values()), sum(in2.values()), sum(out.values())


def split_outputs(plan: TPPlan, max_lane_values: int) -> Tuple[Tuple[int, ...], ...]:
    """Partition the paths into *parts* of whole output blocks, so that a lane's share of the output row
    (the sum of the parts' block dimensions) stays within ``max_lane_values`` where a block allows it.

    A kernel runs one warp per (item, part, chunk): every part re-reads the item's x and y rows (L2 hits) but
    reads only its own paths' weights, so splitting costs little memory traffic and cuts the registers a lane
    needs. Returns tuples of positions in ``plan.paths`` (plan order kept inside a part); one part when the
    whole row fits. Blocks are dealt largest first to the lightest part, with the fewest parts that fit.
    """
    blocks: Dict[int, int] = {}
    for p in plan.paths:
        blocks[p.out_block] = p.do
    total = sum(blocks.values())
    if total <= max_lane_values or len(blocks) == 1:
        return (tuple(range(len(plan.paths))),)
    for n in range(min(len(blocks), max(2, -(-total // max_lane_values))), len(blocks) + 1):
        loads = [0] * n
        owner: Dict[int, int] = {}
        for b, d in sorted(blocks.items(), key=lambda kv: (-kv[1], kv[0])):
            k = min(range(n), key=lambda i: (loads[i], i))
            owner[b] = k
            loads[k] += d
        if max(loads) <= max_lane_values:
            break
    parts = [tuple(i for i, p in enumerate(plan.paths) if owner[p.out_block] == k) for k in range(n)]
    return tuple(p for p in parts if p)
