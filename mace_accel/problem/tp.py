"""The tensor-product problem: e3nn's constructor arguments, validated, with e3nn's normalisation.

Supported (everything mace-torch's convolution builds): connection mode ``"uvu"`` with weights, any
multiplicity of ``irreps_in1``, multiplicity 1 for ``irreps_in2`` (the spherical harmonics), any l up to
:data:`MAX_L`, ``irrep_normalization`` "component" / "norm" / "none", ``path_normalization``
"element" / "path" / "none", per-edge (``shared_weights=False``) or shared weights.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

from .irreps import Irreps

#: Largest l of any operand the generated kernels and the CG table support.
MAX_L = 6
IRREP_NORMALIZATIONS = ("component", "norm", "none")
PATH_NORMALIZATIONS = ("element", "path", "none")
SUPPORTED_MODES = ("uvu",)


@dataclass(frozen=True)
class Instruction:
    """One path ``in1[i_in1] x in2[i_in2] -> out[i_out]``.

    ``path_weight`` is the user's extra factor (e3nn's, default 1); ``norm`` is the final coefficient that
    multiplies the Wigner 3j block: sqrt(irrep_norm / path_norm * path_weight), exactly as e3nn 0.4.4.
    ``weight_offset`` is where this path's weights start in the flat weight vector (e3nn's order).
    """

    i_in1: int
    i_in2: int
    i_out: int
    mode: str
    has_weight: bool
    path_weight: float
    norm: float
    weight_offset: int
    weight_numel: int


def _num_elements(mode: str, mul1: int, mul2: int) -> int:
    """e3nn 0.4.4's count of summed elements per path (the modes mace_accel meets)."""
    try:
        return {"uvu": mul2, "uvw": mul1 * mul2}[mode]
    except KeyError:
        raise NotImplementedError(f"normalisation of connection mode {mode!r}") from None


def e3nn_path_norms(irreps_in1, irreps_in2, irreps_out, instructions, irrep_normalization: str,
                    path_normalization: str) -> Tuple[float, ...]:
    """The coefficient e3nn 0.4.4 stores per instruction (sqrt(alpha), unit input/output variances), computed
    with the same sequence of floating-point operations, so it matches e3nn bit for bit.

    ``instructions``: (i_in1, i_in2, i_out, mode, path_weight) tuples. The single source of this formula:
    :class:`TPProblem` and the model surgery (which identifies a module's normalisation) both use it.
    """
    in1, in2, out = Irreps(irreps_in1), Irreps(irreps_in2), Irreps(irreps_out)
    norms = []
    for (i1, i2, io, mode, pw) in instructions:
        if irrep_normalization == "component":
            alpha = out[io].ir.dim
        elif irrep_normalization == "norm":
            alpha = in1[i1].ir.dim * in2[i2].ir.dim
        else:
            alpha = 1
        same_out = [r for r in instructions if r[2] == io]
        if path_normalization == "element":
            x = sum(1.0 * 1.0 * _num_elements(r[3], in1[r[0]].mul, in2[r[1]].mul) for r in same_out)
        elif path_normalization == "path":
            x = 1.0 * 1.0 * _num_elements(mode, in1[i1].mul, in2[i2].mul)
            x *= len(same_out)
        else:
            x = 1
        if x > 0.0:
            alpha /= x
        alpha *= 1.0  # out_var
        alpha *= pw
        norms.append(math.sqrt(alpha))
    return tuple(norms)


def _parse_instruction(ins) -> Tuple[int, int, int, str, bool, float]:
    if hasattr(ins, "connection_mode"):  # an e3nn Instruction namedtuple
        return (int(ins.i_in1), int(ins.i_in2), int(ins.i_out), str(ins.connection_mode),
                bool(ins.has_weight), float(ins.path_weight))
    ins = tuple(ins)
    if len(ins) == 5:
        i1, i2, io, mode, hw = ins
        pw = 1.0
    elif len(ins) == 6:
        i1, i2, io, mode, hw, pw = ins
    else:
        raise ValueError(f"an instruction is (i_in1, i_in2, i_out, mode, has_weight[, path_weight]); got {ins!r}")
    return int(i1), int(i2), int(io), str(mode), bool(hw), float(pw)


