"""Accelerated subclass of e3nn's ``nn.FullyConnectedNet`` (mace's radial MLP ``conv_tp_weights``).

Each hidden layer of e3nn's network computes ``act(x @ (W / sqrt(h_in var_in))) * cst * sqrt(var_out)``, where
``cst`` is the activation's second-moment normalisation (``normalize2mom``): two multiplications by a constant
over the whole [edges, hidden] tensor after the activation, and two more in the backward. On the H100 force step
(160k edges, two radial MLPs of three hidden layers) those are 24 passes over 41 MB, ~0.7 ms of a 10 ms graph
replay (``benchmarks/results/profile_ops_by_shape_h100.txt``). The next layer is linear, so this forward folds
each layer's output constant into the next layer's weight matrix (a [hidden, hidden] multiply) and keeps only the
matrix products and the activations; a constant after the last layer (``out_act=True``) is applied at the end.
The same function, rounded differently at the last bit.

The class swap keeps the module's layers and parameters (same names, same objects); ``to_e3nn`` swaps it back.
"""
from __future__ import annotations

from typing import Optional

import torch
from e3nn import nn as e3nn_nn

from .swap import ClassSwap


def _activation(layer) -> Optional[tuple]:
    """(f, cst) of a layer's ``normalize2mom`` activation, None for a linear layer."""
    act = layer.act
    if act is None:
        return None
    return act.f, (1.0 if act._is_id else float(act.cst))


def unsupported_reason(net: torch.nn.Module) -> Optional[str]:
    from e3nn.math import normalize2mom

    layers = list(net.children())
    if not layers:
        return "no layers"
    for i, layer in enumerate(layers):
        if type(layer).__name__ != "_Layer" or not isinstance(getattr(layer, "weight", None), torch.nn.Parameter):
            return f"layer {i} is a {type(layer).__name__}, not e3nn's _Layer"
        if layer.act is not None and not isinstance(layer.act, normalize2mom):
            return f"layer {i}'s activation is a {type(layer.act).__name__}, not e3nn's normalize2mom"
    return None


class FoldedFullyConnectedNet(e3nn_nn.FullyConnectedNet):
    """e3nn's FullyConnectedNet (same weights, same function) without the constant multiplications."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        carry = 1.0  # the previous layer's output constant, folded into this layer's weights
        for layer in self.children():
            act = _activation(layer)
            if act is None:
                scale = carry / (layer.h_in * layer.var_in / layer.var_out) ** 0.5
                x = x @ (layer.weight * scale)
                carry = 1.0
            else:
                f, cst = act
                x = f(x @ (layer.weight * (carry / (layer.h_in * layer.var_in) ** 0.5)))
                carry = cst * layer.var_out ** 0.5
        return x if carry == 1.0 else x * carry


RADIAL_SWAP = ClassSwap(
    e3nn_nn.FullyConnectedNet, FoldedFullyConnectedNet, "nn.FullyConnectedNet", "FullyConnectedNet", "radial",
    unsupported_reason,
    lambda net: (f"e3nn FullyConnectedNet {list(net.hs)}: activation constants folded into the next layer's "
                 "weights (no constant multiplications over the edges)"))
accelerate_radial = RADIAL_SWAP.apply
restore_radial = RADIAL_SWAP.restore
