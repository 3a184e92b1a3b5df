"""Run-time compilation (NVRTC through CuPy) with an on-disk kernel cache.

Target: a cubin for the GPU's own architecture (``sm_90`` on an H100). Where NVRTC does not know that
architecture (a GPU newer than the toolkit), PTX for the newest virtual architecture it knows (``compute_XY``),
which the driver compiles on load. ``$MACE_ACCEL_ARCH`` (or :func:`set_arch_override`) picks the target
instead: ``compute_80`` on an H100 runs the code paths the kernels take on an A100 (every
``__CUDA_ARCH__ >= 900`` branch off), ``compute_75`` those of a T4 (no ``cp.async`` either); the GPU tests use
this to check the older GPUs' paths on the H100.

Cache layout: ``$MACE_ACCEL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/mace_accel`` or ``~/.cache/mace_accel``),
one file per kernel named by the SHA-256 of (source, options, target architecture, NVRTC version). A file is
``MAGIC || sha256(payload) || payload``; an entry whose magic or checksum does not match (truncated, corrupt)
is discarded with a warning and rebuilt. Writes go to a temporary file in the same folder and are renamed
into place, so concurrent processes never see a partial entry (the last writer wins with identical bytes).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

log = logging.getLogger("mace_accel")

CACHE_ENV = "MACE_ACCEL_CACHE_DIR"
#: Overrides the compile target (e.g. ``compute_80``: PTX whose ``__CUDA_ARCH__`` is 800, JIT-compiled by the driver).
ARCH_ENV = "MACE_ACCEL_ARCH"
_ARCH_RE = re.compile(r"^(sm|compute)_([0-9]{2,3})([af]?)$")
MAGIC = b"MACEACC1"
_HASH_LEN = 32
NVRTC_OPTIONS = ("-std=c++17", "--device-as-default-execution-space")


class KernelCompileError(RuntimeError):
    pass


def cache_dir() -> Path:
    d = os.environ.get(CACHE_ENV)
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "mace_accel")
    return Path(d)


def cache_key(source: str, options, arch: str, toolkit: str) -> str:
    h = hashlib.sha256()
    for part in (source, "\0".join(options), arch, toolkit):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()


def read_entry(path: Path) -> Optional[bytes]:
    """The payload of a cache file, or None if it is missing, truncated or corrupt (then it is removed)."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    ok = len(blob) > len(MAGIC) + _HASH_LEN and blob.startswith(MAGIC)
    payload = blob[len(MAGIC) + _HASH_LEN:] if ok else b""
    if ok and hashlib.sha256(payload).digest() == blob[len(MAGIC):len(MAGIC) + _HASH_LEN]:
        return payload
    log.warning("mace_accel: kernel cache entry %s is corrupt or truncated; rebuilding it", path)
    try:
        path.unlink()
    except OSError:
        pass
    return None


