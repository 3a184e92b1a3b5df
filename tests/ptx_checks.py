"""Test helpers for generated-kernel sources compiled with NVRTC on a machine without a GPU."""
import re

import pytest

_WIDE_MUL = re.compile(r"mul\.lo\.s64\s+%rd\d+,\s*%rd\d+,\s*(-?\d+);")
_SHR32 = re.compile(r"shr\.s64\s+%rd\d+,\s*%rd\d+,\s*32;")


def nvrtc_or_skip():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception:
        pytest.skip("NVRTC is not available on this machine")


def int_index_widenings(ptx) -> tuple:
    """(multiplies by a nonzero multiple of 2**32, arithmetic shifts right by 32) in PTX text: how NVRTC widens an
    ``int`` index such as ``first + ch * stride`` (the pattern the symmetric contraction's grad-w kernels had
    while their H100 builds were wrong; sc_codegen.py's module docstring)."""
    text = ptx.decode(errors="replace") if isinstance(ptx, bytes) else ptx
    wide = [c for c in map(int, _WIDE_MUL.findall(text)) if c and c % (1 << 32) == 0]
    return len(wide), len(_SHR32.findall(text))
