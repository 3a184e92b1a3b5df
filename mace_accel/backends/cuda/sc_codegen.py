"""Render CUDA C++ for a symmetric-contraction plan (:class:`~mace_accel.plan.sc.SCPlan`).

Torch-free and CuPy-free. One thread owns one (node, channel): its L features, its K weights and its
outputs (or their gradients) live in registers; the plan's terms become straight-line code grouped by
monomial. Template: ``kernels/sym_contract.cu``.

The grad-w kernels compute a thread's channel as a 64-bit index (the forward and grad-x kernels keep the
32-bit ``int`` channel they were checked and timed with). With the ``int`` channel, the H100 builds of some
grad-w kernels returned wrong dw (mp-large float64 at 48 channels: weights 128-143 off by 40-100%; a 14-term
cubic polynomial of weight 130 alone was enough), while the same source built for the host with g++ was right,
and so was a ptxas -O1 / -O0 / -G build of the same PTX. The PTX of that 14-term kernel reads right; with an
``int`` channel it computes each column ``first + ch * stride`` as a 64-bit multiply by ``stride << 32`` and a
sign-extending shift, the pattern the 64-bit channel removes. That ptxas miscompiles this pattern is our
explanation, not a proven one: no SASS was read. Building with -fmad=false or ptxas -O1 instead only moved the
wrong weights to other chunks and other dtypes; with the 64-bit channel, every grad-w kernel of the tested plans
is right, and so are the GPU tests that use them (scripts/sc_gradw_probe.py, scripts/sc_diag.py;
benchmarks/results/sc_gradw_probe_h100.txt, sc_gradw_bisect_h100.txt, sc_gradw_trials_h100.txt,
sc_diag_index64_h100.txt, gpu_tests_sc_gradw_h100.log).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Tuple

from ...plan.sc import SCPlan
from ...plan.schedule import WARP_SIZE
from .codegen import fill_template, template_text

KIND_SC_FORWARD, KIND_SC_GRAD_X, KIND_SC_GRAD_W = 0, 1, 2
#: Threads per block: 4 warps, one (node, channel) each.
SC_THREADS_PER_BLOCK = 4 * WARP_SIZE
#: Weights per grad-w kernel (one launch per chunk: only the chunk's accumulators are live).
GRAD_W_CHUNK = 16
_SCALAR = {"float32": "float", "float64": "double"}


@dataclass(frozen=True)
class SCKernelSpec:
    kind: int
    dtype: str  # "float32" | "float64"
    k_lo: int = 0  # grad-w only: this launch's weight range [k_lo, k_hi)
    k_hi: int = 0

    def tag(self) -> str:
        rng = f"_w{self.k_lo}_{self.k_hi}" if self.kind == KIND_SC_GRAD_W else ""
        return f"k{self.kind}_{self.dtype[-2:]}{rng}"


def _lit(v: float) -> str:
    return f"C({v!r})"


def _product(factors: Tuple[int, ...]) -> str:
    """x_a * x_b * .. in sorted order (left to right, so shared prefixes are common subexpressions)."""
    return " * ".join(f"x{v}" for v in factors) if factors else "C(1.0)"


def _weighted(terms: List[Tuple[int, float]]) -> str:
    """sum_k u * w_k as an expression."""
    return " + ".join(f"{_lit(u)} * w{k}" for k, u in terms)


def _grouped(plan: SCPlan) -> Dict[int, Dict[int, List[Tuple[int, float]]]]:
    """mono p -> output o -> [(k, u)], in plan order."""
    by_p: Dict[int, Dict[int, List[Tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for o, p, k, u in plan.terms():
        by_p[p][o].append((k, u))
    return by_p


def _forward_body(plan: SCPlan) -> str:
    lines = []
    for p, outs in sorted(_grouped(plan).items()):
        lines.append(f"    {{ const scalar_t m = {_product(plan.monos[p])};")
        for o, kus in outs.items():
            lines.append(f"      o{o} += ({_weighted(kus)}) * m;")
        lines.append("    }")
    return "\n".join(lines)


def _grad_x_body(plan: SCPlan) -> str:
    """dx[v] = sum_p (sum_o g_o sum_k u w_k) d monomial_p / d x_v, one block per monomial."""
    lines = []
    for p, outs in sorted(_grouped(plan).items()):
        mono = plan.monos[p]
        cg = " + ".join(f"g{o} * ({_weighted(kus)})" for o, kus in outs.items())
        lines.append(f"    {{ const scalar_t cg = {cg};")
        for v in sorted(set(mono)):
            rest = list(mono)
            rest.remove(v)
            e = mono.count(v)
            scale = "" if e == 1 else f"{_lit(float(e))} * "
            lines.append(f"      dx{v} += {scale}cg * ({_product(tuple(rest))});")
        lines.append("    }")
    return "\n".join(lines)


def _grad_w_body(plan: SCPlan, k_lo: int, k_hi: int) -> str:
    """dw[k] for k in [k_lo, k_hi) = sum over k's terms of u g_o monomial_p, one block per monomial (as the
    forward) with only this chunk's accumulators live."""
    by_p: Dict[int, List[Tuple[int, int, float]]] = defaultdict(list)
    for o, p, k, u in plan.terms():
        if k_lo <= k < k_hi:
            by_p[p].append((o, k, u))
    lines = [f"    scalar_t dw{k} = C(0.0);" for k in range(k_lo, k_hi)]
    for p, terms in sorted(by_p.items()):
        lines.append(f"    {{ const scalar_t m = {_product(plan.monos[p])};")
        lines += [f"      dw{k} += ({_lit(u)} * g{o}) * m;" for o, k, u in terms]
        lines.append("    }")
    lines += [f"    dwp[{k} * NUM_CH] = dw{k};" for k in range(k_lo, k_hi)]
    return "\n".join(lines)


