"""Torch-free description of MACE's symmetric contraction (the product basis, MACE paper Eq. 10-11).

For every node b and channel c, with x = node features [num_ell] of that (b, c) and per-node weights
w[k] = sum_e y[b, e] W[e, k, c] (y: node attributes, one-hot elements in MACE), each output irrep j with
correlation nu_max gives

    out_j[m] = sum_{nu=1..nu_max} sum_{i_1..i_nu} sum_k U_{j,nu}[m, i_1, .., i_nu, k] w_{j,nu}[k] x[i_1] .. x[i_nu]

The U tensors are mace's own generalised Clebsch-Gordan buffers (``U_matrix_<nu>``), taken verbatim, so
whatever basis a checkpoint was built with is reproduced. This class only holds them (float64) and checks
the shapes; the planner turns them into a sparse polynomial (:mod:`mace_accel.plan.sc`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence, Tuple

import numpy as np

#: Highest correlation order the planner unrolls (MACE uses 1..3; 4 is the largest seen in published models).
MAX_CORRELATION = 4


@dataclass(frozen=True)
class SCOutput:
    """One output irrep (multiplicity = the channels): dimension ``dim`` = 2l + 1 and one U per order."""

    irrep: str  # e.g. "1o"
    dim: int
    u: Tuple[np.ndarray, ...]  # u[nu-1] has shape [dim, num_ell x nu, K_nu] (float64)

    @property
    def correlation(self) -> int:
        return len(self.u)

    @property
    def num_params(self) -> Tuple[int, ...]:
        return tuple(int(a.shape[-1]) for a in self.u)


@dataclass(frozen=True)
class SCProblem:
    num_channels: int
    num_ell: int
    outputs: Tuple[SCOutput, ...]
    weight_numel: int = field(default=0)  # K_total: the per-(node, channel) weights, all outputs and orders

    @classmethod
    def from_u(cls, num_channels: int, num_ell: int, outputs: Sequence[Tuple[str, Sequence[np.ndarray]]]):
        """``outputs``: (irrep string, [U_1, U_2, ..]) per output irrep; U_nu as mace stores it, where an
        output of dimension 1 has no leading m axis."""
        if num_channels < 1 or num_ell < 1:
            raise ValueError(f"num_channels={num_channels}, num_ell={num_ell}: both must be positive")
        outs = []
        for irrep, us in outputs:
            l = int(str(irrep)[:-1])
            dim = 2 * l + 1
            if not 1 <= len(us) <= MAX_CORRELATION:
                raise NotImplementedError(f"symmetric contraction to {irrep} with correlation {len(us)} "
                                          f"(supported: 1..{MAX_CORRELATION})")
            fixed = []
            for nu, u in enumerate(us, start=1):
                u = np.array(u, dtype=np.float64, copy=True)  # own copy: never a view of a live buffer
                if dim == 1 and u.ndim == nu + 1:
                    u = u[None]
                want = (dim,) + (num_ell,) * nu
                if u.ndim != nu + 2 or u.shape[:-1] != want:
                    raise ValueError(f"U for {irrep}, correlation {nu}: shape {u.shape}, expected {want} + (K,)")
                if not np.all(np.isfinite(u)):
                    raise ValueError(f"U for {irrep}, correlation {nu} holds non-finite values")
                fixed.append(u)
            outs.append(SCOutput(str(irrep), dim, tuple(fixed)))
        if not outs:
            raise NotImplementedError("a symmetric contraction with no outputs")
        k = sum(sum(o.num_params) for o in outs)
        return cls(int(num_channels), int(num_ell), tuple(outs), k)

    @property
    def out_dim(self) -> int:
        """Columns of the output: per irrep, channel-major (c * dim + m), irreps one after another."""
        return sum(o.dim for o in self.outputs) * self.num_channels

    def key(self) -> str:
        h = hashlib.sha256()
        h.update(repr((self.num_channels, self.num_ell)).encode())
        for o in self.outputs:
            h.update(o.irrep.encode())
            for u in o.u:
                h.update(repr(u.shape).encode())
                h.update(np.ascontiguousarray(u).tobytes())
        return "sc" + h.hexdigest()[:22]

    def describe(self) -> str:
        outs = "+".join(f"{o.irrep}(nu<={o.correlation})" for o in self.outputs)
        return f"SCProblem({self.num_channels} channels, num_ell={self.num_ell} -> {outs}, K={self.weight_numel})"
