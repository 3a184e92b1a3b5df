"""Plan of a symmetric contraction: mace's dense U tensors folded into one sparse polynomial.

Products of x commute, so only the sorted index tuple (a monomial x[i_1] .. x[i_nu], i_1 <= .. <= i_nu)
matters. Its coefficient is the sum of U over the tuple's distinct permutations; with S = the sum of U over
all nu! axis permutations this is S[t] / prod(multiplicity!). The plan lists

* ``monos``: the monomials with a nonzero coefficient somewhere (union over outputs), by degree;
* ``terms``: (o, p, k, u) -- output component o (irrep j, component m), monomial p, weight k and the
  float64 constant u, such that  out[o] = sum_terms u * w[k] * monomial[p].

The CUDA generator unrolls exactly these terms, and the reference executor builds its dense coefficient
tensor from them: one source of truth for both backends.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from ..problem.sc import SCProblem
from .registry import PlanRegistry

#: Coefficients below this fraction of the largest |U| are cancellation noise of the symmetrisation.
ZERO_TOL = 1e-13


@dataclass(frozen=True)
class SCPlan:
    key: str
    num_channels: int
    num_ell: int
    out_dims: Tuple[int, ...]        # per output irrep: 2l + 1
    out_bases: Tuple[int, ...]       # per output irrep: its first component's index o
    col_offsets: Tuple[int, ...]     # per output irrep: first output column (channel-major inside the irrep)
    monos: Tuple[Tuple[int, ...], ...]
    term_o: np.ndarray
    term_p: np.ndarray
    term_k: np.ndarray
    term_u: np.ndarray
    weight_numel: int

    @property
    def num_outputs(self) -> int:
        return sum(self.out_dims)

    @property
    def out_dim(self) -> int:
        return self.num_outputs * self.num_channels

    def terms(self):
        """(o, p, k, u) per term, as Python scalars, in plan order (by monomial, then output, then weight)."""
        return zip(self.term_o.tolist(), self.term_p.tolist(), self.term_k.tolist(), self.term_u.tolist())

    @property
    def num_terms(self) -> int:
        return int(self.term_u.shape[0])

    def column(self, o: int) -> Tuple[int, int]:
        """(first column, column stride over channels) of output component o."""
        for j, (base, dim) in enumerate(zip(self.out_bases, self.out_dims)):
            if base <= o < base + dim:
                return self.col_offsets[j] + (o - base), dim
        raise IndexError(o)



def _symmetrised(u: np.ndarray) -> np.ndarray:
    """Sum over all permutations of the nu index axes (axes 1..nu; axis 0 is m, the last is k)."""
    nu = u.ndim - 2
    s = np.zeros_like(u)
    for perm in itertools.permutations(range(1, nu + 1)):
        s += u.transpose((0,) + perm + (nu + 1,))
    return s


def build_sc_plan(problem: SCProblem) -> SCPlan:
    L = problem.num_ell
    monos: Dict[Tuple[int, ...], int] = {}
    raw = []  # (o, mono tuple, k, u)
    out_dims, out_bases, col_offsets = [], [], []
    o_base, col, k_base = 0, 0, 0
    for out in problem.outputs:
        out_dims.append(out.dim)
        out_bases.append(o_base)
        col_offsets.append(col)
        for nu, u in enumerate(out.u, start=1):
            kn = u.shape[-1]
            scale = float(np.max(np.abs(u))) if u.size else 0.0
            if scale > 0.0:
                s = _symmetrised(u)
                for t in itertools.combinations_with_replacement(range(L), nu):
                    stab = math.prod(math.factorial(t.count(v)) for v in set(t))
                    block = s[(slice(None),) + t] / stab  # [dim, K_nu]
                    for m, k in zip(*np.nonzero(np.abs(block) > ZERO_TOL * scale)):
                        raw.append((o_base + int(m), t, k_base + int(k), float(block[m, k])))
            k_base += kn
        o_base += out.dim
        col += out.dim * problem.num_channels
    for _, t, _, _ in sorted(raw, key=lambda r: (len(r[1]), r[1])):
        monos.setdefault(t, len(monos))
    raw.sort(key=lambda r: (monos[r[1]], r[0], r[2]))
    arr = lambda i, dt: np.array([r[i] for r in raw], dtype=dt)  # noqa: E731
    return SCPlan(
        key=problem.key(), num_channels=problem.num_channels, num_ell=L, out_dims=tuple(out_dims),
        out_bases=tuple(out_bases), col_offsets=tuple(col_offsets), monos=tuple(monos),
        term_o=arr(0, np.int64), term_p=np.array([monos[r[1]] for r in raw], dtype=np.int64),
        term_k=arr(2, np.int64), term_u=arr(3, np.float64), weight_numel=k_base)


_REGISTRY = PlanRegistry(build_sc_plan, "symmetric-contraction", "SymmetricContraction")
register_sc_plan = _REGISTRY.register
get_sc_plan = _REGISTRY.get
