"""Random-weight mace-torch models with foundation-model architectures, for tests and the demo.

:func:`build_random_mace` builds a ``mace.modules.ScaleShiftMACE`` with MACE-MP-0's hyperparameters
(RealAgnosticResidualInteractionBlock, max_ell 3, correlation 3, 2 interactions, r_max 6, 8 Bessel
functions, polynomial cutoff 5, radial MLP [64, 64, 64]); ``arch`` picks the hidden irreps of MP-0
small / medium / large (``channels`` x 0e / +1o / +2e; MP-0 uses 128 channels, the default here is 16 to
keep CPU time low).

Building a correlation-3 model spends most of its time in mace's higher-order Clebsch-Gordan recursion
(``mace.tools.cg._wigner_nj``), a pure function of its arguments. :func:`cached_mace_cg` memoises it for the
duration of a ``with`` block (clones are returned, so the cache cannot be modified through a model buffer).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import torch

ARCHITECTURES: Dict[str, str] = {
    "mp-small": "{c}x0e",
    "mp-medium": "{c}x0e+{c}x1o",
    "mp-large": "{c}x0e+{c}x1o+{c}x2e",
}

_CG_CACHE: dict = {}


@contextlib.contextmanager
def cached_mace_cg() -> Iterator[None]:
    """Memoise mace's ``_wigner_nj`` (process-wide cache) inside the ``with`` block."""
    import mace.tools.cg as cg
    from e3nn import o3

    original = cg._wigner_nj
    if getattr(original, "_mace_accel_cached", False):  # nested use
        yield
        return

    def cached(irrepss, normalization="component", filter_ir_mid=None, dtype=None):
        key = (tuple(str(o3.Irreps(i)) for i in irrepss), normalization,
               None if filter_ir_mid is None else tuple(str(o3.Irrep(i)) for i in filter_ir_mid), str(dtype))
        if key not in _CG_CACHE:
            _CG_CACHE[key] = original(irrepss, normalization, filter_ir_mid, dtype)
        return [(ir, path, c.clone()) for ir, path, c in _CG_CACHE[key]]

    cached._mace_accel_cached = True
    cg._wigner_nj = cached
    try:
        yield
    finally:
        cg._wigner_nj = original


def build_random_mace(arch: str = "mp-medium", *, channels: int = 16,
                      interaction: str = "RealAgnosticResidualInteractionBlock",
                      interaction_first: Optional[str] = None, atomic_numbers: Sequence[int] = (1, 6, 8),
                      r_max: float = 6.0, max_ell: int = 3, correlation: int = 3, num_interactions: int = 2,
                      radial_MLP: Sequence[int] = (64, 64, 64), num_bessel: int = 8,
                      num_polynomial_cutoff: int = 5, avg_num_neighbors: float = 12.0, seed: int = 0,
                      dtype: torch.dtype = torch.float64, perturb: float = 0.1) -> torch.nn.Module:
    """A ScaleShiftMACE with random weights. ``perturb``: std of noise added to parameters mace initialises
    to exactly zero (e.g. the non-linear block's ``beta``) so that every path carries signal."""
    from e3nn import o3
    from mace import modules

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    hidden = o3.Irreps(ARCHITECTURES[arch].format(c=channels))
    zs = sorted(int(z) for z in atomic_numbers)
    rng = np.random.default_rng(seed)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        with cached_mace_cg():
            model = modules.ScaleShiftMACE(
                r_max=r_max, num_bessel=num_bessel, num_polynomial_cutoff=num_polynomial_cutoff, max_ell=max_ell,
                interaction_cls=modules.interaction_classes[interaction],
                interaction_cls_first=modules.interaction_classes[interaction_first or interaction],
                num_interactions=num_interactions, num_elements=len(zs), hidden_irreps=hidden,
                MLP_irreps=o3.Irreps(f"{channels}x0e"), atomic_energies=-rng.uniform(1.0, 5.0, size=len(zs)),
                avg_num_neighbors=avg_num_neighbors, atomic_numbers=zs, correlation=correlation,
                gate=torch.nn.functional.silu, radial_MLP=list(radial_MLP), radial_type="bessel",
                atomic_inter_scale=1.3, atomic_inter_shift=-0.2)
        if perturb:
            gen = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for p in model.parameters():
                    if p.numel() and bool((p == 0).all()):
                        p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    finally:
        torch.set_default_dtype(old_dtype)
    return model.eval()