def write_entry(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def parse_arch(arch: str, where: str = "architecture") -> Tuple[str, int]:
    """(``sm`` or ``compute``, number) of an NVRTC target such as ``sm_90`` or ``compute_80``; ValueError naming
    ``where`` otherwise."""
    m = _ARCH_RE.match(arch.strip()) if isinstance(arch, str) else None
    if m is None:
        raise ValueError(f"mace_accel: {where} {arch!r} is not an NVRTC target: expected sm_XY (a cubin for that "
                         "GPU) or compute_XY (PTX that the driver compiles for the GPU it runs on), e.g. sm_90, "
                         "compute_80")
    return m.group(1), int(m.group(2))


def is_ptx_target(arch: str) -> bool:
    """Whether ``arch`` is a virtual architecture (``compute_XY``): NVRTC then emits PTX, not a cubin."""
    return arch.startswith("compute_")


def choose_arch(capability: int, supported, override: Optional[str] = None) -> str:
    """The NVRTC target for a GPU of compute capability ``capability`` (e.g. 90), given the architectures
    this NVRTC supports (``nvrtc.getSupportedArchs()``) and an optional override (see the module docstring).
    Raises ValueError for an override that is malformed, unknown to this NVRTC or newer than the GPU, and
    KernelCompileError for a GPU older than every architecture this NVRTC supports."""
    supported = sorted(int(a) for a in supported)
    if override:
        kind, num = parse_arch(override, f"{ARCH_ENV} / set_arch_override value")
        if num not in supported:
            raise ValueError(f"mace_accel: target {override!r}: this NVRTC supports architectures {supported}")
        if num > capability:
            raise ValueError(f"mace_accel: target {override!r} is newer than the GPU (sm_{capability}): its "
                             "code would not run there")
        if kind == "sm" and num // 10 != capability // 10:
            raise ValueError(f"mace_accel: target {override!r}: a cubin for another major architecture does not "
                             f"load on sm_{capability}; use compute_{num} (PTX) to run its code paths here")
        return override.strip()
    if capability in supported:
        return f"sm_{capability}"
    older = [a for a in supported if a < capability]
    if not older:
        raise KernelCompileError(f"mace_accel: this GPU (sm_{capability}) is older than every architecture this "
                                 f"NVRTC supports ({supported}); install a CuPy/CUDA toolkit that still supports "
                                 "it, or run on the CPU reference backend")
    return f"compute_{older[-1]}"  # newer GPU than the toolkit: PTX, compiled by the driver on load


_ARCH_OVERRIDE: Optional[str] = os.environ.get(ARCH_ENV) or None


def set_arch_override(arch: Optional[str]) -> None:
    """Compile every kernel loaded from now on for ``arch`` (None: the GPU's own, see :func:`choose_arch`).
    Kernels already loaded stay as they are: ``backends.cuda.target_arch_override`` also forgets those."""
    global _ARCH_OVERRIDE
    if arch is not None:
        parse_arch(arch, "set_arch_override value")
    _ARCH_OVERRIDE = arch


def arch_override() -> Optional[str]:
    return _ARCH_OVERRIDE


def nvrtc_compile(source: str, name: str, arch: str, options=NVRTC_OPTIONS) -> bytes:
    """Compile with NVRTC for ``arch``: a cubin for ``sm_XY``, PTX (NUL-terminated) for ``compute_XY``."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, f"{name}.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(prog, tuple(options) + (f"-arch={arch}",))
        except nvrtc.NVRTCError as exc:
            raise KernelCompileError(f"NVRTC failed to compile {name} for {arch}:\n"
                                     f"{nvrtc.getProgramLog(prog)}") from exc
        if not is_ptx_target(arch):
            return nvrtc.getCUBIN(prog)
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.encode() if isinstance(ptx, str) else bytes(ptx)
        return ptx if ptx.endswith(b"\0") else ptx + b"\0"  # cuModuleLoadData reads PTX up to its NUL
    finally:
        nvrtc.destroyProgram(prog)


_ARCH_LOGGED = set()


def target_arch(device_index: int) -> str:
    """The NVRTC target for CUDA device ``device_index`` (:func:`choose_arch` with this NVRTC's architectures
    and the current override)."""
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    capability = int(cupy.cuda.Device(device_index).compute_capability)
    arch = choose_arch(capability, nvrtc.getSupportedArchs(), _ARCH_OVERRIDE)
    if arch != f"sm_{capability}" and (arch, capability) not in _ARCH_LOGGED:
        _ARCH_LOGGED.add((arch, capability))
        log.info("mace_accel: kernels for device %d (sm_%d) are compiled for %s%s", device_index, capability, arch,
                 f" ({ARCH_ENV} / set_arch_override)" if _ARCH_OVERRIDE else
                 " (this NVRTC does not know the GPU's architecture: PTX, compiled by the driver on load)")
    return arch


def _cuda_version(v: int) -> str:
    """12080 -> "12.8" (the runtime's and driver's version encoding)."""
    return f"{v // 1000}.{v % 1000 // 10}"


def toolkit_version() -> str:
    from cupy_backends.cuda.libs import nvrtc

    major, minor = nvrtc.getVersion()
    return f"nvrtc{major}.{minor}"


_LOCK = threading.Lock()
_MODULES: Dict[Tuple[str, int], object] = {}
_LOGGED = set()


def load_function(source: str, name: str, device_index: int):
    """Compiled kernel ``name`` from ``source`` for the given CUDA device, through memory and disk caches."""
    import cupy

    with _LOCK:
        arch = target_arch(device_index)  # e.g. "sm_90"
        key_mem = (hashlib.sha256(source.encode()).hexdigest(), device_index, arch)
        mod = _MODULES.get(key_mem)
        if mod is None:
            with cupy.cuda.Device(device_index):
                key = cache_key(source, NVRTC_OPTIONS, arch, toolkit_version())
                path = cache_dir() / f"{key}.{'ptx' if is_ptx_target(arch) else 'cubin'}"
                cubin = read_entry(path)
                if cubin is None:
                    t0 = time.perf_counter()
                    cubin = nvrtc_compile(source, name, arch)
                    dt = time.perf_counter() - t0
                    if "compile" not in _LOGGED:
                        _LOGGED.add("compile")
                        log.info("mace_accel: compiled %s for %s in %.2f s (cached in %s)", name, arch, dt,
                                 cache_dir())
                    try:
                        write_entry(path, cubin)
                    except OSError as exc:  # read-only cache: still run, say why it is not cached
                        log.warning("mace_accel: cannot write kernel cache %s: %s", path, exc)
                mod = cupy.cuda.function.Module()
                try:
                    mod.load(cubin)  # a cubin, or PTX that the driver compiles for this GPU
                except Exception as exc:
                    hint = ""
                    if is_ptx_target(arch):  # the driver must know the PTX version NVRTC wrote
                        hint = (f" (PTX from {toolkit_version()}; the driver supports CUDA "
                                f"{_cuda_version(cupy.cuda.runtime.driverGetVersion())}: a driver older than "
                                "the NVRTC cannot compile its PTX)")
                    raise KernelCompileError(f"mace_accel: the CUDA driver could not load {name} compiled for "
                                             f"{arch} on device {device_index}: {exc}{hint}") from exc
            _MODULES[key_mem] = mod
    return mod.get_function(name)
