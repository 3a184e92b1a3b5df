"""Clebsch-Gordan (Wigner 3j) coefficients in e3nn's real basis, as float64 numpy arrays.

The coefficients are those of e3nn 0.4.4's ``o3.wigner_3j`` (the dependency mace-torch pins): taking them
from e3nn itself is what makes our tensor products agree with the original model to float64 precision,
including e3nn's basis order and sign conventions. They are computed once per (l1, l2, l3) and cached.
"""
from __future__ import annotations

import functools
import os

import numpy as np

# Entries smaller than this (relative to the block's largest) are rounding noise of e3nn's construction.
ZERO_TOLERANCE = 1e-14


@functools.lru_cache(maxsize=None)
def wigner_3j(l1: int, l2: int, l3: int) -> np.ndarray:
    """The [2l1+1, 2l2+1, 2l3+1] real Wigner 3j block, unit Frobenius norm, read-only."""
    if not abs(l1 - l2) <= l3 <= l1 + l2:
        raise ValueError(f"no coupling {l1} x {l2} -> {l3}")
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import torch
    from e3nn import o3

    block = o3.wigner_3j(l1, l2, l3, dtype=torch.float64).numpy().copy()
    scale = np.abs(block).max()
    block[np.abs(block) < ZERO_TOLERANCE * scale] = 0.0
    block.setflags(write=False)
    return block
