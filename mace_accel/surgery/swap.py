"""Class swaps of e3nn modules: an e3nn module becomes, in place, a subclass whose ``forward`` computes the same
function faster; its parameters, buffers and attributes stay (same names, same objects), and ``to_e3nn`` swaps
the class back. :mod:`.linear` (``o3.Linear``) and :mod:`.radial` (``nn.FullyConnectedNet``) are such swaps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import UnsupportedModuleError


@dataclass(frozen=True)
class ClassSwap:
    base: type  # e3nn's class (exactly this class is swapped, not its subclasses)
    accelerated: type  # the subclass it becomes
    base_name: str  # as the report names it, e.g. "o3.Linear"
    label: str  # the report's module column
    option: str  # the keyword of accelerate() that turns the swap off
    unsupported_reason: Callable[[torch.nn.Module], Optional[str]]  # None when the swap covers the module
    describe: Callable[[torch.nn.Module], str]  # the report's detail for a swapped module

    def apply(self, mod: torch.nn.Module) -> str:
        """Swap ``mod``'s class in place; returns the report's detail. Raises :class:`UnsupportedModuleError`
        (module path left empty) when the accelerated forward does not cover the module."""
        reason = self.unsupported_reason(mod)
        if reason is not None:
            raise UnsupportedModuleError("", reason)
        mod.__class__ = self.accelerated
        return self.describe(mod)

    def restore(self, mod: torch.nn.Module) -> None:
        if type(mod) is self.accelerated:
            mod.__class__ = self.base

    def kept_reason(self, mod: torch.nn.Module, enabled: bool) -> Optional[str]:
        """Why ``mod`` (an instance of ``base``) stays as it is; None when it is swapped (or already was)."""
        if isinstance(mod, self.accelerated):
            return None
        if not enabled:
            return f"left as e3nn {self.base_name}: accelerate(..., {self.option}=False)"
        if type(mod) is not self.base:
            return f"a {type(mod).__name__} (a subclass of {self.base_name}), left as is"
        reason = self.unsupported_reason(mod)
        return None if reason is None else f"left as e3nn {self.base_name}: {reason}"
