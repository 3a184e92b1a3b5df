"""Model surgery: make a trained mace-torch model use mace_accel's fused kernels, and undo it.

- :func:`accelerate` -- accelerated deep copy (fused conv TP + scatter, per-element skip map), with report
- :func:`to_e3nn`    -- back to a plain mace-torch model (original block classes, same weights)
- :func:`check_parity` -- energies / forces / stress of two models on a probe structure, with tolerances
- :func:`convert_file` -- load, convert, check, save (what ``mace-accel convert`` runs)
"""
from __future__ import annotations

from .core import (
    MARKER,
    AccelerationReport,
    ReportEntry,
    accelerate,
    ensure_e3nn,
    is_accelerated,
    to_e3nn,
)
from .errors import (
    BackendConversionError,
    ModelLoadError,
    ParityError,
    SurgeryError,
    UnsupportedModuleError,
)
from .io import ConversionResult, convert_file, load_model, save_model
from .parity import ParityResult, check_parity, probe_atoms

__all__ = [
    "MARKER",
    "AccelerationReport",
    "ReportEntry",
    "accelerate",
    "ensure_e3nn",
    "is_accelerated",
    "to_e3nn",
    "check_parity",
    "probe_atoms",
    "ParityResult",
    "convert_file",
    "load_model",
    "save_model",
    "ConversionResult",
    "SurgeryError",
    "UnsupportedModuleError",
    "ParityError",
    "ModelLoadError",
    "BackendConversionError",
]
