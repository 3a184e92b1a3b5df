"""Class swaps of e3nn modules: an e3nn module becomes, in place, a subclass whose ``forward`` computes the same
function faster; its parameters, buffers and attributes stay (same names, same objects), and ``to_e3nn`` swaps
the class back. :mod:`.linear` (``o3.Linear``) and :mod:`.radial` (``nn.FullyConnectedNet``) are such swaps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

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
    state: Tuple[str, ...] = ()  # attributes the accelerated forward caches on the module (dropped by restore)

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
            for attr in self.state:
                mod.__dict__.pop(attr, None)

    def classify(self, mod: torch.nn.Module, enabled: bool) -> Tuple[str, str]:
        """For ``mod`` (an instance of ``base``): swap it when the swap is ``enabled`` and covers it; returns the
        report's (action, detail), action "replaced" (now or already) or "kept" (e3nn's module stays: the same
        function, also under accelerate(strict=True))."""
        if isinstance(mod, self.accelerated):
            return "replaced", f"already a {self.accelerated.__name__}"
        if not enabled:
            return "kept", f"left as e3nn {self.base_name}: accelerate(..., {self.option}=False)"
        if type(mod) is not self.base:
            return "kept", f"a {type(mod).__name__} (a subclass of {self.base_name}), left as is"
        try:
            return "replaced", self.apply(mod)
        except UnsupportedModuleError as e:
            return "kept", f"left as e3nn {self.base_name}: {e.reason}"
