"""Stage 5a: the public ``nn.Module`` front ends over the torch ops.

The weight layout is exactly e3nn's (``o3.TensorProduct(..., shared_weights=False)``): per edge, the paths'
weights one after another in instruction order, ``mul`` each for "uvu". MACE's radial-MLP output plugs in
unchanged. Modules hold no parameters; weights are inputs.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch

from ..ops import tp_forward
from ..plan import register_plan
from ..problem import TPProblem

_FLOAT_DTYPES = (torch.float32, torch.float64)
# Index tensors already range-checked, keyed by memory and version counter (a model reuses one edge_index in
# every layer and pass; the check reads min/max on the host, so it is done once per graph, not per call).
_CHECKED_INDICES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_CHECKED_MAX = 8


def _check_index_range(name: str, idx: torch.Tensor, bound: int) -> None:
    if idx.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # no host reads while a CUDA graph is captured; the graph's owner fills the index buffers
    key = (idx.data_ptr(), idx.numel(), idx.stride(0), idx._version, idx.dtype, idx.device, bound)
    if key in _CHECKED_INDICES:
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name} holds indices in [{lo}, {hi}], outside [0, {bound})")
    _CHECKED_INDICES[key] = idx  # the reference keeps the memory from being reused while cached
    while len(_CHECKED_INDICES) > _CHECKED_MAX:
        _CHECKED_INDICES.popitem(last=False)


def _check_operand(name: str, t, rows: Optional[int], cols: int, ref: torch.Tensor):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but x has {ref.dtype}; all operands need one dtype")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}")
    expect = (cols,) if rows is None else (rows, cols)
    if tuple(t.shape) != expect:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expect}")


class _TPBase(torch.nn.Module):
    def __init__(self, irreps_in1, irreps_in2, irreps_out, instructions: Sequence, *,
                 irrep_normalization: Optional[str] = None, path_normalization: Optional[str] = None,
                 shared_weights: bool = False, deterministic: bool = False, check_inputs: bool = True):
        super().__init__()
        self.problem = TPProblem.from_e3nn_args(irreps_in1, irreps_in2, irreps_out, instructions,
                                                irrep_normalization, path_normalization, shared_weights)
        self.plan = register_plan(self.problem)
        self.deterministic = bool(deterministic)
        self.check_inputs = bool(check_inputs)

    # Plans live in a per-process registry keyed by a stable string; re-register after unpickling.
    def __setstate__(self, state):
        super().__setstate__(state)
        self.plan = register_plan(self.problem)

    @property
    def irreps_in1(self):
        return self.problem.irreps_in1

    @property
    def irreps_in2(self):
        return self.problem.irreps_in2

    @property
    def irreps_out(self):
        return self.problem.irreps_out

    @property
    def weight_numel(self) -> int:
        return self.problem.weight_numel

    @property
    def shared_weights(self) -> bool:
        return self.problem.shared_weights

    def extra_repr(self) -> str:
        return f"{self.problem.describe()}, deterministic={self.deterministic}"

    def _check_xyw(self, x, y, w, num_edges_from_y: bool = True):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"x has dtype {x.dtype}; supported: float32, float64")
        if x.dim() != 2 or x.shape[1] != self.plan.in1_dim:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [num_nodes, {self.plan.in1_dim}] "
                             f"for irreps_in1 {self.irreps_in1}")
        if not isinstance(y, torch.Tensor) or y.dim() != 2:
            raise ValueError(f"y must be a 2-d tensor [num_edges, {self.plan.in2_dim}]")
        _check_operand("y", y, y.shape[0], self.plan.in2_dim, x)
        _check_operand("w", w, None if self.shared_weights else y.shape[0], self.weight_numel, x)
        if x.is_cuda:
            from ..backends.cuda import check_available

            check_available(x.device)


class TensorProductConv(_TPBase):
    """Fused gather -> tensor product -> scatter-sum (MACE's message passing).

    ``forward(x, y, w, sender, receiver, num_nodes=None)`` returns ``[num_nodes, irreps_out.dim]`` with
    ``out[r] = sum over edges e with receiver[e] == r of TP(x[sender[e]], y[e], w[e])``.
    ``num_nodes`` defaults to ``x.shape[0]``.

    On the GPU each receiver's messages are reduced by one warp (no atomics in the forward pass); the
    receiver grouping of the edges is built once per graph and memoised. ``deterministic=True`` makes every
    pass bitwise reproducible: edges are grouped by a stable sort (fixed order inside a row) and dx is
    reduced per sender in a second pass. ``False`` (default) is faster: the grouping is built with atomics
    (the order inside a row, and so the last bits of the forward, may differ between runs) and dx is
    scattered with atomics.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, sender: torch.Tensor,
                receiver: torch.Tensor, num_nodes: Optional[int] = None) -> torch.Tensor:
        num_nodes = x.shape[0] if num_nodes is None else int(num_nodes)
        if self.check_inputs:
            self._check_xyw(x, y, w)
            num_edges = y.shape[0]
            for name, idx, bound in (("sender", sender, x.shape[0]), ("receiver", receiver, num_nodes)):
                if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
                    raise ValueError(f"{name} must be an int64 or int32 tensor")
                if idx.device != x.device:
                    raise ValueError(f"{name} is on {idx.device} but x is on {x.device}")
                if tuple(idx.shape) != (num_edges,):
                    raise ValueError(f"{name} has shape {tuple(idx.shape)}, expected ({num_edges},) "
                                     "(one entry per row of y)")
                if num_edges and not torch.compiler.is_compiling():
                    _check_index_range(name, idx, bound)
            if num_nodes < 0:
                raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
        return tp_forward(x.contiguous(), y.contiguous(), w.contiguous(), sender.long().contiguous(),
                      receiver.long().contiguous(), num_nodes, self.plan.key, self.deterministic)


class TensorProduct(_TPBase):
    """The same "uvu" tensor product without gather/scatter: ``out[e] = TP(x[e], y[e], w[e])``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.check_inputs:
            self._check_xyw(x, y, w)
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}; they must match")
        return tp_forward(x.contiguous(), y.contiguous(), w.contiguous(), None, None, x.shape[0], self.plan.key,
                      self.deterministic)
