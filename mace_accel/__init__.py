"""mace_accel: generated CUDA kernels for MACE's equivariant tensor products.

Public API (everything else lives in private-by-convention subpackages, one per pipeline stage):

- :class:`TensorProductConv`  fused gather -> channelwise ("uvu") tensor product -> scatter
- :class:`TensorProduct`      the same tensor product without gather/scatter
- :func:`accelerate`          model surgery on a trained mace-torch model
- :class:`MACEAccelCalculator` ASE calculator
"""
from __future__ import annotations

import os as _os

# e3nn 0.4.4 calls torch.load on its constants without weights_only; torch >= 2.6 refuses that unless
# this is set. mace sets it too, but mace_accel may be imported first.
_os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

__version__ = "0.1.0"

from .modules import TensorProduct, TensorProductConv  # noqa: E402

__all__ = ["TensorProduct", "TensorProductConv", "accelerate", "MACEAccelCalculator", "__version__"]


def __getattr__(name):  # lazy: surgery and calculator import mace and ase
    if name == "accelerate":
        from .surgery import accelerate

        return accelerate
    if name == "MACEAccelCalculator":
        from .calculator import MACEAccelCalculator

        return MACEAccelCalculator
    raise AttributeError(f"module 'mace_accel' has no attribute {name!r}")
