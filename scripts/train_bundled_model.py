#!/usr/bin/env python
"""Train the small MACE model bundled with mace_accel (``mace_accel/data/bundled.model``).

The model is trained by mace-torch's own ``run_train`` (the ``mace_run_train`` entry point) on the CPU, on
a dataset labelled with ASE's EMT calculator:

* periodic fcc alloy cells of Cu, Ni, Al and Ag (8-32 atoms), randomly strained (incl. shear) and rattled,
  some with a vacancy: energy, forces and stress;
* a few non-periodic clusters (13-19 atoms), rattled: energy and forces.

Everything (data, logs, checkpoints) is written under a temporary directory (or ``--work-dir``); only the
final ``.model`` (the plain pickled module, not the TorchScript ``_compiled`` one; the stage-two/SWA model)
and a JSON file with metadata (elements, r_max, training command, final errors parsed from mace's log) go
to ``--out`` (default: ``mace_accel/data``).

The model is trained in float32 (``--dtype``) to keep training under ~10 minutes on 2 CPU cores. Such a
model keeps float32-rounded constants (Wigner-3j / U-matrix buffers) even after ``.double()``, which limits
float64 comparisons to ~1e-9. So by default the trained model is rebuilt in float64 with mace's own
``extract_config_mace_model`` and the trained weights, its derived constants recomputed exactly (see
:func:`rebuild_float64`), checked against the trained model, and saved (float64, same mace class);
``--keep-float32-constants`` copies mace's file unchanged instead.

The script is deterministic: the dataset is bitwise reproducible (fixed numpy seeds), training uses a fixed
``--seed`` and ``--threads``; two runs agree to float32 round-off (threaded CPU reductions are not bitwise
reproducible), not necessarily bit for bit.

Usage::

    python scripts/train_bundled_model.py [--out DIR] [--epochs N] [--work-dir DIR] [--keep-work-dir]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.io import write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ELEMENTS = ["Al", "Ni", "Cu", "Ag"]
# EMT equilibrium fcc lattice constants (approximately), used with Vegard's law for alloys.
LATTICE = {"Al": 4.05, "Ni": 3.52, "Cu": 3.61, "Ag": 4.09}
SEED = 20240611
R_MAX = 5.0
MAX_SIZE_BYTES = 2 * 1024 * 1024

# (cubic conventional cell?, repeat) -> number of atoms: cubic 4*prod(rep), primitive prod(rep)
PERIODIC_SHAPES = [
    (False, (2, 2, 2)),  # 8
    (True, (2, 1, 1)),  # 8
    (False, (3, 2, 2)),  # 12
    (True, (2, 2, 1)),  # 16
    (False, (3, 3, 2)),  # 18
    (False, (3, 3, 3)),  # 27
    (True, (2, 2, 2)),  # 32
]


def _random_composition(rng: np.random.Generator, n: int) -> list[str]:
    k = int(rng.integers(1, 4))  # 1 to 3 species
    species = list(rng.choice(ELEMENTS, size=k, replace=False))
    fractions = rng.dirichlet(np.ones(k))
    symbols = list(rng.choice(species, size=n, p=fractions))
    return [str(s) for s in symbols]


def _periodic_config(rng: np.random.Generator) -> Atoms:
    cubic, rep = PERIODIC_SHAPES[int(rng.integers(len(PERIODIC_SHAPES)))]
    base = bulk("Cu", "fcc", a=1.0, cubic=cubic).repeat(rep)
    symbols = _random_composition(rng, len(base))
    a = float(np.mean([LATTICE[s] for s in symbols]))
    atoms = bulk("Cu", "fcc", a=a, cubic=cubic).repeat(rep)
    atoms.set_chemical_symbols(symbols)
    # random symmetric strain: isotropic +-4 %, deviatoric/shear up to ~3 %
    eps = rng.normal(scale=0.015, size=(3, 3))
    eps = 0.5 * (eps + eps.T) + np.eye(3) * rng.uniform(-0.04, 0.04)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    if rng.random() < 0.15:  # vacancy
        del atoms[int(rng.integers(len(atoms)))]
    atoms.rattle(stdev=float(rng.uniform(0.02, 0.15)), seed=int(rng.integers(2**31)))
    return atoms


def _cluster_config(rng: np.random.Generator) -> Atoms:
    n = int(rng.integers(13, 20))
    symbols = _random_composition(rng, n)
    a = float(np.mean([LATTICE[s] for s in symbols]))
    big = bulk("Cu", "fcc", a=a, cubic=True).repeat((3, 3, 3))
    centre = big.positions[int(rng.integers(len(big)))]
    order = np.argsort(np.linalg.norm(big.positions - centre, axis=1) + 1e-6 * rng.random(len(big)))
    pos = big.positions[order[:n]] - centre
    atoms = Atoms(symbols=symbols, positions=pos, pbc=False)
    atoms.rattle(stdev=float(rng.uniform(0.02, 0.12)), seed=int(rng.integers(2**31)))
    return atoms


def make_dataset(n_configs: int, seed: int, cluster_fraction: float = 0.12) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    configs = []
    for _ in range(n_configs):
        is_cluster = rng.random() < cluster_fraction
        atoms = _cluster_config(rng) if is_cluster else _periodic_config(rng)
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        atoms.info["REF_energy"] = float(energy)
        atoms.arrays["REF_forces"] = np.array(forces)
        if not is_cluster:
            atoms.info["REF_stress"] = np.array(atoms.get_stress(voigt=True))
        atoms.info["config_type"] = "cluster" if is_cluster else "bulk"
        atoms.calc = None
        configs.append(atoms)
    return configs


def rebuild_float64(model):
    """The same mace model rebuilt in float64 with its derived constants recomputed in float64.

    A model trained in float32 stores constants derived at build time (e3nn's Wigner-3j buffers of the
    conv tensor product, the U matrices of the symmetric contractions) rounded to float32, and ``.double()``
    keeps that rounding: its float64 results then carry ~1e-9 relative errors against an exact float64
    evaluation (e.g. equivariance, or kernels that use exact Clebsch-Gordan coefficients). Rebuilding the
    module with mace's own ``extract_config_mace_model`` under a float64 default dtype and loading every
    trained parameter and buffer except those derived constants gives the same model with exact constants.
    """
    import torch
    from mace.tools.scripts_utils import extract_config_mace_model

    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        new = model.__class__(**extract_config_mace_model(model))
    finally:
        torch.set_default_dtype(prev)
    state = model.state_dict()
    derived = sorted(k for k in state if "._w3j" in k or ".U_matrix_" in k)
    missing, unexpected = new.load_state_dict({k: v for k, v in state.items() if k not in derived}, strict=False)
    if sorted(missing) != derived or unexpected:
        raise RuntimeError(f"rebuild mismatch: missing={missing}, unexpected={unexpected}, derived={derived}")
    return new.double().eval(), derived


def _max_rel_dev(model_a, model_b, configs, r_max):
    """Max relative deviation of energies and forces of two models on some configs (float64)."""
    import torch
    from mace import data as mace_data
    from mace.tools import torch_geometric, utils

    z_table = utils.AtomicNumberTable([int(z) for z in model_a.atomic_numbers])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        graphs = [mace_data.AtomicData.from_config(mace_data.config_from_atoms(a), z_table=z_table, cutoff=r_max)
                  for a in configs]
    finally:
        torch.set_default_dtype(prev)
    batch = torch_geometric.Batch.from_data_list(graphs)
    outs = [m(batch.clone().to_dict(), compute_stress=True) for m in (model_a, model_b)]
    dev = 0.0
    for key in ("energy", "forces", "stress"):
        a, b = outs[0][key].detach(), outs[1][key].detach()
        dev = max(dev, float((a - b).abs().max() / b.abs().max()))
    return dev


def parse_final_errors(log_text: str) -> dict:
    """Pull the last error table (written by mace after training) out of the log."""
    idx = log_text.rfind("Error-table on TRAIN and VALID")
    if idx < 0:
        return {}
    lines = log_text[idx:].splitlines()
    header = None
    rows = {}
    for line in lines[1:]:
        if "|" not in line:
            if header is not None and rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if len(cells) == len(header):
            rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "mace_accel" / "data", help="where bundled.model/json go")
    p.add_argument("--epochs", type=int, default=32)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-valid", type=int, default=40)
    p.add_argument("--work-dir", type=Path, default=None, help="scratch dir (default: a fresh temp dir)")
    p.add_argument("--keep-work-dir", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-float32-constants", action="store_true",
                   help="copy mace's .model as is instead of rebuilding it in float64 with exact constants")
    p.add_argument("--dtype", default="float32", choices=["float64", "float32"], help="training dtype")
    args = p.parse_args(argv)

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="mace_accel_train_")) if args.work_dir is None else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)

    train = make_dataset(args.n_train, SEED)
    valid = make_dataset(args.n_valid, SEED + 1)
    train_file, valid_file = work / "train.xyz", work / "valid.xyz"
    write(train_file, train, format="extxyz")
    write(valid_file, valid, format="extxyz")
    n_at = [len(a) for a in train]
    print(f"dataset: {len(train)} train ({sum(n_at)} atoms), {len(valid)} valid configs "
          f"[{time.time() - t0:.1f}s]", flush=True)

    name = "mace_accel_bundled"
    seed = 123
    zs = sorted({int(z) for a in train for z in a.numbers})
    train_args = [
        f"--name={name}",
        f"--seed={seed}",
        f"--work_dir={work}",
        f"--train_file={train_file}",
        f"--valid_file={valid_file}",
        "--energy_key=REF_energy",
        "--forces_key=REF_forces",
        "--stress_key=REF_stress",
        "--model=MACE",
        "--num_channels=32",
        "--max_L=1",
        "--max_ell=2",
        "--correlation=3",
        "--num_interactions=2",
        f"--r_max={R_MAX}",
        "--num_radial_basis=8",
        "--radial_MLP=[32,32,32]",
        "--E0s=average",
        "--loss=stress",
        "--compute_stress=True",
        # energies (~0.1 eV/atom spread) and stresses (~0.05 eV/A^3) need large weights next to forces
        # (~1 eV/A) to be learned in a few epochs; stage two (SWA) weights energies even more.
        "--energy_weight=100.0",
        "--forces_weight=10.0",
        "--stress_weight=1000.0",
        "--swa_energy_weight=1000.0",
        "--swa_forces_weight=10.0",
        "--swa_stress_weight=1000.0",
        "--error_table=PerAtomRMSEstressvirials",
        f"--max_num_epochs={args.epochs}",
        "--batch_size=5",
        "--valid_batch_size=20",
        "--lr=0.01",
        "--scheduler_patience=5",
        "--eval_interval=2",
        "--swa",
        "--device=cpu",
        f"--default_dtype={args.dtype}",
        "--num_workers=0",
        "--save_cpu",
    ]
    cmd = [sys.executable, "-m", "mace.cli.run_train", *train_args]
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONHASHSEED="0")
    print("running:", " ".join(cmd), flush=True)
    with open(work / "train_stdout.txt", "w") as fh:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print((work / "train_stdout.txt").read_text()[-5000:])
        raise SystemExit(f"mace run_train failed with exit code {proc.returncode}")
    t_train = time.time() - t0

    # with --swa mace writes the stage-two (SWA) model as <name>_stagetwo.model; its errors are the last table
    # in the log. The *_compiled.model files are TorchScript and not what we want.
    model_file = work / f"{name}_stagetwo.model"
    if not model_file.exists():
        model_file = work / f"{name}.model"
    if not model_file.exists():
        raise SystemExit(f"no .model file found in {work}")
    print(f"using {model_file.name}", flush=True)

    # sanity: loads, casts to float64, has the elements we expect
    import torch

    model = torch.load(model_file, weights_only=False, map_location="cpu")
    saved_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    model = model.double()
    model_zs = [int(z) for z in model.atomic_numbers]
    assert model_zs == zs, (model_zs, zs)
    assert abs(float(model.r_max) - R_MAX) < 1e-12

    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / "bundled.model"
    if args.keep_float32_constants:
        shutil.copyfile(model_file, dest)
        postprocess = "none: mace's .model file copied as is"
    else:
        raw = model
        model, derived = rebuild_float64(raw)
        dev = _max_rel_dev(raw, model, valid[:10], R_MAX)
        print(f"rebuilt in float64 with exact constants; max rel. deviation from the float32-constant model "
              f"on 10 valid configs: {dev:.2e}", flush=True)
        if not dev < 1e-5:
            raise SystemExit(f"float64 rebuild deviates by {dev:.2e} from the trained model")
        torch.save(model, dest)
        postprocess = (f"rebuilt in float64 (mace.tools.scripts_utils.extract_config_mace_model + the trained "
                       f"state_dict) with the derived constants {len(derived)} buffers (*._w3j*, *.U_matrix_*) "
                       f"recomputed in float64; max relative deviation from mace's float32-constant .model "
                       f"(cast to float64) on 10 validation configs: {dev:.1e}")
    size = dest.stat().st_size
    if size > MAX_SIZE_BYTES:
        raise SystemExit(f"{dest} is {size} bytes, more than {MAX_SIZE_BYTES}")

    logs = sorted((work / "logs").glob("*.log")) if (work / "logs").exists() else sorted(work.rglob("*.log"))
    log_text = "\n".join(p.read_text() for p in logs)
    errors = parse_final_errors(log_text)
    from ase.data import chemical_symbols

    n_params = int(sum(p.numel() for p in model.parameters()))
    meta = {
        "description": "Small MACE model trained by mace-torch's run_train on EMT (ASE) data of fcc Al/Ni/Cu/Ag "
                       "alloys (strained, rattled, periodic cells of 8-32 atoms) and small clusters. "
                       "For tests and benchmarks only: NOT a physically accurate potential.",
        "file": "bundled.model",
        "file_size_bytes": size,
        "elements": [chemical_symbols[z] for z in model_zs],
        "atomic_numbers": model_zs,
        "r_max": float(model.r_max),
        "num_interactions": int(model.num_interactions),
        "hidden_irreps": str(model.products[0].linear.irreps_out),
        "num_parameters": n_params,
        "dtype": str(next(torch.load(dest, weights_only=False).parameters()).dtype).replace("torch.", ""),
        "training_dtype": saved_dtype,
        "postprocessing": postprocess,
        "mace_torch_version": __import__("mace").__version__,
        "torch_version": torch.__version__,
        "dataset": {"generator": "scripts/train_bundled_model.py (ASE EMT)", "seed": SEED,
                    "n_train": len(train), "n_valid": len(valid),
                    "n_train_atoms": int(sum(n_at))},
        "training_command": "python -m mace.cli.run_train " + " ".join(
            a for a in train_args if not a.startswith(("--work_dir", "--train_file", "--valid_file"))
        ) + " --train_file=train.xyz --valid_file=valid.xyz",
        "final_errors": errors,
        "error_units": "RMSE: energy meV/atom, forces meV/A, stress meV/A^3",
        "training_wall_time_s": round(t_train, 1),
    }
    (args.out / "bundled.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["final_errors"], indent=2))
    print(f"wrote {dest} ({size} bytes) and bundled.json [{time.time() - t0:.1f}s]")
    if args.work_dir is None and not args.keep_work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
