"""``accelerate`` / ``to_e3nn``: model surgery on a trained mace-torch model."""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Optional, Tuple, Union

import torch

from .errors import BackendConversionError, SurgeryError, UnsupportedModuleError

#: Attribute set on every model :func:`accelerate` returns (value: the mace_accel version).
MARKER = "_mace_accel_version"

_SYMCON_REASON = "left as mace's symmetric contraction (product basis): accelerate(..., symmetric_contraction=False)"


@dataclasses.dataclass
class ReportEntry:
    path: str
    module: str  # class name of the module as found in the input
    action: str  # "replaced" or "kept"
    detail: str


@dataclasses.dataclass
class AccelerationReport:
    """What :func:`accelerate` did. ``replaced`` / ``kept`` are lists of :class:`ReportEntry`."""

    entries: List[ReportEntry] = dataclasses.field(default_factory=list)
    converted_from: Optional[str] = None  # "cuequivariance" / "openequivariance" when converted back first
    dtype: Optional[str] = None
    device: Optional[str] = None

    def add(self, path, module, action, detail):
        self.entries.append(ReportEntry(path, module, action, detail))

    @property
    def replaced(self) -> List[ReportEntry]:
        return [e for e in self.entries if e.action == "replaced"]

    @property
    def kept(self) -> List[ReportEntry]:
        return [e for e in self.entries if e.action == "kept"]

    def unsupported_blocks(self) -> List[ReportEntry]:
        return [e for e in self.kept if e.module != "Linear" and "unsupported" in e.detail]

    def as_dict(self) -> Dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = ["mace_accel surgery report"]
        if self.converted_from:
            lines.append(f"  converted from {self.converted_from} back to e3nn with mace's own tooling first")
        if self.dtype or self.device:
            lines.append(f"  dtype={self.dtype} device={self.device}")
        lines.append(f"  replaced ({len(self.replaced)}):")
        lines += [f"    {e.path} [{e.module}]: {e.detail}" for e in self.replaced]
        lines.append(f"  left as e3nn/mace ({len(self.kept)}):")
        lines += [f"    {e.path} [{e.module}]: {e.detail}" for e in self.kept]
        return "\n".join(lines)


# ---- cuEquivariance / OpenEquivariance --------------------------------------------------------------------
def _foreign_backend(model: torch.nn.Module) -> Dict[str, List[str]]:
    """Paths of modules implemented by cuequivariance / openequivariance, by package."""
    found: Dict[str, List[str]] = {}
    for name, mod in model.named_modules():
        top = type(mod).__module__.split(".")[0]
        if top in ("cuequivariance", "cuequivariance_torch"):
            found.setdefault("cuequivariance", []).append(name)
        elif top == "openequivariance":
            found.setdefault("openequivariance", []).append(name)
    return found


def _package_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def ensure_e3nn(model: torch.nn.Module, report: Optional[AccelerationReport] = None) -> torch.nn.Module:
    """A model with e3nn modules: cuEquivariance / OpenEquivariance models are converted back with mace's
    ``mace.cli.convert_cueq_e3nn`` / ``convert_oeq_e3nn``; an e3nn model is returned as is."""
    found = _foreign_backend(model)
    if not found:
        return model
    default_dtype = torch.get_default_dtype()
    try:
        for package, tool in (("openequivariance", "convert_oeq_e3nn"), ("cuequivariance", "convert_cueq_e3nn")):
            if package not in found:
                continue
            paths = ", ".join(found[package][:4]) + (" ..." if len(found[package]) > 4 else "")
            try:
                import importlib

                run = importlib.import_module(f"mace.cli.{tool}").run
                device = next(model.parameters()).device
                # mace's converter calls torch.set_default_dtype(model dtype); restored below.
                model = run(model, device=str(device), return_model=True)
            except Exception as e:  # noqa: BLE001 - re-raised with context
                hint = "" if _package_available(package) else f" ({package} is not installed here)"
                raise BackendConversionError(
                    f"the model uses {package} modules ({paths}); converting it back to e3nn with "
                    f"mace.cli.{tool} failed{hint}: {type(e).__name__}: {e}") from e
            if not isinstance(model, torch.nn.Module):
                raise BackendConversionError(f"mace.cli.{tool}.run returned {type(model).__name__}, not a model")
            if report is not None:
                report.converted_from = package if report.converted_from is None else \
                    f"{report.converted_from}+{package}"
    finally:
        torch.set_default_dtype(default_dtype)
    left = _foreign_backend(model)
    if left:
        raise BackendConversionError(f"after mace's conversion the model still has {sorted(left)} modules at "
                                     f"{[p for v in left.values() for p in v][:4]}")
    return model


