"""Helpers shared by the benchmark scripts: the Cu test system, timing, copy bandwidth, environment facts.

Nothing here imports a peer library (cuEquivariance, OpenEquivariance); the scripts import those lazily
and report them as unavailable when the import fails.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run from a checkout without installing: `python benchmarks/bench_conv.py`
    sys.path.insert(1, REPO)
# e3nn 0.4.4 torch.load()s its constants without weights_only; torch >= 2.6 refuses that unless this is set.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import torch  # noqa: E402

CU_LATTICE = 3.61  # Angstrom, fcc Cu


# ---- the test system ---------------------------------------------------------------------------------
def cu_atoms(supercell: int = 8, rattle: float = 0.05, seed: int = 0):
    """A rattled fcc Cu supercell: ``supercell**3`` cubic cells of 4 atoms (8 -> 2048 atoms)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=CU_LATTICE, cubic=True).repeat((supercell,) * 3)
    if rattle > 0:
        atoms.rattle(stdev=rattle, seed=seed)
    return atoms


def cu_graph(supercell: int = 8, cutoff: float = 6.0, rattle: float = 0.05, seed: int = 0,
             cache_dir: Optional[str] = "/tmp") -> Dict[str, np.ndarray]:
    """Edges of the rattled Cu supercell exactly as MACE builds them.

    Uses ``mace.data.neighborhood.get_neighborhood`` (matscipy's neighbour_list, self-edges removed), so the
    edge order is MACE's: sorted by sender. Returns sender, receiver (int64), edge vectors
    ``pos[receiver] - pos[sender] + shift`` (float64, as mace.modules.utils.get_edge_vectors_and_lengths)
    and num_nodes. Cached as .npz under ``cache_dir`` (None: no cache).
    """
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"mace_accel_bench_cu_s{supercell}_c{cutoff:g}_r{rattle:g}_{seed}.npz")
        if os.path.exists(path):
            try:
                d = np.load(path)
                return {k: d[k] for k in d.files}
            except Exception:  # a broken cache file: rebuild it
                pass
    from mace.data.neighborhood import get_neighborhood

    atoms = cu_atoms(supercell, rattle, seed)
    pos = atoms.get_positions()
    edge_index, shifts, _, _ = get_neighborhood(pos, cutoff=cutoff, pbc=tuple(bool(p) for p in atoms.pbc),
                                                cell=np.array(atoms.get_cell()))
    sender, receiver = edge_index[0].astype(np.int64), edge_index[1].astype(np.int64)
    vectors = pos[receiver] - pos[sender] + shifts
    out = {"sender": sender, "receiver": receiver, "vectors": vectors.astype(np.float64),
           "num_nodes": np.array(len(atoms), dtype=np.int64)}
    if path:
        try:
            tmp = path + f".{os.getpid()}.tmp.npz"
            np.savez(tmp, **out)
            os.replace(tmp, path)
        except OSError:
            pass
    return out


def cu_graph_on(device, supercell: int = 8, cutoff: float = 6.0, announce: bool = True):
    """The benchmark's Cu graph as index tensors on ``device``: (sender, receiver, num_nodes, num_edges).
    ``announce`` prints one line with the sizes and the GPU (the probe scripts' header)."""
    g = cu_graph(supercell, cutoff)
    s = torch.as_tensor(g["sender"], device=device)
    r = torch.as_tensor(g["receiver"], device=device)
    n, e = int(g["num_nodes"]), s.shape[0]
    if announce:
        name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else str(device)
        print(f"graph: {n} nodes, {e} edges; {name}", flush=True)
    return s, r, n, e


@contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ---- devices, timing ---------------------------------------------------------------------------------
def resolve_device(name: Optional[str]) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "cuda_error_out_of_memory" in text or "cudaerrormemoryallocation" in text


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def describe_error(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int,
            max_seconds: Optional[float] = None, min_reps: int = 5) -> Dict[str, Any]:
    """Median and min wall time of ``fn()`` in milliseconds.

    CUDA: one pair of CUDA events around each call, no synchronisation between calls (host overhead that
    does not overlap GPU work shows up as gaps and is counted), one synchronise at the end. CPU:
    ``time.perf_counter``. ``max_seconds`` caps a very slow measurement at fewer warm-up calls and fewer
    reps (never below ``min_reps``); the numbers actually run are reported.
    """
    one, spent, done = None, 0.0, 0
    for _ in range(max(0, warmup)):  # a slow call needs fewer: stop once a quarter of max_seconds is spent
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        one = time.perf_counter() - t0
        spent, done = spent + one, done + 1
        if max_seconds is not None and spent > 0.25 * max_seconds:
            break
    if max_seconds is not None and reps > min_reps:  # how many reps fit, from the last warm-up call
        if one is None:
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            one = time.perf_counter() - t0
        if one > 0 and one * reps > max_seconds:
            reps = max(min_reps, int(max_seconds / one))
    warmup = done
    times: List[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "mean_ms": statistics.fmean(times),
            "reps": len(times), "warmup": warmup, "times": times}


def pin_threads(cores=None):
    """Set the CPU affinity of every thread of this process to ``cores`` (None: all of the machine's cores);
    threads it starts later inherit the affinity of the thread that starts them. Returns the sorted cores.

    Why (scripts/host_affinity.py, ``host_affinity_h100.txt``): on the lent H100's virtual machine a host-bound
    fwd+bwd call spends much of its time in the hand-offs between the calling thread and the autograd engine's
    CUDA worker thread; with both on one core those are cheap context switches instead of cross-core
    wake-ups."""
    cores = sorted(cores) if cores else list(range(os.cpu_count() or 1))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that has exited meanwhile
            pass
    return cores


def gpu_warmup(device: torch.device, seconds: float = 2.0) -> None:
    """Keep the GPU busy for ``seconds`` before timing, so its clocks have left the idle state.

    The first cell a benchmark times otherwise runs while the clocks ramp up (an idle H100 reports
    345 MHz SM clock): our layer-0 float32 forward, always timed first, was bimodal between runs
    (0.31 / 0.57 ms) while every later cell was steady."""
    if device.type != "cuda":
        return
    a = torch.randn(4096, 4096, device=device)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a = torch.tanh(a @ a * 1e-3)
        torch.cuda.synchronize(device)
    del a


def copy_bandwidth(device: torch.device, mib: int = 1024, reps: int = 20, warmup: int = 3) -> Dict[str, Any]:
    """Device-to-device copy of ``mib`` MiB; bandwidth counts the bytes read plus the bytes written."""
    n = mib * (1 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup, reps)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    free_memory(device)
    return {"bytes_moved": moved, "mib": mib, "median_ms": t["median_ms"], "min_ms": t["min_ms"],
            "GBps_median": moved / (t["median_ms"] * 1e-3) / 1e9, "GBps_best": moved / (t["min_ms"] * 1e-3) / 1e9,
            "reps": t["reps"]}


# ---- environment ---------------------------------------------------------------------------------------
def _version(mod_name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod_name)
    except Exception:
        return None


def env_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "device": str(device), "host": platform.node(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / 2**30, 1),
                    gpu_sm_count=p.multi_processor_count, gpu_capability=f"{p.major}.{p.minor}")
    for dist in ("e3nn", "mace-torch", "cupy-cuda13x", "cupy", "cuequivariance", "cuequivariance-torch",
                 "cuequivariance-ops-torch-cu13", "openequivariance", "matscipy", "ase", "numpy"):
        v = _version(dist)
        if v is not None:
            info[dist] = v
    return info


def write_json(path: str, obj: Any):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(obj), f, indent=1, default=_json_default, allow_nan=False)
    os.replace(tmp, path)


def _finite(o):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def finite_or_none(x: Optional[float]) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def default_out(prefix: str, device: torch.device, ext: str = "json") -> str:
    tag = "cpu"
    if device.type == "cuda":
        tag = torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(HERE, "results", f"{prefix}_{tag}_{stamp}.{ext}")