@dataclass(frozen=True)
class TPProblem:
    irreps_in1: Irreps
    irreps_in2: Irreps
    irreps_out: Irreps
    instructions: Tuple[Instruction, ...]
    irrep_normalization: str = "component"
    path_normalization: str = "element"
    shared_weights: bool = False
    weight_numel: int = field(default=0)

    @classmethod
    def from_e3nn_args(
        cls,
        irreps_in1,
        irreps_in2,
        irreps_out,
        instructions: Sequence,
        irrep_normalization: Optional[str] = None,
        path_normalization: Optional[str] = None,
        shared_weights: bool = False,
        internal_weights: bool = False,
    ) -> "TPProblem":
        irrep_normalization = irrep_normalization or "component"
        path_normalization = path_normalization or "element"
        in1, in2, out = Irreps(irreps_in1), Irreps(irreps_in2), Irreps(irreps_out)
        if internal_weights:
            raise NotImplementedError("internal_weights=True: mace_accel takes weights as an input; "
                                      "keep them as a parameter of the calling module")
        if irrep_normalization not in IRREP_NORMALIZATIONS:
            raise NotImplementedError(f"irrep_normalization={irrep_normalization!r} "
                                      f"(supported: {IRREP_NORMALIZATIONS})")
        if path_normalization not in PATH_NORMALIZATIONS:
            raise NotImplementedError(f"path_normalization={path_normalization!r} "
                                      f"(supported: {PATH_NORMALIZATIONS})")
        raw = [_parse_instruction(i) for i in instructions]
        if not raw:
            raise NotImplementedError("a tensor product with no instructions")
        for name, irreps in (("irreps_in1", in1), ("irreps_in2", in2), ("irreps_out", out)):
            for mi in irreps:
                if mi.ir.l > MAX_L:
                    raise NotImplementedError(f"{name} has l={mi.ir.l} > {MAX_L} ({irreps})")
        for mi in in2:
            if mi.mul != 1:
                raise NotImplementedError(f"irreps_in2 multiplicity {mi.mul} in {in2}: the kernels take "
                                          "multiplicity 1 for the second operand (spherical harmonics)")

        for k, (i1, i2, io, mode, hw, pw) in enumerate(raw):
            if not (0 <= i1 < len(in1) and 0 <= i2 < len(in2) and 0 <= io < len(out)):
                raise ValueError(f"instruction {k} {raw[k]} indexes outside the irreps")
            if mode not in SUPPORTED_MODES:
                raise NotImplementedError(f"instruction {k}: connection mode {mode!r} (supported: uvu)")
            if not hw:
                raise NotImplementedError(f"instruction {k}: uvu without weights")
            a, b, c = in1[i1], in2[i2], out[io]
            if a.ir.p * b.ir.p != c.ir.p or not abs(a.ir.l - b.ir.l) <= c.ir.l <= a.ir.l + b.ir.l:
                raise ValueError(f"instruction {k}: {a.ir} x {b.ir} -> {c.ir} violates the selection rule")
            if c.mul != a.mul * b.mul:
                raise ValueError(f"instruction {k}: uvu needs out multiplicity {a.mul * b.mul}, got {c.mul}")

        norms = e3nn_path_norms(in1, in2, out, [(r[0], r[1], r[2], r[3], r[5]) for r in raw],
                                irrep_normalization, path_normalization)
        built = []
        offset = 0
        for (i1, i2, io, mode, hw, pw), norm in zip(raw, norms):
            numel = in1[i1].mul * in2[i2].mul
            built.append(Instruction(i1, i2, io, mode, hw, pw, norm, offset, numel))
            offset += numel
        return cls(in1, in2, out, tuple(built), irrep_normalization, path_normalization,
                   bool(shared_weights), offset)

    # ---- derived facts used by planners and checks -------------------------------------------------
    @property
    def max_mul(self) -> int:
        return max(self.irreps_in1[i.i_in1].mul for i in self.instructions)

    @property
    def lmax(self) -> int:
        return max(self.irreps_in1.lmax, self.irreps_in2.lmax, self.irreps_out.lmax)

    def key(self) -> str:
        """A stable identifier (same in every process) used to register plans with the torch ops."""
        text = repr((str(self.irreps_in1), str(self.irreps_in2), str(self.irreps_out),
                     tuple((i.i_in1, i.i_in2, i.i_out, i.mode, i.has_weight, i.path_weight)
                           for i in self.instructions),
                     self.irrep_normalization, self.path_normalization, self.shared_weights))
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def describe(self) -> str:
        return (f"TPProblem({self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out}, "
                f"{len(self.instructions)} uvu paths, {self.weight_numel} weights"
                f"{' shared' if self.shared_weights else ' per edge'}, "
                f"{self.irrep_normalization}/{self.path_normalization})")
