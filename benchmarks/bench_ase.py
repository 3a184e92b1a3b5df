#!/usr/bin/env python3
"""ASE-level benchmark: ``atoms.get_forces()`` per MD-like step with a MACE-MP-0-medium-shaped model.

Model: ScaleShiftMACE with MACE-MP-0 medium's architecture and random weights (hidden 128x0e+128x1o,
max_ell 3, correlation 3, 2 RealAgnosticResidual interactions, 8 Bessel functions, polynomial cutoff 5,
radial MLP [64, 64, 64], MLP_irreps 16x0e, one element: Cu) in float32. System: a rattled 2048-atom fcc Cu
supercell, r_max 6 A (about 160k edges).

Calculators (each gets the same model, saved once to a temporary file and loaded from it):

* ``e3nn``  mace.calculators.MACECalculator(model_paths=..., device, default_dtype)   -- the reference
* ``ours``  mace_accel.MACEAccelCalculator(model, device=..., default_dtype=...)   (CUDA-graph step on CUDA)
* ``ours-eager``  the same with ``cuda_graph=False`` (eager model calls), for the breakdown
* ``cueq``  MACECalculator(..., enable_cueq=True)   (mace converts the model with mace.cli.convert_e3nn_cueq)
* ``oeq``   MACECalculator(..., enable_oeq=True)    (mace.cli.convert_e3nn_oeq)

Each step moves every atom by a random 1e-3 A (ase's rattle, same seeds for every calculator, so no
calculator can return cached results), then times ``get_forces()`` with ``time.perf_counter`` between
``torch.cuda.synchronize()`` calls. The MACE calculators compute the stress too (mace does so for every
periodic MACE model); that is part of what a user of them pays for. Forces on the starting geometry are
compared with the e3nn calculator's before timing.

GPU:  source .device/setup.sh && python benchmarks/bench_ase.py [--out PATH]
CPU:  python benchmarks/bench_ase.py --dry-run
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

CALCS = ("e3nn", "ours", "ours-eager", "cueq", "oeq")


def build_model(channels: int, r_max: float, avg_num_neighbors: float, dtype: torch.dtype, seed: int,
                interaction_first: str, max_ell: int = 3, correlation: int = 3, num_interactions: int = 2):
    """MACE-MP-0 medium's architecture with random weights (float ``dtype``)."""
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    config = dict(
        r_max=r_max, num_bessel=8, num_polynomial_cutoff=5, max_ell=max_ell,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes[interaction_first],
        num_interactions=num_interactions, num_elements=1,
        hidden_irreps=o3.Irreps(f"{channels}x0e+{channels}x1o"), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.array([-3.75]), avg_num_neighbors=float(avg_num_neighbors), atomic_numbers=[29],
        correlation=correlation, gate=torch.nn.functional.silu, radial_MLP=[64, 64, 64],
        atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    )
    with C.default_dtype(dtype):
        model = modules.ScaleShiftMACE(**config)
    model = model.to(dtype)
    desc = {k: (str(v) if not isinstance(v, (int, float, list)) else v) for k, v in config.items()
            if k not in ("atomic_energies",)}
    desc["interaction_cls"] = "RealAgnosticResidualInteractionBlock"
    desc["interaction_cls_first"] = interaction_first
    desc["model"] = "ScaleShiftMACE"
    desc["num_params"] = sum(p.numel() for p in model.parameters())
    return model, desc


def make_calculator(name: str, model_path: str, device: str, dtype_name: str):
    if name in ("ours", "ours-eager"):
        try:
            import mace_accel

            cls = mace_accel.MACEAccelCalculator
        except Exception as e:  # noqa: BLE001 -- not written yet, or broken: report it
            raise Unavailable(f"mace_accel.MACEAccelCalculator: {C.describe_error(e)}") from None
        model = torch.load(model_path, map_location=device, weights_only=False)
        return cls(model, device=device, default_dtype=dtype_name,
                   cuda_graph="auto" if name == "ours" else False)
    from mace.calculators import MACECalculator

    # mace's own check is weak (its convert modules import without the libraries, then fail late), so
    # import the libraries first and report them unavailable the way bench_conv does.
    try:
        if name == "cueq":
            import cuequivariance  # noqa: F401
            import cuequivariance_torch  # noqa: F401

            if device.startswith("cuda"):
                try:
                    import cuequivariance_ops_torch  # noqa: F401
                except Exception as e:  # noqa: BLE001
                    raise Unavailable("cuequivariance_ops_torch does not import (cuet would fall back to the "
                                      f"naive PyTorch method): {C.describe_error(e)}") from None
        elif name == "oeq":
            import openequivariance  # noqa: F401
    except Unavailable:
        raise
    except Exception as e:  # noqa: BLE001
        raise Unavailable(C.describe_error(e)) from None
    kw = {"enable_cueq": name == "cueq", "enable_oeq": name == "oeq"}
    try:
        return MACECalculator(model_paths=model_path, device=device, default_dtype=dtype_name, **kw)
    except ImportError as e:  # mace raises ImportError when the library is not installed
        raise Unavailable(C.describe_error(e)) from None


