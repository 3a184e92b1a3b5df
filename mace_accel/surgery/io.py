"""Loading, saving and converting model files (the library side of ``mace-accel convert``).

Saved models are whole modules written with ``torch.save(model)``, moved to the CPU first so they load on
machines without a GPU. They hold no compiled code: mace_accel's modules carry only their problem
description, and kernels are generated again in the loading process.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .core import AccelerationReport, _dtype, accelerate, ensure_e3nn, is_accelerated, model_dtype, to_e3nn
from .errors import ModelLoadError, SurgeryError
from .parity import ParityResult, check_parity, probe_atoms

PathLike = Union[str, os.PathLike]


def load_model(path: PathLike, map_location="cpu") -> torch.nn.Module:
    """``torch.load(path, weights_only=False)`` of a whole mace-torch (or mace_accel) model, with clear errors."""
    import mace.modules  # noqa: F401  - the classes a model pickle refers to

    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p} is a directory, not a model file")
    try:
        obj = torch.load(str(p), map_location=map_location, weights_only=False)
    except ModuleNotFoundError as e:
        name = (e.name or "").split(".")[0]
        if name in ("cuequivariance", "cuequivariance_torch", "cuequivariance_ops_torch"):
            raise ModelLoadError(
                f"{p} is a cuEquivariance model and needs the package {e.name!r} to load, which is not installed. "
                "Install cuequivariance-torch (mace_accel then converts it back to e3nn with mace's "
                "mace.cli.convert_cueq_e3nn automatically), or convert it with that tool where it is installed."
            ) from e
        if name == "openequivariance":
            raise ModelLoadError(
                f"{p} is an OpenEquivariance model and needs the package 'openequivariance' to load, which is not "
                "installed. Install it (mace_accel then converts it back to e3nn with mace's "
                "mace.cli.convert_oeq_e3nn automatically), or convert it with that tool where it is installed."
            ) from e
        raise ModelLoadError(f"{p}: loading needs the Python module {e.name!r}, which is not installed") from e
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise ModelLoadError(f"could not load {p} as a torch model file (corrupt, truncated or not a "
                             f"torch.save file?): {type(e).__name__}: {e}") from e
    if isinstance(obj, dict):
        keys = ", ".join(list(map(str, obj.keys()))[:5])
        raise ModelLoadError(f"{p} holds a dict ({keys}{', ...' if len(obj) > 5 else ''}), not a whole model: "
                             "mace-accel needs a model saved with torch.save(model) (mace's *.model files), not a "
                             "state_dict or training checkpoint")
    if isinstance(obj, torch.jit.ScriptModule):
        raise ModelLoadError(f"{p} is a TorchScript module (e.g. a LAMMPS export), not a Python mace-torch model")
    if not isinstance(obj, torch.nn.Module):
        raise ModelLoadError(f"{p} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def save_model(model: torch.nn.Module, path: PathLike) -> None:
    """``torch.save`` the whole module atomically (temp file in the target directory, then rename)."""
    p = Path(path)
    directory = p.parent if str(p.parent) else Path(".")
    if not directory.is_dir():
        raise SurgeryError(f"cannot write {p}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(directory))
    os.close(fd)
    try:
        torch.save(model, tmp)
        os.replace(tmp, str(p))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_path(in_path: PathLike, out_path: PathLike, force: bool = False) -> None:
    """Refuse to overwrite the input (same path, or same file through a link) and, without ``force``, any
    existing file."""
    src, dst = Path(in_path), Path(out_path)
    same = False
    if os.path.lexists(dst):
        try:
            same = os.path.exists(dst) and os.path.samefile(src, dst)
        except OSError:
            same = False
    same = same or os.path.realpath(src) == os.path.realpath(dst)
    if same:
        raise SurgeryError(f"refusing to overwrite the input model: {dst} is the same file as {src}")
    if os.path.lexists(dst):
        if os.path.isdir(dst):
            raise SurgeryError(f"{dst} is a directory")
        if not force:
            raise SurgeryError(f"{dst} already exists (use --force to overwrite it)")


@dataclasses.dataclass
class ConversionResult:
    model: torch.nn.Module
    report: Optional[AccelerationReport]
    parity: Optional[ParityResult]
    out_path: Optional[str]


def _device(device) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def convert_model(model: torch.nn.Module, *, dtype=None, to_plain: bool = False, device="cpu", check: bool = True,
                  strict: bool = True, log: Optional[Callable[[str], None]] = None) -> ConversionResult:
    """Accelerate (or, with ``to_plain``, turn back into plain mace-torch) and parity-check a model."""
    log = log or (lambda msg: None)
    dt = _dtype(dtype) or model_dtype(model)
    dev = _device(device)
    report = None
    if to_plain:
        if not is_accelerated(model):
            log("note: the input is not an accelerated model; writing a plain copy")
        out = to_e3nn(model).to(device=dev, dtype=dt)
        original, candidate = model, out  # reference: the accelerated input; checked: the plain output
    else:
        original = ensure_e3nn(model)
        out, report = accelerate(original, dtype=dt, device=dev, strict=strict, report=True)
        n_rep = len([e for e in report.replaced if e.path.endswith("conv_tp")])
        n_sc = len([e for e in report.replaced if e.module == "SymmetricContraction"])
        log(f"accelerated {n_rep} interaction block(s) and {n_sc} symmetric contraction(s); "
            f"{len(report.kept)} module(s) left as e3nn/mace")
        for e in report.kept:
            if "unsupported" in e.detail:
                log(f"warning: {e.path}: {e.detail}")
        candidate = out
    parity = None
    if check:
        name = str(dt).replace("torch.", "")
        atoms = probe_atoms(original)
        against = "the accelerated input" if to_plain else "the e3nn model"
        log(f"checking parity against {against} on a probe structure ({len(atoms)} atoms, {name}, {dev}) ...")
        parity = check_parity(original, candidate, dt, atoms)  # raises ParityError beyond tolerance
        log(str(parity))
    return ConversionResult(out, report, parity, None)


def convert_file(in_path: PathLike, out_path: PathLike, *, dtype=None, to_plain: bool = False, device="cpu",
                 check: bool = True, force: bool = False, strict: bool = True,
                 log: Optional[Callable[[str], None]] = None) -> ConversionResult:
    """Load ``in_path``, accelerate it (or with ``to_plain`` convert it back to plain mace-torch), run the
    parity check unless ``check=False``, and save the whole module (on the CPU) to ``out_path``."""
    log = log or (lambda msg: None)
    if not Path(in_path).exists():
        raise ModelLoadError(f"{in_path}: no such file")
    check_output_path(in_path, out_path, force)
    _dtype(dtype)
    _device(device)
    log(f"loading {in_path}")
    model = load_model(in_path, map_location="cpu")
    result = convert_model(model, dtype=dtype, to_plain=to_plain, device=device, check=check, strict=strict, log=log)
    check_output_path(in_path, out_path, force)  # again: the file system may have changed meanwhile
    save_model(result.model.to("cpu"), out_path)
    log(f"wrote {out_path} ({'plain mace-torch' if to_plain else 'accelerated'}, "
        f"{str(model_dtype(result.model)).replace('torch.', '')})")
    result.out_path = str(out_path)
    return result
