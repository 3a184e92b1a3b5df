"""Accelerated subclass of mace's ``SymmetricContraction`` (the product basis).

The class swap keeps every sub-module, parameter and buffer of the mace module (same names, same objects);
only ``forward`` changes: the element weights of all outputs and correlation orders are contracted with the
node attributes into per-node weights wn [N, K, C] (one matmul, exact for any node attributes), and one
generated kernel (:func:`mace_accel.ops.sc.sc_fwd`) evaluates the whole polynomial per (node, channel),
without mace's [N, C, (2l+1), L, L] intermediates. The U tensors are read from the module's own buffers.
"""
from __future__ import annotations

from typing import List

import torch
from mace.modules.symmetric_contraction import SymmetricContraction

from ..ops.sc import sc_fwd
from ..plan.sc import register_sc_plan
from ..problem.sc import SCProblem
from .errors import UnsupportedModuleError


def _weights_in_plan_order(sc: SymmetricContraction) -> List[torch.Tensor]:
    """Per output irrep, the weights of correlation 1, 2, .. nu_max ([E, K_nu, C] each)."""
    ws = []
    for con in sc.contractions:
        nu_max = con.correlation
        for nu in range(1, nu_max + 1):
            ws.append(con.weights_max if nu == nu_max else con.weights[nu_max - 1 - nu])
    return ws


def problem_from_mace(sc: SymmetricContraction) -> SCProblem:
    if len(sc.irreps_out) != len(sc.contractions) or not len(sc.contractions):
        raise UnsupportedModuleError("", f"{len(sc.contractions)} contractions for irreps_out {sc.irreps_out}")
    if len({con.num_features for con in sc.contractions}) != 1:
        raise UnsupportedModuleError("", "contractions with different channel counts")
    outputs = []
    for irrep, con in zip(sc.irreps_out, sc.contractions):
        # .numpy() of a float64 CPU buffer is a view: copied (in SCProblem.from_u) so that the problem keeps the
        # values the plan was built from, and a later in-place change of the buffer is detected
        us = [con.U_tensors(nu).detach().cpu().double().numpy() for nu in range(1, con.correlation + 1)]
        outputs.append((str(irrep.ir), us))
    first = sc.contractions[0]
    num_ell = first.U_tensors(1).shape[-2]
    return SCProblem.from_u(first.num_features, num_ell, outputs)


class AcceleratedSymmetricContraction(SymmetricContraction):
    """mace's SymmetricContraction running the generated kernel; ``forward(x [N, C, L], y [N, E])``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        plan = self._sc_plan
        ws = _weights_in_plan_order(self)
        e = ws[0].shape[0]
        if self._sc_check_inputs:
            _check(x, y, plan, e, ws[0])
        w = torch.cat(ws, dim=1) if len(ws) > 1 else ws[0]                  # [E, K, C]
        wn = (y @ w.reshape(e, -1)).reshape(x.shape[0], plan.weight_numel, plan.num_channels)
        return sc_fwd(x.contiguous(), wn, plan.key)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._sc_plan = register_sc_plan(self._sc_problem)

    def _refresh_plan(self) -> None:
        """Re-read the U buffers: the plan always holds exactly the U the mace module would use."""
        if any(b.is_meta for b in self.buffers()):
            return  # no values yet (meta / to_empty initialisation): refreshed when they are loaded
        problem = problem_from_mace(self)
        if problem.key() != self._sc_problem.key():
            self._sc_problem = problem
            self._sc_plan = register_sc_plan(problem)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)  # a cast (float64 -> float32 -> float64) changes U's values
        self._refresh_plan()
        return out


    def extra_repr(self) -> str:
        p = self._sc_plan
        return (f"mace_accel: {self._sc_problem.describe()}, {len(p.monos)} monomials, {p.num_terms} terms")


def _refresh_after_load(module, incompatible_keys) -> None:
    """load_state_dict post-hook: U_matrix_* are buffers (of the child contractions) in the state dict."""
    module._refresh_plan()


def _check(x, y, plan, num_elements, w):
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1:] != (plan.num_channels, plan.num_ell):
        raise ValueError(f"symmetric contraction: x has shape {tuple(getattr(x, 'shape', ()))}, expected "
                         f"[num_nodes, {plan.num_channels}, {plan.num_ell}]")
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape != (x.shape[0], num_elements):
        raise ValueError(f"symmetric contraction: node attributes have shape {tuple(getattr(y, 'shape', ()))}, "
                         f"expected [{x.shape[0]}, {num_elements}]")
    if w.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"symmetric contraction: dtype {w.dtype} is not supported (float32, float64)")
    for name, t in (("x", x), ("node attributes", y)):
        if t.dtype != w.dtype:
            raise ValueError(f"symmetric contraction: {name} has dtype {t.dtype}, the weights {w.dtype}")
        if t.device != w.device:
            raise ValueError(f"symmetric contraction: {name} is on {t.device}, the weights on {w.device}")


def accelerate_symmetric_contraction(sc: torch.nn.Module, check_inputs: bool = True) -> str:
    """Swap ``sc`` (mace's SymmetricContraction) to the accelerated class in place; returns a report line.
    Raises UnsupportedModuleError naming the reason if it cannot."""
    if isinstance(sc, AcceleratedSymmetricContraction):
        return "already accelerated"
    if type(sc) is not SymmetricContraction:
        raise UnsupportedModuleError("", f"{type(sc).__module__}.{type(sc).__qualname__} is not mace's "
                                         "SymmetricContraction")
    try:
        problem = problem_from_mace(sc)
    except (ValueError, NotImplementedError) as e:
        raise UnsupportedModuleError("", str(e)) from None
    sc._sc_problem = problem
    sc._sc_plan = register_sc_plan(problem)
    sc._sc_check_inputs = bool(check_inputs)
    sc._sc_load_hook = sc.register_load_state_dict_post_hook(_refresh_after_load)
    sc.__class__ = AcceleratedSymmetricContraction
    p = sc._sc_plan
    return (f"mace SymmetricContraction -> generated kernels, forward and grad-x ({problem.describe()}; "
            f"{len(p.monos)} monomials, {p.num_terms} terms)")


def restore_symmetric_contraction(sc: torch.nn.Module) -> None:
    if isinstance(sc, AcceleratedSymmetricContraction):
        sc.__class__ = SymmetricContraction
        if "_sc_load_hook" in sc.__dict__:
            sc._sc_load_hook.remove()
        for a in ("_sc_problem", "_sc_plan", "_sc_check_inputs", "_sc_load_hook"):
            if a in sc.__dict__:
                delattr(sc, a)


__all__ = ["AcceleratedSymmetricContraction", "accelerate_symmetric_contraction",
           "restore_symmetric_contraction", "problem_from_mace"]
