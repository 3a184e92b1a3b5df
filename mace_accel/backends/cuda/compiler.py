"""Run-time compilation (NVRTC through CuPy) with an on-disk kernel cache.

Cache layout: ``$MACE_ACCEL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/mace_accel`` or ``~/.cache/mace_accel``),
one file per kernel named by the SHA-256 of (source, options, GPU architecture, NVRTC version). A file is
``MAGIC || sha256(payload) || payload``; an entry whose magic or checksum does not match (truncated, corrupt)
is discarded with a warning and rebuilt. Writes go to a temporary file in the same folder and are renamed
into place, so concurrent processes never see a partial entry (the last writer wins with identical bytes).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

log = logging.getLogger("mace_accel")

CACHE_ENV = "MACE_ACCEL_CACHE_DIR"
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


def nvrtc_compile(source: str, name: str, arch: str, options=NVRTC_OPTIONS) -> bytes:
    """Compile to a cubin for ``arch`` (e.g. "sm_90") with NVRTC."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, f"{name}.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(prog, tuple(options) + (f"-arch={arch}",))
        except nvrtc.NVRTCError as exc:
            raise KernelCompileError(f"NVRTC failed to compile {name} for {arch}:\n"
                                     f"{nvrtc.getProgramLog(prog)}") from exc
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


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
        key_mem = (hashlib.sha256(source.encode()).hexdigest(), device_index)
        mod = _MODULES.get(key_mem)
        if mod is None:
            with cupy.cuda.Device(device_index):
                arch = f"sm_{cupy.cuda.Device(device_index).compute_capability}"  # e.g. "sm_90"
                key = cache_key(source, NVRTC_OPTIONS, arch, toolkit_version())
                path = cache_dir() / f"{key}.cubin"
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
                mod.load(cubin)
            _MODULES[key_mem] = mod
    return mod.get_function(name)
