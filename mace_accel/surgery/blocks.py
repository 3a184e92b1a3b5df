"""Accelerated subclasses of mace-torch 0.3.16's interaction blocks.

Each class subclasses the mace block it replaces, keeps every sub-module and parameter of it (same names,
same objects), and overrides only ``forward``: the forward below is mace 0.3.16's, step for step (LAMMPS
ghost handling, cutoff, density normalisation, ``avg_num_neighbors``, residual ``skip_tp``), except that

* ``conv_tp`` is a :class:`~mace_accel.surgery.conv.FusedConvTP` (gather + tensor product + scatter_sum in
  one :class:`mace_accel.TensorProductConv` call), fed by the unchanged radial MLP ``conv_tp_weights``;
* ``skip_tp`` (when it is the FullyConnectedTensorProduct with the one-hot element attributes) is an
  :class:`~mace_accel.surgery.skip.ElementSkipTP`, which keeps the call signature ``skip_tp(x, node_attrs)``.

``o3.Linear`` layers, the radial MLP, the density MLP, the gate and the reshape stay e3nn/mace modules.
Swapping ``__class__`` back (see :func:`restore_block`) gives the plain mace block.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Type

import torch
from mace.modules import blocks as mb
from mace.tools.scatter import scatter_sum

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

    def forward(
        self,
        node_attrs: torch.Tensor,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_feats: torch.Tensor,
        edge_index: torch.Tensor,
        cutoff: Optional[torch.Tensor] = None,
        lammps_natoms: Tuple[int, int] = (0, 0),
        lammps_class: Optional[Any] = None,
        first_layer: bool = False,
    ) -> Tuple[torch.Tensor, None]:
        n_real = lammps_natoms[0] if lammps_class is not None else None
        node_feats = self.linear_up(node_feats)
        node_feats = self.handle_lammps(node_feats, lammps_class=lammps_class, lammps_natoms=lammps_natoms,
                                        first_layer=first_layer)
        tp_weights = self.conv_tp_weights(edge_feats)
        if cutoff is not None:
            tp_weights = tp_weights * cutoff
        message = self.conv_tp(node_feats, edge_attrs, tp_weights, edge_index)
        message = self.truncate_ghosts(message, n_real)
        node_attrs = self.truncate_ghosts(node_attrs, n_real)
        message = self.linear(message) / self.avg_num_neighbors
        message = self.skip_tp(message, node_attrs)
        return self.reshape(message), None


class AcceleratedRealAgnosticResidualInteractionBlock(AcceleratedBlockMixin, mb.RealAgnosticResidualInteractionBlock):
    _mace_base = mb.RealAgnosticResidualInteractionBlock

    def forward(
        self,
        node_attrs: torch.Tensor,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_feats: torch.Tensor,
        edge_index: torch.Tensor,
        cutoff: Optional[torch.Tensor] = None,
        lammps_class: Optional[Any] = None,
        lammps_natoms: Tuple[int, int] = (0, 0),
        first_layer: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        n_real = lammps_natoms[0] if lammps_class is not None else None
        sc = self.skip_tp(node_feats, node_attrs)
        node_feats = self.linear_up(node_feats)
        node_feats = self.handle_lammps(node_feats, lammps_class=lammps_class, lammps_natoms=lammps_natoms,
                                        first_layer=first_layer)
        tp_weights = self.conv_tp_weights(edge_feats)
        if cutoff is not None:
            tp_weights = tp_weights * cutoff
        message = self.conv_tp(node_feats, edge_attrs, tp_weights, edge_index)
        message = self.truncate_ghosts(message, n_real)
        node_attrs = self.truncate_ghosts(node_attrs, n_real)
        sc = self.truncate_ghosts(sc, n_real)
        message = self.linear(message) / self.avg_num_neighbors
        return self.reshape(message), sc


class AcceleratedRealAgnosticDensityInteractionBlock(AcceleratedBlockMixin, mb.RealAgnosticDensityInteractionBlock):
    _mace_base = mb.RealAgnosticDensityInteractionBlock

    def forward(
        self,
        node_attrs: torch.Tensor,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_feats: torch.Tensor,
        edge_index: torch.Tensor,
        cutoff: Optional[torch.Tensor] = None,
        lammps_class: Optional[Any] = None,
        lammps_natoms: Tuple[int, int] = (0, 0),
        first_layer: bool = False,
    ) -> Tuple[torch.Tensor, None]:
        receiver = edge_index[1]
        num_nodes = node_feats.shape[0]
        n_real = lammps_natoms[0] if lammps_class is not None else None
        node_feats = self.linear_up(node_feats)
        node_feats = self.handle_lammps(node_feats, lammps_class=lammps_class, lammps_natoms=lammps_natoms,
                                        first_layer=first_layer)
        tp_weights = self.conv_tp_weights(edge_feats)
        edge_density = torch.tanh(self.density_fn(edge_feats) ** 2)
        if cutoff is not None:
            tp_weights = tp_weights * cutoff
            edge_density = edge_density * cutoff
        density = scatter_sum(src=edge_density, index=receiver, dim=0, dim_size=num_nodes)
        message = self.conv_tp(node_feats, edge_attrs, tp_weights, edge_index)
        message = self.truncate_ghosts(message, n_real)
        node_attrs = self.truncate_ghosts(node_attrs, n_real)
        density = self.truncate_ghosts(density, n_real)
        message = self.linear(message) / (density + 1)
        message = self.skip_tp(message, node_attrs)
        return self.reshape(message), None


class AcceleratedRealAgnosticDensityResidualInteractionBlock(AcceleratedBlockMixin,
                                                             mb.RealAgnosticDensityResidualInteractionBlock):
    _mace_base = mb.RealAgnosticDensityResidualInteractionBlock

    def forward(
        self,
        node_attrs: torch.Tensor,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_feats: torch.Tensor,
        edge_index: torch.Tensor,
        cutoff: Optional[torch.Tensor] = None,
        lammps_class: Optional[Any] = None,
        lammps_natoms: Tuple[int, int] = (0, 0),
        first_layer: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        receiver = edge_index[1]
        num_nodes = node_feats.shape[0]
        n_real = lammps_natoms[0] if lammps_class is not None else None
        sc = self.skip_tp(node_feats, node_attrs)
        node_feats = self.linear_up(node_feats)
        node_feats = self.handle_lammps(node_feats, lammps_class=lammps_class, lammps_natoms=lammps_natoms,
                                        first_layer=first_layer)
        tp_weights = self.conv_tp_weights(edge_feats)
        edge_density = torch.tanh(self.density_fn(edge_feats) ** 2)
        if cutoff is not None:
            tp_weights = tp_weights * cutoff
            edge_density = edge_density * cutoff
        density = scatter_sum(src=edge_density, index=receiver, dim=0, dim_size=num_nodes)
        message = self.conv_tp(node_feats, edge_attrs, tp_weights, edge_index)
        message = self.truncate_ghosts(message, n_real)
        node_attrs = self.truncate_ghosts(node_attrs, n_real)
        density = self.truncate_ghosts(density, n_real)
        sc = self.truncate_ghosts(sc, n_real)
        message = self.linear(message) / (density + 1)
        return self.reshape(message), sc


class AcceleratedRealAgnosticAttResidualInteractionBlock(AcceleratedBlockMixin,
                                                         mb.RealAgnosticAttResidualInteractionBlock):
    _mace_base = mb.RealAgnosticAttResidualInteractionBlock
    _skip_is_element_tp = False  # its skip connection is an o3.Linear (skip_linear)

    def forward(
        self,
        node_attrs: torch.Tensor,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_feats: torch.Tensor,
        edge_index: torch.Tensor,
        cutoff: Optional[torch.Tensor] = None,
        lammps_class: Optional[Any] = None,
        lammps_natoms: Tuple[int, int] = (0, 0),
        first_layer: bool = False,
    ) -> Tuple[torch.Tensor, None]:
        sender = edge_index[0]
        receiver = edge_index[1]
        n_real = lammps_natoms[0] if lammps_class is not None else None
        sc = self.skip_linear(node_feats)
        node_feats_up = self.linear_up(node_feats)
        node_feats_down = self.linear_down(node_feats)
        node_feats_combined = torch.cat((node_feats_up, node_feats_down), dim=-1)
        node_feats_combined = self.handle_lammps(node_feats_combined, lammps_class=lammps_class,
                                                 lammps_natoms=lammps_natoms, first_layer=first_layer)
        node_feats_up = node_feats_combined[:, : node_feats_up.shape[-1]]
        node_feats_down = node_feats_combined[:, node_feats_up.shape[-1]:]
        augmented_edge_feats = torch.cat([edge_feats, node_feats_down[sender], node_feats_down[receiver]], dim=-1)
        tp_weights = self.conv_tp_weights(augmented_edge_feats)
        if cutoff is not None:
            tp_weights = tp_weights * cutoff
        message = self.conv_tp(node_feats_up, edge_attrs, tp_weights, edge_index)
        message = self.truncate_ghosts(message, n_real)
        sc = self.truncate_ghosts(sc, n_real)
        message = self.linear(message) / self.avg_num_neighbors
        return self.reshape(message), sc


class AcceleratedRealAgnosticResidualNonLinearInteractionBlock(AcceleratedBlockMixin,
                                                               mb.RealAgnosticResidualNonLinearInteractionBlock):
    _mace_base = mb.RealAgnosticResidualNonLinearInteractionBlock
    _skip_is_element_tp = False  # its skip_tp is an o3.Linear

    def forward(
        self,
        node_attrs: torch.Tensor,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_feats: torch.Tensor,
        edge_index: torch.Tensor,
        cutoff: Optional[torch.Tensor] = None,
        lammps_class: Optional[Any] = None,
        lammps_natoms: Tuple[int, int] = (0, 0),
        first_layer: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        num_nodes = node_feats.shape[0]
        n_real = lammps_natoms[0] if lammps_class is not None else None
        sc = self.skip_tp(node_feats)
        node_feats = self.linear_up(node_feats)
        node_feats_res = self.linear_res(node_feats)
        node_feats_attrs = torch.cat([node_feats, node_attrs], dim=-1)
        node_feats_attrs = self.handle_lammps(node_feats_attrs, lammps_class=lammps_class,
                                              lammps_natoms=lammps_natoms, first_layer=first_layer)
        node_feats = node_feats_attrs[:, : node_feats.shape[-1]]
        node_attrs = node_feats_attrs[:, node_feats.shape[-1]:]
        source_embedding = self.source_embedding(node_attrs)
        target_embedding = self.target_embedding(node_attrs)
        edge_feats = torch.cat([edge_feats, source_embedding[edge_index[0]], target_embedding[edge_index[1]]],
                               dim=-1)
        tp_weights = self.conv_tp_weights(edge_feats)
        edge_density = torch.tanh(self.density_fn(edge_feats) ** 2)
        if cutoff is not None:
            tp_weights = tp_weights * cutoff
            edge_density = edge_density * cutoff
        density = scatter_sum(src=edge_density, index=edge_index[1], dim=0, dim_size=num_nodes)
        # mace's unfused path scatters onto num_nodes (the count before LAMMPS ghost padding)
        message = self.conv_tp(node_feats, edge_attrs, tp_weights, edge_index, num_nodes)
        message = self.truncate_ghosts(message, n_real)
        density = self.truncate_ghosts(density, n_real)
        sc = self.truncate_ghosts(sc, n_real)
        node_feats_res = self.truncate_ghosts(node_feats_res, n_real)
        message = self.linear_1(message) / (density * self.beta + self.alpha)
        message = message + node_feats_res
        message = self.equivariant_nonlin(message)
        message = self.linear_2(message)
        return self.reshape(message), sc


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
    if isinstance(getattr(block, "skip_tp", None), ElementSkipTP):
        block.skip_tp = block.skip_tp.to_e3nn()
    block.__class__ = block._mace_base
