"""Pure-PyTorch executor of an :class:`~mace_accel.plan.sc.SCPlan` (symmetric contraction).

Layouts: x [N, C, L] (node features per channel), wn [N, K, C] (per-node weights), out [N, out_dim] with each
output irrep channel-major (c * dim + m) and the irreps one after another, as mace's ``SymmetricContraction``.

Everything here is built from differentiable torch ops, so the same functions also serve as the derivative of
the CUDA backward when a graph is requested (force training, Hessians): any derivative order works.
Work is chunked over nodes so that the largest intermediate stays near ``CHUNK_ELEMENTS``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ...plan.sc import SCPlan

#: Upper bound on the elements of one chunk's largest intermediate ([nodes, C, O * K]).
CHUNK_ELEMENTS = 1 << 22

_CACHE: Dict[tuple, object] = {}


class _Tables:
    """Index tables derived from the plan: the monomials, their sub-monomials and the dense coefficients."""

    def __init__(self, plan: SCPlan, dtype, device):
        monos = list(plan.monos)
        # closure: every monomial with one factor removed, down to degree 0 (the constant 1)
        index = {m: i for i, m in enumerate(monos)}
        frontier = list(monos)
        while frontier:
            nxt = []
            for m in frontier:
                for v in set(m):
                    r = list(m)
                    r.remove(v)
                    r = tuple(r)
                    if r not in index:
                        index[r] = len(index)
                        nxt.append(r)
            frontier = nxt
        self.all = sorted(index, key=lambda m: (len(m), m))
        pos = {m: i for i, m in enumerate(self.all)}
        self.by_degree: List[Tuple[int, torch.Tensor]] = []  # (degree, [n, degree] var indices), in self.all order
        deg = 0
        while True:
            ms = [m for m in self.all if len(m) == deg]
            if not ms and deg > 0:
                break
            if deg > 0:
                self.by_degree.append((deg, torch.tensor(ms, dtype=torch.long, device=device)))
            deg += 1
        self.mono_pos = torch.tensor([pos[m] for m in monos], dtype=torch.long, device=device)
        # derivative table: d monomial p / d x_v = e * sub-monomial q
        dp, dv, de, dq = [], [], [], []
        for p, m in enumerate(monos):
            for v in sorted(set(m)):
                r = list(m)
                r.remove(v)
                dp.append(p), dv.append(v), de.append(float(m.count(v))), dq.append(pos[tuple(r)])
        self.d_p = torch.tensor(dp, dtype=torch.long, device=device)
        self.d_v = torch.tensor(dv, dtype=torch.long, device=device)
        self.d_e = torch.tensor(de, dtype=dtype, device=device)
        self.d_q = torch.tensor(dq, dtype=torch.long, device=device)
        O, P, K = plan.num_outputs, len(monos), plan.weight_numel
        coef = torch.zeros(O, P, K, dtype=torch.float64)
        coef.index_put_((torch.as_tensor(plan.term_o), torch.as_tensor(plan.term_p), torch.as_tensor(plan.term_k)),
                        torch.as_tensor(plan.term_u), accumulate=True)
        self.coef_pok = coef.permute(1, 0, 2).reshape(P, O * K).to(dtype=dtype, device=device)  # [P, O*K]


def _tables(plan: SCPlan, dtype, device) -> _Tables:
    k = (plan.key, dtype, device)
    t = _CACHE.get(k)
    if t is None:
        t = _Tables(plan, dtype, device)
        _CACHE[k] = t
    return t


def _features(tab: _Tables, x: torch.Tensor) -> torch.Tensor:
    """All monomials of the closure, [n, C, len(tab.all)], in ``tab.all`` order (degree 0 first)."""
    n, c, _ = x.shape
    cols = [x.new_ones(n, c, 1)]
    for _, idx in tab.by_degree:
        f = x[:, :, idx[:, 0]]
        for r in range(1, idx.shape[1]):
            f = f * x[:, :, idx[:, r]]
        cols.append(f)
    return torch.cat(cols, dim=2)


def _chunks(plan: SCPlan, n: int):
    per_node = max(plan.num_channels * plan.num_outputs * max(plan.weight_numel, 1), 1)
    step = max(1, CHUNK_ELEMENTS // per_node)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _to_columns(plan: SCPlan, o_major: torch.Tensor) -> torch.Tensor:
    """[n, C, O] -> [n, out_dim] in mace's layout."""
    n = o_major.shape[0]
    parts = [o_major[:, :, base:base + dim].reshape(n, plan.num_channels * dim)
             for base, dim in zip(plan.out_bases, plan.out_dims)]
    return torch.cat(parts, dim=1)


def _from_columns(plan: SCPlan, cols: torch.Tensor) -> torch.Tensor:
    """[n, out_dim] -> [n, C, O]."""
    n = cols.shape[0]
    parts = [cols[:, off:off + plan.num_channels * dim].reshape(n, plan.num_channels, dim)
             for off, dim in zip(plan.col_offsets, plan.out_dims)]
    return torch.cat(parts, dim=2)


def forward(plan: SCPlan, x: torch.Tensor, wn: torch.Tensor) -> torch.Tensor:
    """out[b, (j, c, m)] = sum_terms u * wn[b, k, c] * monomial_p(x[b, c])."""
    tab = _tables(plan, x.dtype, x.device)
    O, K, C = plan.num_outputs, plan.weight_numel, plan.num_channels
    outs = []
    for s, e in _chunks(plan, x.shape[0]):
        f = _features(tab, x[s:e])[:, :, tab.mono_pos]                      # [n, C, P]
        q = (f @ tab.coef_pok).reshape(e - s, C, O, K)                      # [n, C, O, K]
        outs.append((q * wn[s:e].transpose(1, 2).unsqueeze(2)).sum(-1))    # [n, C, O]
    o_major = torch.cat(outs, 0) if outs else x.new_zeros(0, C, O)
    return _to_columns(plan, o_major)


def backward(plan: SCPlan, x: torch.Tensor, wn: torch.Tensor, gout: torch.Tensor, need_x: bool,
             need_w: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx [N, C, L], dw [N, K, C]); an entry not asked for is None."""
    tab = _tables(plan, x.dtype, x.device)
    O, K, C, L = plan.num_outputs, plan.weight_numel, plan.num_channels, plan.num_ell
    g_all = _from_columns(plan, gout)                                       # [N, C, O]
    dxs, dws = [], []
    for s, e in _chunks(plan, x.shape[0]):
        n = e - s
        feats = _features(tab, x[s:e])
        f = feats[:, :, tab.mono_pos]                                       # [n, C, P]
        g = g_all[s:e]
        if need_w:
            q = (f @ tab.coef_pok).reshape(n, C, O, K)
            dws.append((q * g.unsqueeze(-1)).sum(2).transpose(1, 2))        # [n, K, C]
        if need_x:
            gw = (g.unsqueeze(-1) * wn[s:e].transpose(1, 2).unsqueeze(2)).reshape(n, C, O * K)
            gp = gw @ tab.coef_pok.t()                                      # [n, C, P]: d out / d monomial
            contrib = gp[:, :, tab.d_p] * feats[:, :, tab.d_q] * tab.d_e     # [n, C, D]
            dx = x.new_zeros(n, C, L).index_add(2, tab.d_v, contrib)
            dxs.append(dx)
    dx = torch.cat(dxs, 0) if need_x and dxs else (torch.zeros_like(x) if need_x else None)
    dw = torch.cat(dws, 0) if need_w and dws else (torch.zeros_like(wn) if need_w else None)
    return dx, dw
