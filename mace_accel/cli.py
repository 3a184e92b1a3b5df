"""``mace-accel``: convert mace-torch models, and a demo of the whole pipeline.

    mace-accel convert IN.model OUT.model [--dtype float32|float64] [--to-e3nn] [--device cpu|cuda]
                       [--no-check] [--force] [--non-strict]
    mace-accel demo [--steps N] [--device auto|cpu|cuda] [--dtype float32|float64] [--model PATH|random]
                    [--structure FILE] [--size N]

Library code raises exceptions; :func:`main` turns them into a message on stderr and a non-zero return code.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional

EXIT_ERROR = 1
EXIT_USAGE = 2

BUNDLED_MODEL = Path(__file__).resolve().parent / "data" / "bundled.model"


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---- convert -------------------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from .surgery import convert_file

    convert_file(args.input, args.output, dtype=args.dtype, to_plain=args.to_e3nn, device=args.device,
                 check=not args.no_check, force=args.force, strict=not args.non_strict, log=_log)
    return 0


# ---- demo ----------------------------------------------------------------------------------------------
def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from .surgery import SurgeryError

        raise SurgeryError("--device cuda requested but no CUDA GPU is available (use --device auto or cpu)")
    return device


def demo_atoms(model, size: int = 3, seed: int = 0):
    """A rattled simple-cubic supercell of size**3 atoms cycling through the model's elements, with a
    nearest-neighbour distance from the elements' covalent radii (at least 2.2 Angstrom)."""
    import ase
    import numpy as np
    from ase.data import covalent_radii

    zs = [int(z) for z in model.atomic_numbers.cpu().tolist()]
    rng = np.random.default_rng(seed)
    n = size ** 3
    numbers = [zs[i % len(zs)] for i in range(n)]
    rng.shuffle(numbers)
    spacing = max(2.2, 2.3 * float(np.mean([covalent_radii[z] for z in zs])))
    grid = np.array([(i, j, k) for i in range(size) for j in range(size) for k in range(size)], dtype=float)
    atoms = ase.Atoms(numbers=numbers, positions=grid * spacing, cell=np.eye(3) * size * spacing, pbc=True)
    atoms.positions += rng.normal(scale=0.05, size=(n, 3))
    return atoms


def _load_demo_model(spec: Optional[str], log: Callable[[str], None]):
    from .surgery import load_model
    from .surgery.random_models import build_random_mace

    if spec == "random" or (spec is None and not BUNDLED_MODEL.exists()):
        if spec is None:
            log(f"bundled model not found ({BUNDLED_MODEL}); building a small random-weight MACE-MP-0-like model "
                "instead (untrained: energies are meaningless, timing and parity are still valid)")
        else:
            log("building a small random-weight MACE-MP-0-like model (mp-medium architecture, 16 channels)")
        return build_random_mace("mp-medium", channels=16, atomic_numbers=(1, 6, 8)), "random mp-medium (16 channels)"
    path = Path(spec) if spec is not None else BUNDLED_MODEL
    log(f"loading {path}")
    return load_model(path), str(path)


def _accel_calculator(model, device: str, dtype: str, log):
    """mace_accel's ASE calculator around an already-accelerated model (mace's own calculator around the
    same model if mace_accel.calculator is not available)."""
    try:
        from .calculator import MACEAccelCalculator
    except ImportError as e:
        from mace.calculators import MACECalculator

        log(f"note: mace_accel.calculator is not available ({e}); driving the accelerated model through mace's "
            "MACECalculator instead")
        return MACECalculator(models=[model], device=device, default_dtype=dtype), "MACECalculator(accelerated model)"
    try:
        calc = MACEAccelCalculator(model, device=device, default_dtype=dtype, accelerate=False)
    except TypeError:
        calc = MACEAccelCalculator(model, device=device, default_dtype=dtype)
    return calc, "MACEAccelCalculator"


def _time_md(atoms, calc, steps: int, device: str, warmup: int = 2):
    import numpy as np
    import torch
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(1))
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    if warmup:
        dyn.run(warmup)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    dyn.run(steps)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return atoms, 1000.0 * elapsed / max(steps, 1)


