"""Accelerated subclass of e3nn's ``o3.Linear`` (mace's ``linear_up``, the linear after the conv, the product
basis's linear, readouts, embeddings).

e3nn's generated forward takes one ``narrow`` view of the input per input irrep. The backward of a ``narrow`` is a
zero-filled tensor of the whole input with the slice copied in, and the autograd engine then adds those tensors
up: for the linear after mace's conv (2048 nodes, a [2048, 5120] message in 10 irreps) that is 10 zero fills and
9 additions of 42 MB each per backward pass, ~0.5 ms of a 13 ms CUDA-graph force step on the H100
(``benchmarks/results/profile_ops_by_shape_h100.txt``). This forward computes the same map from one
``torch.split`` of the input (its backward is a single ``cat``), with one matrix product per output irrep: the
inputs that feed it side by side, their weights (times e3nn's path weights) stacked.

The class swap keeps the module's parameters, buffers and attributes (same names, same objects); ``to_e3nn``
swaps the class back. Linears with biases, extra feature dimensions or external weights stay e3nn's.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from e3nn import o3

from .swap import ClassSwap


def unsupported_reason(lin: o3.Linear) -> Optional[str]:
    if getattr(lin, "bias_numel", 0) > 0:
        return "has biases"
    if not getattr(lin, "internal_weights", False):
        return "takes external weights"
    if lin.weight.dim() != 1 or lin.weight.numel() != lin.weight_numel:
        return f"weight of shape {tuple(lin.weight.shape)} (extra feature dimensions)"
    return None


class SplitLinear(o3.Linear):
    """e3nn's ``o3.Linear`` (same weights, same result) with a backward that does not zero-fill per input irrep."""

    def forward(self, features: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if weight is not None or bias is not None:
            return super().forward(features, weight, bias)
        cached = self.__dict__.get("_split_routes")
        if cached is None:  # static: built on the first call (the swap keeps e3nn's attributes only)
            cached = self._split_routes = _routes(self)
        sizes, routes = cached
        lead = features.shape[:-1]
        x = features.reshape(-1, self.irreps_in.dim)
        z = x.shape[0]
        parts = torch.split(x, sizes, dim=1)
        cols = []
        for mul, d, feeds in routes:
            if not feeds:
                cols.append(x.new_zeros(z, mul * d))
                continue
            # [z * d, sum of mul_in] @ [sum of mul_in, mul_out]: the inputs' channels side by side per component
            xs = [parts[i].reshape(z, -1, d).transpose(1, 2) for i, _, _, _ in feeds]
            lhs = (xs[0] if len(xs) == 1 else torch.cat(xs, dim=2)).reshape(z * d, -1)
            ws = [self.weight[lo:lo + mul_in * mul].reshape(mul_in, mul) * pw for _, lo, mul_in, pw in feeds]
            y = lhs @ (ws[0] if len(ws) == 1 else torch.cat(ws, dim=0))
            cols.append(y if d == 1 else y.reshape(z, d, mul).transpose(1, 2).reshape(z, mul * d))
        if not cols:
            return x.new_zeros(*lead, 0)
        out = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
        return out.reshape(*lead, self.irreps_out.dim)


def _routes(lin: o3.Linear) -> Tuple[List[int], List[tuple]]:
    """(the input's split sizes, per output irrep of nonzero dimension: (mul_out, ir dim, [(input part, weight
    offset, mul_in, path weight), ...]) in e3nn's instruction and flat-weight order)."""
    feeds: List[list] = [[] for _ in lin.irreps_out]
    offset = 0
    for ins in lin.instructions:
        mul_in, mul_out = lin.irreps_in[ins.i_in].mul, lin.irreps_out[ins.i_out].mul
        if mul_in * mul_out == 0:
            continue
        feeds[ins.i_out].append((ins.i_in, offset, mul_in, ins.path_weight))
        offset += mul_in * mul_out
    return ([mul_ir.dim for mul_ir in lin.irreps_in],
            [(mul_ir.mul, mul_ir.ir.dim, feeds[i]) for i, mul_ir in enumerate(lin.irreps_out) if mul_ir.dim > 0])


LINEAR_SWAP = ClassSwap(
    o3.Linear, SplitLinear, "o3.Linear", "Linear", "linear", unsupported_reason,
    lambda lin: (f"o3.Linear {lin.irreps_in} -> {lin.irreps_out}: one split of the input, one matmul per output "
                 "irrep (no zero fill per input irrep in the backward)"), state=("_split_routes",))
accelerate_linear = LINEAR_SWAP.apply
restore_linear = LINEAR_SWAP.restore
