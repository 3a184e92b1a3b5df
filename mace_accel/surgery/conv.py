"""The fused message-passing convolution that replaces ``conv_tp`` + ``scatter_sum`` in a MACE block.

mace-torch 0.3.16 builds ``conv_tp`` as ``o3.TensorProduct(edge_irreps, sh_irreps, irreps_mid, instructions,
shared_weights=False, internal_weights=False)`` (mode "uvu", weights from the radial MLP ``conv_tp_weights``)
and sums its per-edge output onto the receivers. :class:`FusedConvTP` computes the same thing with
:class:`mace_accel.TensorProductConv` and keeps mace's calling convention of a fused conv
(``conv_tp(node_feats, edge_attrs, tp_weights, edge_index)``).

e3nn stores only the *final* path coefficients (``Instruction.path_weight`` = sqrt(alpha)), not the
normalisation options that produced them, so :func:`conv_problem_args` finds the options that reproduce the
stored coefficients bit for bit and refuses the module otherwise.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..modules import TensorProductConv
from ..problem import e3nn_path_norms
from .errors import UnsupportedModuleError

_NORMALIZATION_CANDIDATES: Tuple[Tuple[str, str], ...] = (
    ("component", "element"),  # e3nn's defaults, what mace uses
    ("component", "path"),
    ("component", "none"),
    ("norm", "element"),
    ("norm", "path"),
    ("norm", "none"),
    ("none", "element"),
    ("none", "path"),
    ("none", "none"),
)


def find_normalization(irreps_in1, irreps_in2, irreps_out, instructions, mode: str) -> Tuple[str, str]:
    """The (irrep_normalization, path_normalization) with path_weight 1 that reproduce the e3nn module's
    stored coefficients exactly; raises UnsupportedModuleError if none does."""
    raw = [(i.i_in1, i.i_in2, i.i_out, mode, 1.0) for i in instructions]
    stored = [float(i.path_weight) for i in instructions]
    for irrep_norm, path_norm in _NORMALIZATION_CANDIDATES:
        if list(e3nn_path_norms(irreps_in1, irreps_in2, irreps_out, raw, irrep_norm, path_norm)) == stored:
            return irrep_norm, path_norm
    raise UnsupportedModuleError(
        "", "its path coefficients match no e3nn normalisation with unit path weights and unit variances "
            "(custom path_weight / in1_var / in2_var / out_var are not supported)")


def conv_problem_args(tp) -> Dict[str, Any]:
    """Validate an e3nn ``o3.TensorProduct`` as MACE's conv TP and return TensorProductConv's arguments."""
    from e3nn import o3

    if not isinstance(tp, o3.TensorProduct):
        raise UnsupportedModuleError("", f"conv_tp is a {type(tp).__module__}.{type(tp).__qualname__}, "
                                         "not an e3nn o3.TensorProduct")
    if tp.shared_weights or tp.internal_weights:
        raise UnsupportedModuleError("", "conv_tp has shared or internal weights (MACE uses per-edge weights "
                                         "from the radial MLP)")
    modes = {ins.connection_mode for ins in tp.instructions}
    if modes != {"uvu"}:
        raise UnsupportedModuleError("", f"conv_tp uses connection modes {sorted(modes)} (only 'uvu' is fused)")
    if not all(ins.has_weight for ins in tp.instructions):
        raise UnsupportedModuleError("", "conv_tp has 'uvu' paths without weights")
    irrep_norm, path_norm = find_normalization(tp.irreps_in1, tp.irreps_in2, tp.irreps_out, tp.instructions, "uvu")
    return dict(
        irreps_in1=str(tp.irreps_in1),
        irreps_in2=str(tp.irreps_in2),
        irreps_out=str(tp.irreps_out),
        instructions=[(int(i.i_in1), int(i.i_in2), int(i.i_out), "uvu", True, 1.0) for i in tp.instructions],
        irrep_normalization=irrep_norm,
        path_normalization=path_norm,
    )


class FusedConvTP(torch.nn.Module):
    """``scatter_sum(conv_tp(x[sender], edge_attrs, w), receiver)`` in one :class:`TensorProductConv` call.

    ``forward(node_feats, edge_attrs, tp_weights, edge_index)`` is mace's fused-conv calling convention;
    the weights are the radial MLP's output in e3nn's layout, unchanged. No parameters. The e3nn module it
    replaced is kept (unregistered, on the CPU, not listed in ``state_dict``) for
    :func:`mace_accel.surgery.to_e3nn`.
    """

    def __init__(self, e3nn_tp, deterministic: bool = False):
        super().__init__()
        args = conv_problem_args(e3nn_tp)
        self.problem_args = args
        self.fused = TensorProductConv(args["irreps_in1"], args["irreps_in2"], args["irreps_out"],
                                       args["instructions"], irrep_normalization=args["irrep_normalization"],
                                       path_normalization=args["path_normalization"], shared_weights=False,
                                       deterministic=deterministic)
        if self.fused.weight_numel != e3nn_tp.weight_numel:  # pragma: no cover - guards the layout contract
            raise UnsupportedModuleError("", f"weight layout differs: e3nn has {e3nn_tp.weight_numel} weights per "
                                             f"edge, the fused TP {self.fused.weight_numel}")
        self.weight_numel = int(e3nn_tp.weight_numel)
        self.irreps_in1 = e3nn_tp.irreps_in1
        self.irreps_in2 = e3nn_tp.irreps_in2
        self.irreps_out = e3nn_tp.irreps_out
        # Kept on the CPU so that a saved model never holds CUDA tensors it does not need.
        object.__setattr__(self, "_e3nn_original", e3nn_tp.to("cpu"))

    def forward(self, node_feats: torch.Tensor, edge_attrs: torch.Tensor, tp_weights: torch.Tensor,
                edge_index: torch.Tensor, num_nodes: Optional[int] = None) -> torch.Tensor:
        num_nodes = node_feats.shape[0] if num_nodes is None else num_nodes
        return self.fused(node_feats, edge_attrs, tp_weights, edge_index[0], edge_index[1], num_nodes)

    def to_e3nn(self, like: torch.Tensor = None):
        """The original e3nn module, cast to the dtype/device of ``like`` (a tensor of the owning block)."""
        tp = self._e3nn_original
        if like is not None:
            tp = tp.to(device=like.device, dtype=like.dtype)
        return tp

    def extra_repr(self) -> str:
        return (f"{self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out} (+ scatter_sum), "
                f"{self.weight_numel} weights per edge")