def run_demo(steps: int = 20, device: str = "auto", dtype: Optional[str] = None, model: Optional[str] = None,
             structure: Optional[str] = None, size: Optional[int] = None, log: Callable[[str], None] = _log) -> dict:
    import numpy as np
    import torch
    from mace.calculators import MACECalculator

    from .surgery import ensure_e3nn, is_accelerated, to_e3nn
    from .surgery.io import convert_model

    if steps < 1:
        raise ValueError("--steps must be at least 1")
    dev = _resolve_device(device)
    dtype = dtype or "float32"
    if dev == "cpu":
        log("NOTE: no GPU in use: running on mace_accel's CPU reference backend (pure PyTorch). It checks "
            "correctness; its timings say nothing about the CUDA kernels' speed.")
    else:
        log(f"GPU: {torch.cuda.get_device_name()}: running mace_accel's generated CUDA kernels")

    plain, name = _load_demo_model(model, log)
    plain = to_e3nn(plain) if is_accelerated(plain) else ensure_e3nn(plain)
    log(f"converting {name} ({dtype}, {dev})")
    conv = convert_model(plain, dtype=dtype, device=dev, check=True, log=log)
    accelerated = conv.model

    if structure:
        import ase.io

        atoms = ase.io.read(structure)
        log(f"structure: {structure} ({len(atoms)} atoms)")
    else:
        size = size or (6 if dev == "cuda" else 3)
        atoms = demo_atoms(plain, size)
        log(f"structure: rattled simple-cubic cell, {len(atoms)} atoms of {sorted(set(atoms.get_chemical_symbols()))}")

    ours, ours_name = _accel_calculator(accelerated, dev, dtype, log)
    original = copy.deepcopy(plain).to(dtype=getattr(torch, dtype))
    theirs = MACECalculator(models=[original], device=dev, default_dtype=dtype)

    log(f"MD: VelocityVerlet, 0.5 fs, 300 K, {steps} steps (+2 warm-up) with each calculator ...")
    final, ms_ours = _time_md(atoms, ours, steps, dev)
    _, ms_theirs = _time_md(atoms, theirs, steps, dev)
    if dev == "cuda":
        from .backends.cuda import native

        log(f"eager conv path: {native.describe()}")

    probe = final.copy()
    probe.calc = ours
    e_ours, f_ours = probe.get_potential_energy(), probe.get_forces()
    probe = final.copy()
    probe.calc = theirs
    e_theirs, f_theirs = probe.get_potential_energy(), probe.get_forces()
    de = abs(e_ours - e_theirs)
    df = float(np.abs(f_ours - f_theirs).max())
    fscale = float(np.abs(f_theirs).max()) or 1.0

    backend = "CUDA kernels" if dev == "cuda" else "CPU reference backend"
    log("")
    rows = [(f"ours: {ours_name} ({backend})", ms_ours), ("mace-torch: MACECalculator (e3nn)", ms_theirs)]
    width = max(len(r[0]) for r in rows)
    log(f"  {'calculator':<{width}}  {'ms/step':>9}")
    for label, ms in rows:
        log(f"  {label:<{width}}  {ms:>9.2f}")
    log(f"  speed-up: {ms_theirs / ms_ours:.2f}x" + ("" if dev == "cuda" else "  (CPU reference backend: not a "
                                                      "measure of GPU speed)"))
    log(f"  parity on the last MD frame: |dE| = {de:.3e} eV ({de / len(final):.3e} eV/atom), "
        f"max |dF| = {df:.3e} eV/A (relative {df / fscale:.2e})")
    return dict(device=dev, dtype=dtype, ms_per_step_accel=ms_ours, ms_per_step_mace=ms_theirs, energy_abs=de,
                forces_abs=df, num_atoms=len(final), parity=conv.parity)


def cmd_demo(args) -> int:
    run_demo(steps=args.steps, device=args.device, dtype=args.dtype, model=args.model, structure=args.structure,
             size=args.size)
    return 0


# ---- entry point ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mace-accel", description="GPU-accelerated MACE interatomic potentials")
    parser.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("convert", help="accelerate a mace-torch model file (or turn one back into plain mace-torch)",
                       description="Load IN (a whole mace-torch model, e3nn, cuEquivariance or OpenEquivariance), "
                                   "accelerate it, check energies/forces/stress against the original on a probe "
                                   "structure, and save the whole module (on the CPU) to OUT.")
    p.add_argument("input", metavar="IN.model")
    p.add_argument("output", metavar="OUT.model")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default: the model's dtype")
    p.add_argument("--to-e3nn", action="store_true", help="convert an accelerated model back to plain mace-torch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device for the conversion and the parity check (the file is saved on the CPU)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists (never the input)")
    p.add_argument("--non-strict", action="store_true",
                   help="leave unsupported interaction blocks as e3nn instead of failing")
    p.set_defaults(func=cmd_convert)

    d = sub.add_parser("demo", help="convert the bundled model, run a short MD, print speed and parity")
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    d.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default float32")
    d.add_argument("--model", default=None,
                   help="model file, or 'random' for a random-weight model (default: the bundled model)")
    d.add_argument("--structure", default=None, help="structure file readable by ase.io.read")
    d.add_argument("--size", type=int, default=None, help="demo cell of SIZE^3 atoms (default 6 on GPU, 3 on CPU)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("mace-accel: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place errors become exit codes
        from .surgery import SurgeryError

        if args.debug:
            traceback.print_exc()
        kind = "" if isinstance(e, (SurgeryError, ValueError, OSError)) else f"{type(e).__name__}: "
        print(f"mace-accel {args.command}: error: {kind}{e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
