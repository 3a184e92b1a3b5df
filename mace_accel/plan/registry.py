"""Per-process plan registries: torch ops receive a plan key (a string) and look the plan up here."""
from __future__ import annotations

import threading
from typing import Callable, Dict, Generic, TypeVar

P = TypeVar("P")


class PlanRegistry(Generic[P]):
    """Plans by their problem's stable key, built once per process (thread-safe)."""

    def __init__(self, build: Callable[[object], P], what: str, module_hint: str):
        self._build = build
        self._what = what
        self._hint = module_hint
        self._plans: Dict[str, P] = {}
        self._lock = threading.Lock()

    def register(self, problem) -> P:
        key = problem.key()
        with self._lock:
            plan = self._plans.get(key)
            if plan is None:
                plan = self._build(problem)
                self._plans[key] = plan
        return plan

    def get(self, key: str) -> P:
        try:
            return self._plans[key]
        except KeyError:
            raise RuntimeError(f"mace_accel: no {self._what} plan is registered under key {key!r}; build the "
                               f"{self._hint} module in this process first") from None