def grad_w_chunks(plan: SCPlan) -> List[Tuple[int, int]]:
    """The [k_lo, k_hi) weight ranges of the grad-w launches."""
    k = plan.weight_numel
    return [(lo, min(lo + GRAD_W_CHUNK, k)) for lo in range(0, k, GRAD_W_CHUNK)]


def render_sc(plan: SCPlan, spec: SCKernelSpec) -> Dict[str, str]:
    name = f"mace_accel_sc_{plan.key}_{spec.tag()}"
    L, K, O = plan.num_ell, plan.weight_numel, plan.num_outputs
    cols = [plan.column(o) for o in range(O)]
    used_w = sorted(set(plan.term_k.tolist()))
    subs = {
        "SCALAR": _SCALAR[spec.dtype],
        "KIND": str(spec.kind),
        "NUM_ELL": str(L),
        "NUM_W": str(K),
        "NUM_CH": str(plan.num_channels),
        "OUT_DIM": str(plan.out_dim),
        "THREADS": str(SC_THREADS_PER_BLOCK),
        "NAME": name,
        "LOAD_X": "\n".join(f"    const scalar_t x{i} = xp[{i}];" for i in range(L)),
        "LOAD_W": "\n".join(f"    const scalar_t w{k} = wp[{k} * NUM_CH];" for k in used_w),
        "DECL_OUT": "\n".join(f"    scalar_t o{o} = C(0.0);" for o in range(O)),
        "FORWARD": _forward_body(plan),
        "STORE_OUT": "\n".join(f"    op[{first} + ch * {stride}] = o{o};" for o, (first, stride) in enumerate(cols)),
        "LOAD_G": "\n".join(f"    const scalar_t g{o} = gp[{first} + ch * {stride}];"
                            for o, (first, stride) in enumerate(cols)),
        "DECL_DX": "\n".join(f"    scalar_t dx{i} = C(0.0);" for i in range(L)),
        "GRAD_X": _grad_x_body(plan),
        "STORE_DX": "\n".join(f"    dxp[{i}] = dx{i};" for i in range(L)),
        "GRAD_W": _grad_w_body(plan, spec.k_lo, spec.k_hi) if spec.kind == KIND_SC_GRAD_W else "",
    }
    return {"name": name, "source": fill_template(template_text("sym_contract.cu"), subs)}
