"""Exceptions of the model surgery. Library code raises these; only the CLI turns them into exit codes."""
from __future__ import annotations


class SurgeryError(RuntimeError):
    """Base class of every error mace_accel.surgery raises on purpose."""


class UnsupportedModuleError(SurgeryError):
    """A module that :func:`accelerate` cannot replace. ``path`` is its name in the model (e.g.
    ``interactions.1``), ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path or '<module>'}: {reason}")

    def at(self, path: str) -> "UnsupportedModuleError":
        """The same error located at ``path`` (prefixing a sub-module path if one is set)."""
        full = f"{path}.{self.path}" if self.path else path
        return UnsupportedModuleError(full, self.reason)


class ParityError(SurgeryError):
    """The accelerated model's energy/forces/stress deviate from the original beyond tolerance."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class ModelLoadError(SurgeryError):
    """A model file that cannot be loaded (missing, corrupt, not a whole model, missing packages)."""


class BackendConversionError(SurgeryError):
    """A cuEquivariance / OpenEquivariance model that could not be converted back to e3nn."""
