"""Stage 3b: the pure-PyTorch executor of a :class:`~mace_accel.plan.TPPlan`.

It computes the same three functions the CUDA kernels compute -- forward, and the backward triple
(dx, dy, dw) -- from the same plan (dense blocks built from the plan's nonzeros). It is the CPU fallback
and the oracle of the GPU tests. Gather/scatter: ``sender``/``receiver`` of ``None`` mean "edge e is row e".
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ...plan import TPPlan

_DENSE_CACHE: Dict[Tuple[str, int, torch.dtype, torch.device], torch.Tensor] = {}


def _dense(plan: TPPlan, n: int, dtype, device) -> torch.Tensor:
    k = (plan.key, n, dtype, device)
    c = _DENSE_CACHE.get(k)
    if c is None:
        c = torch.as_tensor(plan.paths[n].dense(), dtype=dtype, device=device)
        _DENSE_CACHE[k] = c
    return c


def _edge_weights(plan: TPPlan, w: torch.Tensor, p, num_edges: int) -> torch.Tensor:
    wb = w[..., p.weight_offset:p.weight_offset + p.mul]
    return wb if w.dim() == 2 else wb.unsqueeze(0).expand(num_edges, p.mul)


def forward(plan: TPPlan, x, y, w, sender: Optional[torch.Tensor], receiver: Optional[torch.Tensor],
            num_rows: int, deterministic: bool = False) -> torch.Tensor:
    """out[r] = sum over edges e with receiver[e] = r of TP(x[sender[e]], y[e], w[e])."""
    xe = x if sender is None else x.index_select(0, sender)
    num_edges = y.shape[0]
    out_e = x.new_zeros(num_edges, plan.out_dim)
    for n, p in enumerate(plan.paths):
        xb = xe[:, p.in1_offset:p.in1_offset + p.mul * p.d1].reshape(num_edges, p.mul, p.d1)
        yb = y[:, p.in2_offset:p.in2_offset + p.d2]
        wb = _edge_weights(plan, w, p, num_edges)
        r = torch.einsum("eui,ej,ijk->euk", xb, yb, _dense(plan, n, x.dtype, x.device)) * wb.unsqueeze(-1)
        out_e[:, p.out_offset:p.out_offset + p.mul * p.do] += r.reshape(num_edges, p.mul * p.do)
    if receiver is None:
        return out_e
    return x.new_zeros(num_rows, plan.out_dim).index_add_(0, receiver, out_e)


def backward(plan: TPPlan, x, y, w, gout, sender, receiver, need_x: bool, need_y: bool, need_w: bool,
             deterministic: bool = False):
    """Returns (dx, dy, dw); an entry not asked for is None. dw has w's shape (summed if shared)."""
    num_edges = y.shape[0]
    xe = x if sender is None else x.index_select(0, sender)
    ge = gout if receiver is None else gout.index_select(0, receiver)
    dxe = x.new_zeros(num_edges, plan.in1_dim) if need_x else None
    dy = torch.zeros_like(y) if need_y else None
    dwe = x.new_zeros(num_edges, plan.weight_numel) if need_w else None
    for n, p in enumerate(plan.paths):
        c = _dense(plan, n, x.dtype, x.device)
        xb = xe[:, p.in1_offset:p.in1_offset + p.mul * p.d1].reshape(num_edges, p.mul, p.d1)
        yb = y[:, p.in2_offset:p.in2_offset + p.d2]
        wb = _edge_weights(plan, w, p, num_edges)
        gb = ge[:, p.out_offset:p.out_offset + p.mul * p.do].reshape(num_edges, p.mul, p.do)
        if need_x:
            r = torch.einsum("ej,ijk,euk->eui", yb, c, gb) * wb.unsqueeze(-1)
            dxe[:, p.in1_offset:p.in1_offset + p.mul * p.d1] += r.reshape(num_edges, p.mul * p.d1)
        if need_y:
            dy[:, p.in2_offset:p.in2_offset + p.d2] += torch.einsum("eui,ijk,euk->ej", xb, c, gb * wb.unsqueeze(-1))
        if need_w:
            dwe[:, p.weight_offset:p.weight_offset + p.mul] += torch.einsum("eui,ej,ijk,euk->eu", xb, yb, c, gb)
    dx = None
    if need_x:
        dx = dxe if sender is None else x.new_zeros(x.shape).index_add_(0, sender, dxe)
    dw = None
    if need_w:
        dw = dwe if w.dim() == 2 else dwe.sum(0)
    return dx, dy, dw