class Unavailable(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (default)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny CPU smoke run (4 atoms, 4 channels, max_ell 2, correlation 2, 1 step)")
    p.add_argument("--calcs", default=",".join(CALCS), help=f"comma list from {list(CALCS)}")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--supercell", type=int, default=None, help="cubic fcc cells per side (8 -> 2048 atoms)")
    p.add_argument("--r-max", type=float, default=None, help="Angstrom (default 6)")
    p.add_argument("--channels", type=int, default=None, help="default 128 (MACE-MP-0 medium)")
    p.add_argument("--interaction-first", default="RealAgnosticResidualInteractionBlock")
    p.add_argument("--max-ell", type=int, default=None, help="default 3 (dry run: 2)")
    p.add_argument("--correlation", type=int, default=None,
                   help="default 3 (dry run: 2; correlation 3 takes ~30 s to build on a small CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5)")
    p.add_argument("--step-rattle", type=float, default=1e-3, help="Angstrom moved per step (stdev)")
    p.add_argument("--tol", type=float, default=None,
                   help="max ||F - F_e3nn|| / ||F_e3nn|| (default 1e-3 float32, 1e-9 float64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--graph-cache", default="/tmp")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_ase_<gpu>_<time>.json)")
    a = p.parse_args(argv)
    tiny = a.dry_run
    a.supercell = a.supercell or (1 if tiny else 8)
    a.r_max = a.r_max or (3.0 if tiny else 6.0)
    a.channels = a.channels or (4 if tiny else 128)
    a.max_ell = a.max_ell or (2 if tiny else 3)
    a.correlation = a.correlation or (2 if tiny else 3)
    a.steps = a.steps or (1 if tiny else 20)
    a.warmup = a.warmup if a.warmup is not None else (1 if tiny else 5)
    if a.tol is None:
        a.tol = 1e-3 if a.dtype == "float32" else 1e-9
    if tiny and a.device == "auto":
        a.device = "cpu"
    a.calcs = [c.strip() for c in a.calcs.split(",") if c.strip()]
    bad = [c for c in a.calcs if c not in CALCS]
    if bad:
        p.error(f"--calcs: unknown {bad}; choose from {list(CALCS)}")
    if "e3nn" not in a.calcs:
        a.calcs = ["e3nn"] + a.calcs
    return a


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = C.resolve_device(args.device)
    dev = str(device) if device.type == "cpu" else "cuda"
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    out_path = args.out or C.default_out("bench_ase", device)

    def log(msg):
        print(msg, flush=True)

    env = C.env_info(device)
    log(f"bench_ase: device {env.get('gpu', device)} | torch {env['torch']} | out {out_path}")
    graph = C.cu_graph(args.supercell, args.r_max, seed=args.seed, cache_dir=args.graph_cache or None)
    n_atoms, n_edges = int(graph["num_nodes"]), len(graph["sender"])
    log(f"system: rattled fcc Cu, {n_atoms} atoms, r_max {args.r_max} A, {n_edges} edges "
        f"({n_edges / n_atoms:.1f}/atom)")

    t0 = time.perf_counter()
    model, model_desc = build_model(args.channels, args.r_max, n_edges / n_atoms, dtype, args.seed,
                                    args.interaction_first, max_ell=args.max_ell, correlation=args.correlation)
    model_desc["build_s"] = time.perf_counter() - t0
    log(f"model: {model_desc['model']} hidden {model_desc['hidden_irreps']}, {model_desc['num_params']} params, "
        f"{args.dtype}")
    tmpdir = tempfile.mkdtemp(prefix="mace_accel_bench_ase_")
    model_path = os.path.join(tmpdir, "model.model")
    torch.save(model, model_path)
    del model

    base_atoms = C.cu_atoms(args.supercell, rattle=0.05, seed=args.seed)
    report: Dict[str, Any] = {
        "benchmark": "bench_ase", "args": vars(args), "env": env,
        "system": {"description": f"rattled fcc Cu {args.supercell}^3 cubic cells", "num_atoms": n_atoms,
                   "num_edges": n_edges, "r_max": args.r_max},
        "model": model_desc, "calculators": {}, "ratios": {},
        "method": ("per step: atoms.rattle(stdev=step_rattle, seed=1000+step); cuda.synchronize; t0; "
                   "atoms.get_forces(); cuda.synchronize; t1. Median/min over the timed steps after warm-up. "
                   "MACECalculator computes energy, forces and stress on every call."),
    }
    ref_forces: Optional[np.ndarray] = None
    ref_energy: Optional[float] = None

    for name in args.calcs:
        entry: Dict[str, Any] = {"status": "error"}
        report["calculators"][name] = entry
        calc = None
        try:
            t0 = time.perf_counter()
            calc = make_calculator(name, model_path, dev, args.dtype)
            entry["construct_s"] = time.perf_counter() - t0
            atoms = base_atoms.copy()
            atoms.calc = calc
            # -- check on the starting geometry (also the first call: compilation, JIT, caches) --
            C.synchronize(device)
            t0 = time.perf_counter()
            forces = np.array(atoms.get_forces())
            C.synchronize(device)
            entry["first_call_s"] = time.perf_counter() - t0
            energy = float(atoms.get_potential_energy())
            entry["energy"] = energy
            entry["force_rms"] = float(np.sqrt((forces ** 2).mean()))
            if name == "e3nn":
                ref_forces, ref_energy = forces, energy
                entry["status"] = "reference"
                entry["force_rel_err"] = 0.0
            elif ref_forces is None:
                entry["status"] = "unchecked"
                entry["error"] = "no e3nn reference forces"
            else:
                diff = forces - ref_forces
                entry["force_rel_err"] = float(np.linalg.norm(diff) / max(np.linalg.norm(ref_forces), 1e-300))
                entry["force_max_abs_err"] = float(np.abs(diff).max())
                entry["energy_abs_err"] = abs(energy - ref_energy)
                entry["status"] = "ok" if entry["force_rel_err"] <= args.tol else "mismatch"
            # -- timed steps --
            times = []
            for step in range(args.warmup + args.steps):
                atoms.rattle(stdev=args.step_rattle, seed=1000 + step)
                C.synchronize(device)
                t0 = time.perf_counter()
                atoms.get_forces()
                C.synchronize(device)
                if step >= args.warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
            entry.update(median_ms=float(np.median(times)), min_ms=float(np.min(times)),
                         mean_ms=float(np.mean(times)), steps=len(times), warmup=args.warmup)
            if device.type == "cuda":
                entry["max_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Unavailable as e:
            entry.update(status="unavailable", error=str(e))
        except Exception as e:  # noqa: BLE001
            entry.update(status="oom" if C.is_oom(e) else "error", error=C.describe_error(e, 400))
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
        finally:
            del calc
            C.free_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        rel = entry.get("force_rel_err")
        log(f"{name:10s}: {entry['status']}"
            + (f", built in {entry['construct_s']:.1f} s" if "construct_s" in entry else "")
            + (f", {entry['median_ms']:.2f} ms/step" if "median_ms" in entry else "")
            + (f", force rel err {rel:.2e}" if rel is not None else "")
            + (f" -- {entry['error']}" if entry.get("error") else ""))

    calcs = report["calculators"]
    ours = calcs.get("ours", {})
    for peer in ("e3nn", "cueq", "oeq"):
        p = calcs.get(peer, {})
        if ours.get("status") == "ok" and p.get("status") in ("ok", "reference") and "median_ms" in ours \
                and "median_ms" in p:
            report["ratios"][f"ours/{peer}"] = ours["median_ms"] / p["median_ms"]
    report["elapsed_s"] = time.perf_counter() - t_start
    C.write_json(out_path, report)
    try:
        os.remove(model_path)
        os.rmdir(tmpdir)
    except OSError:
        pass
    log(f"wrote {out_path} ({report['elapsed_s']:.0f} s)")
    print_table(report)
    return report


def print_table(report: Dict[str, Any]):
    a, s = report["args"], report["system"]
    dev = report["env"].get("gpu", report["env"]["device"])
    lines = [f"== bench_ase on {dev}: get_forces(), {report['model']['model']} hidden "
             f"{report['model']['hidden_irreps']} (random weights), {s['num_atoms']} Cu atoms, {s['num_edges']} "
             f"edges, {a['dtype']}; median of {a['steps']} steps after {a['warmup']} warm-up",
             f"{'calc':10s} {'status':11s} {'median ms':>10s} {'min ms':>9s} {'1st call s':>10s} "
             f"{'F rel err':>10s} {'ours/this':>9s}"]
    ours = report["calculators"].get("ours", {})
    for name, e in report["calculators"].items():
        med = f"{e['median_ms']:10.2f}" if "median_ms" in e else f"{'-':>10s}"
        mn = f"{e['min_ms']:9.2f}" if "min_ms" in e else f"{'-':>9s}"
        fc = f"{e['first_call_s']:10.2f}" if "first_call_s" in e else f"{'-':>10s}"
        rel = f"{e['force_rel_err']:10.1e}" if e.get("force_rel_err") is not None else f"{'-':>10s}"
        r = report["ratios"].get(f"ours/{name}")
        rs = f"{r:9.3f}" if r is not None else f"{'-':>9s}"
        lines.append(f"{name:10s} {e['status']:11s} {med} {mn} {fc} {rel} {rs}")
        if e.get("error"):
            lines.append(f"       {e['error'][:160]}")
    if ours.get("status") == "ok":
        lines.append("ours/this < 1: ours is faster")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