# ---- the surgery ----------------------------------------------------------------------------------------
def _dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        return dtype
    names = {"float32": torch.float32, "float64": torch.float64, "float": torch.float32, "double": torch.float64}
    if str(dtype) not in names:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return names[str(dtype)]


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise SurgeryError(f"expected a torch.nn.Module (a mace-torch model), got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise SurgeryError("the model is a TorchScript module (e.g. a LAMMPS export); mace_accel needs the "
                           "Python mace-torch model saved with torch.save(model)")


def _is_interaction_like(mod: torch.nn.Module) -> bool:
    from mace.modules.blocks import InteractionBlock

    return isinstance(mod, InteractionBlock) or (hasattr(mod, "conv_tp") and hasattr(mod, "conv_tp_weights"))


def is_accelerated(model: torch.nn.Module) -> bool:
    """True if ``model`` came out of :func:`accelerate` (or holds accelerated blocks)."""
    from .blocks import AcceleratedBlockMixin

    from .symcon import AcceleratedSymmetricContraction

    return hasattr(model, MARKER) or any(isinstance(m, (AcceleratedBlockMixin, AcceleratedSymmetricContraction))
                                         for m in model.modules())


def accelerate(model: torch.nn.Module, *, dtype=None, device=None, strict: bool = True, report: bool = False,
               deterministic: bool = False, skip_strategy: str = "auto", symmetric_contraction: bool = True,
               linear: bool = True, radial: bool = True
               ) -> Union[torch.nn.Module, Tuple[torch.nn.Module, AccelerationReport]]:
    """Return an accelerated deep copy of a mace-torch model (the input is never modified).

    Every supported interaction block becomes its accelerated subclass (see
    :mod:`mace_accel.surgery.blocks`): conv TP + scatter_sum fused into :class:`mace_accel.TensorProductConv`,
    the one-hot ``skip_tp`` replaced by an exact per-element linear map, and (``symmetric_contraction=True``)
    every product-basis ``SymmetricContraction`` runs generated kernels (forward, grad-x, grad-w)
    (:mod:`mace_accel.surgery.symcon`), and (``linear=True``) every e3nn ``o3.Linear`` without biases computes
    its map from one split of the input (:mod:`mace_accel.surgery.linear`: no zero fill per input irrep in the
    backward), and (``radial=True``) e3nn's ``FullyConnectedNet`` radial MLPs fold their activation constants into
    the next layer's weights (:mod:`mace_accel.surgery.radial`). Weights are the same values under
    the same parameter names. ``dtype`` ("float32"/"float64"/torch dtype) and ``device`` cast/move the copy.
    cuEquivariance / OpenEquivariance models are first converted back to e3nn with mace's own tooling.

    ``strict=True``: an interaction block that cannot be accelerated raises
    :class:`~mace_accel.surgery.errors.UnsupportedModuleError` naming its path (e.g. ``interactions.1``);
    ``strict=False``: it stays e3nn and is listed in the report. ``report=True`` returns
    ``(model, AccelerationReport)``.
    """
    from .. import __version__
    from .blocks import AcceleratedBlockMixin, accelerate_block, unsupported_reason

    _check_model(model)
    dt = _dtype(dtype)
    rep = AccelerationReport()
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError(f"device {device!r} requested but CUDA is not available on this machine")
    out = copy.deepcopy(model)
    out = ensure_e3nn(out, rep)

    # Surgery first, casting after: the e3nn modules kept for to_e3nn stay in the input's precision.
    blocks = [(name, mod) for name, mod in out.named_modules() if name and _is_interaction_like(mod)]
    done_prefixes = []
    for name, block in blocks:
        cls_name = type(block).__name__
        reason = unsupported_reason(block)
        if reason is not None:
            if strict:
                raise UnsupportedModuleError(name, reason)
            rep.add(name, cls_name, "kept", f"unsupported, left as e3nn: {reason}")
            done_prefixes.append(name + ".")
            continue
        try:
            rows = accelerate_block(block, deterministic=deterministic, skip_strategy=skip_strategy, strict=strict)
        except UnsupportedModuleError as e:
            err = e.at(name)
            if strict:
                raise err from None
            rep.add(name, cls_name, "kept", f"unsupported, left as e3nn: {err}")
            done_prefixes.append(name + ".")
            continue
        for sub, mod_name, action, detail in rows:
            rep.add(f"{name}.{sub}" if sub else name, mod_name, action, detail)
        if isinstance(block, AcceleratedBlockMixin):
            rep.add(name, cls_name, "replaced", f"block {cls_name} -> {type(block).__name__} (mace 0.3.16 forward, "
                                                "fused conv)")

    # The product basis: mace's SymmetricContraction -> one generated kernel (same parameters and buffers).
    if symmetric_contraction:
        from mace.modules.symmetric_contraction import SymmetricContraction

        from .symcon import accelerate_symmetric_contraction

        for name, mod in list(out.named_modules()):
            if not isinstance(mod, SymmetricContraction) or any(name.startswith(p) for p in done_prefixes):
                continue
            try:
                detail = accelerate_symmetric_contraction(mod)
            except UnsupportedModuleError as e:  # mace's module stays: an exact fallback, also when strict
                rep.add(name, type(mod).__name__, "kept", f"left as mace's module: {e.at(name)}")
                continue
            rep.add(name, "SymmetricContraction", "replaced", detail)

    # e3nn modules swapped in place for subclasses with a faster forward (same parameters): o3.Linear ->
    # SplitLinear, nn.FullyConnectedNet (the radial MLPs) -> FoldedFullyConnectedNet
    from .linear import LINEAR_SWAP
    from .radial import RADIAL_SWAP

    for swap, enabled in ((LINEAR_SWAP, linear), (RADIAL_SWAP, radial)):
        for name, mod in list(out.named_modules()):
            if not isinstance(mod, swap.base) or any(name.startswith(p) for p in done_prefixes):
                continue
            rep.add(name, swap.label, *swap.classify(mod, enabled))

    if dt is not None:
        out = out.to(dtype=dt)
    if dev is not None:
        out = out.to(device=dev)
    rep.dtype = str(model_dtype(out)).replace("torch.", "")
    rep.device = str(model_device(out))

    # Everything else worth naming.
    for name, mod in out.named_modules():
        if not name or any(name.startswith(p) for p in done_prefixes):
            continue
        if type(mod).__name__ == "SymmetricContraction" and type(mod).__module__.startswith("mace") \
                and not symmetric_contraction:
            rep.add(name, type(mod).__name__, "kept", _SYMCON_REASON)
    if not any(e.action == "replaced" for e in rep.entries) and not blocks:
        raise SurgeryError("found no MACE interaction blocks in the model (is it a mace-torch model?)")

    setattr(out, MARKER, __version__)
    return (out, rep) if report else out


def to_e3nn(model: torch.nn.Module) -> torch.nn.Module:
    """A plain mace-torch deep copy of an accelerated model: the original block classes and e3nn modules,
    the same weights (same names and values), same dtype and device. A plain model is returned copied."""
    from .blocks import restore_block
    from .linear import LINEAR_SWAP
    from .radial import RADIAL_SWAP
    from .symcon import restore_symmetric_contraction

    _check_model(model)
    out = copy.deepcopy(model)
    for _, mod in list(out.named_modules()):
        restore_block(mod)
        restore_symmetric_contraction(mod)
        LINEAR_SWAP.restore(mod)
        RADIAL_SWAP.restore(mod)
    if hasattr(out, MARKER):
        delattr(out, MARKER)
    return out
