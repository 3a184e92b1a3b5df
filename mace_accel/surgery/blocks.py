"""Accelerated subclasses of mace-torch 0.3.16's interaction blocks.

Each class subclasses the mace block it replaces and keeps every sub-module and parameter of it (same names,
same objects). It runs mace 0.3.16's own ``forward``: every mace interaction block has a fused-convolution
path (taken when the block has a ``conv_fusion`` attribute, as for cuEquivariance/OpenEquivariance) that calls
``conv_tp(node_feats, edge_attrs, tp_weights, edge_index)`` in place of the gather, tensor product and
scatter_sum. :func:`accelerate_block` sets that attribute and swaps in

* ``conv_tp``: a :class:`~mace_accel.surgery.conv.FusedConvTP` (gather + tensor product + scatter_sum in
  one :class:`mace_accel.TensorProductConv` call), fed by the radial MLP ``conv_tp_weights`` (its own class
  swap: :mod:`mace_accel.surgery.radial`);
* ``skip_tp`` (when it is the FullyConnectedTensorProduct with the one-hot element attributes) is an
  :class:`~mace_accel.surgery.skip.ElementSkipTP`, which keeps the call signature ``skip_tp(x, node_attrs)``.

The density MLP, the gate and the reshape stay e3nn/mace modules; ``o3.Linear`` layers get
their own class swap (:mod:`mace_accel.surgery.linear`).
Swapping ``__class__`` back (see :func:`restore_block`) gives the plain mace block.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Type

import torch
from mace.modules import blocks as mb

from .conv import FusedConvTP
from .errors import UnsupportedModuleError
from .skip import ElementSkipTP



class AcceleratedBlockMixin:
    """Marker and shared helpers of the accelerated blocks. ``_mace_base`` is the mace class."""

    _mace_base: Type[torch.nn.Module] = None
    #: Whether this block's ``skip_tp`` is the one-hot FullyConnectedTensorProduct mace_accel replaces.
    _skip_is_element_tp: bool = True

    def __init__(self, *args, **kwargs):  # built like the mace block, then accelerated in place
        super().__init__(*args, **kwargs)
        accelerate_block(self)



class AcceleratedRealAgnosticInteractionBlock(AcceleratedBlockMixin, mb.RealAgnosticInteractionBlock):
    _mace_base = mb.RealAgnosticInteractionBlock


class AcceleratedRealAgnosticResidualInteractionBlock(AcceleratedBlockMixin, mb.RealAgnosticResidualInteractionBlock):
    _mace_base = mb.RealAgnosticResidualInteractionBlock


class AcceleratedRealAgnosticDensityInteractionBlock(AcceleratedBlockMixin, mb.RealAgnosticDensityInteractionBlock):
    _mace_base = mb.RealAgnosticDensityInteractionBlock


class AcceleratedRealAgnosticDensityResidualInteractionBlock(AcceleratedBlockMixin,
                                                             mb.RealAgnosticDensityResidualInteractionBlock):
    _mace_base = mb.RealAgnosticDensityResidualInteractionBlock


class AcceleratedRealAgnosticAttResidualInteractionBlock(AcceleratedBlockMixin,
                                                         mb.RealAgnosticAttResidualInteractionBlock):
    _mace_base = mb.RealAgnosticAttResidualInteractionBlock
    _skip_is_element_tp = False  # its skip connection is an o3.Linear (skip_linear)


class AcceleratedRealAgnosticResidualNonLinearInteractionBlock(AcceleratedBlockMixin,
                                                               mb.RealAgnosticResidualNonLinearInteractionBlock):
    _mace_base = mb.RealAgnosticResidualNonLinearInteractionBlock
    _skip_is_element_tp = False  # its skip_tp is an o3.Linear


ACCELERATED: Dict[type, type] = {
    cls._mace_base: cls
    for cls in (
        AcceleratedRealAgnosticInteractionBlock,
        AcceleratedRealAgnosticResidualInteractionBlock,
        AcceleratedRealAgnosticDensityInteractionBlock,
        AcceleratedRealAgnosticDensityResidualInteractionBlock,
        AcceleratedRealAgnosticAttResidualInteractionBlock,
        AcceleratedRealAgnosticResidualNonLinearInteractionBlock,
    )
}


def unsupported_reason(block: torch.nn.Module) -> Optional[str]:
    """Why ``block`` (an interaction-like module) has no accelerated version, or None if it has one."""
    cls = type(block)
    if cls in ACCELERATED:
        return None
    if isinstance(block, AcceleratedBlockMixin):
        return None
    name = f"{cls.__module__}.{cls.__qualname__}"
    bases = [b.__name__ for b in ACCELERATED if isinstance(block, b)]
    if bases:
        return (f"{name} subclasses mace's {bases[0]} but is not that class; its forward may differ from mace "
                f"0.3.16's, so mace_accel has no exact replacement for it")
    return (f"{name} is not an interaction block mace_accel knows (supported: "
            f"{', '.join(sorted(c.__name__ for c in ACCELERATED))})")


def accelerate_block(block: torch.nn.Module, *, deterministic: bool = False, skip_strategy: str = "auto",
                     strict: bool = True) -> List[Tuple[str, str, str, str]]:
    """Accelerate one supported mace block in place. Returns report rows
    (sub-path, class name of the module found there, action, detail).

    Raises UnsupportedModuleError (path relative to the block) if the conv TP cannot be fused, or, with
    ``strict``, if the element skip TP cannot be replaced (without ``strict`` it then stays e3nn).
    """
    rows: List[Tuple[str, str, str, str]] = []
    if isinstance(block, AcceleratedBlockMixin) and isinstance(block.conv_tp, FusedConvTP):
        return [("", type(block).__name__, "kept", "already accelerated")]
    base = type(block) if not isinstance(block, AcceleratedBlockMixin) else block._mace_base
    accel_cls = ACCELERATED.get(base)
    if accel_cls is None:
        raise UnsupportedModuleError("", unsupported_reason(block))
    try:
        conv = FusedConvTP(block.conv_tp, deterministic=deterministic)
    except UnsupportedModuleError as e:
        raise e.at("conv_tp") from None
    skip = None
    if accel_cls._skip_is_element_tp:
        try:
            skip = ElementSkipTP(block.skip_tp, strategy=skip_strategy)
        except UnsupportedModuleError as e:
            if strict:
                raise e.at("skip_tp") from None
            rows.append(("skip_tp", type(block.skip_tp).__name__, "kept", f"left as e3nn: {e.reason}"))
    rows.append(("conv_tp", type(block.conv_tp).__name__, "replaced",
                 f"e3nn TensorProduct + scatter_sum -> mace_accel.TensorProductConv (fused; {conv.extra_repr()})"))
    block.conv_tp = conv
    block.conv_fusion = "mace_accel"  # selects the fused-conv path of mace's own forward
    if skip is not None:
        rows.append(("skip_tp", type(block.skip_tp).__name__, "replaced",
                     f"e3nn FullyConnectedTensorProduct(x, one-hot) -> per-element linear map ({skip.extra_repr()})"))
        block.skip_tp = skip
    block.__class__ = accel_cls
    return rows


def restore_block(block: torch.nn.Module) -> None:
    """Turn an accelerated block back into its mace class with e3nn sub-modules, in place."""
    if not isinstance(block, AcceleratedBlockMixin):
        return
    like = next(block.parameters())
    if isinstance(block.conv_tp, FusedConvTP):
        block.conv_tp = block.conv_tp.to_e3nn(like=like)
        if getattr(block, "conv_fusion", None) == "mace_accel":
            del block.conv_fusion
    if isinstance(getattr(block, "skip_tp", None), ElementSkipTP):
        block.skip_tp = block.skip_tp.to_e3nn()
    block.__class__ = block._mace_base
