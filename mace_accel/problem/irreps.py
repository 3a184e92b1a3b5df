"""Irreducible representations of O(3), parsed without torch or e3nn.

Accepts the e3nn string form (``"128x0e + 64x1o"``), sequences of ``(mul, (l, p))`` or ``(mul, "1o")``, and
any object whose ``str()`` is that string (an ``e3nn.o3.Irreps``). The layout is e3nn's: each ``mul x ir``
block is ``mul`` consecutive copies of the ``2l+1`` components, so element ``(u, m)`` of block ``b`` sits at
``offset[b] + u * (2l+1) + m``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Tuple

_IRREP_RE = re.compile(r"^\s*(\d+)\s*([eo])\s*$")
_MUL_IRREP_RE = re.compile(r"^\s*(?:(\d+)\s*x\s*)?(\d+\s*[eo])\s*$")


@dataclass(frozen=True, order=True)
class Irrep:
    l: int
    p: int  # +1 even, -1 odd

    def __post_init__(self):
        if self.l < 0 or self.p not in (1, -1):
            raise ValueError(f"invalid irrep l={self.l} p={self.p}")

    @classmethod
    def parse(cls, s) -> "Irrep":
        if isinstance(s, Irrep):
            return s
        if type(s) is tuple and len(s) == 2:
            return cls(int(s[0]), int(s[1]))
        m = _IRREP_RE.match(str(s))
        if not m:
            raise ValueError(f"cannot parse irrep {s!r}")
        return cls(int(m.group(1)), 1 if m.group(2) == "e" else -1)

    @property
    def dim(self) -> int:
        return 2 * self.l + 1

    def __str__(self) -> str:
        return f"{self.l}{'e' if self.p == 1 else 'o'}"

    def __mul__(self, other: "Irrep") -> Iterable["Irrep"]:
        """The irreps in the product (selection rule |l1-l2| <= l <= l1+l2, parity multiplies)."""
        p = self.p * other.p
        return [Irrep(l, p) for l in range(abs(self.l - other.l), self.l + other.l + 1)]


@dataclass(frozen=True)
class MulIrrep:
    mul: int
    ir: Irrep

    @property
    def dim(self) -> int:
        return self.mul * self.ir.dim

    def __str__(self) -> str:
        return f"{self.mul}x{self.ir}"


class Irreps(Tuple[MulIrrep, ...]):
    """An immutable sequence of :class:`MulIrrep` with e3nn's string form and layout."""

    def __new__(cls, spec=()):
        if isinstance(spec, Irreps):
            return spec
        items = []
        if type(spec) not in (list, tuple):  # a string, or a foreign Irreps whose str() is e3nn's form
            text = str(spec).strip()
            if text:
                for part in text.split("+"):
                    m = _MUL_IRREP_RE.match(part)
                    if not m:
                        raise ValueError(f"cannot parse irreps {spec!r} (at {part!r})")
                    mul = int(m.group(1)) if m.group(1) is not None else 1
                    items.append(MulIrrep(mul, Irrep.parse(m.group(2).replace(" ", ""))))
        else:
            for entry in spec:
                if isinstance(entry, MulIrrep):
                    items.append(entry)
                    continue
                mul, ir = entry
                items.append(MulIrrep(int(mul), Irrep.parse(ir)))
        for it in items:
            if it.mul < 0:
                raise ValueError(f"negative multiplicity in {spec!r}")
        return super().__new__(cls, items)

    @property
    def dim(self) -> int:
        return sum(mi.dim for mi in self)

    @property
    def offsets(self) -> Tuple[int, ...]:
        out, o = [], 0
        for mi in self:
            out.append(o)
            o += mi.dim
        return tuple(out)

    @property
    def lmax(self) -> int:
        return max((mi.ir.l for mi in self), default=0)

    def __str__(self) -> str:
        return "+".join(str(mi) for mi in self)

    def __repr__(self) -> str:
        return f"Irreps({str(self)!r})"
