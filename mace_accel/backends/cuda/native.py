"""The fused conv's eager first-order path in C++ (``kernels/native_conv.cpp``).

An eager forward + backward of a short conv kernel is bound by host time (the layer-0 conv: ~0.45 ms of GPU
work, 0.45-0.9 ms of host time per call on the H100 machine), and most of that host time is Python: the
autograd.Function, our launch code (CuPy: ~20 us per launch), and the backward, which the autograd engine runs on
its device thread. The extension does the forward launch, the autograd node and the first-order backward in C++,
launching the same compiled kernels with the same arguments; the plan, the kernel choice and compilation, and
the receiver grouping stay here. A backward under ``create_graph`` (double backward), or one whose kernel is not
compiled yet, calls back into the Python path (:func:`_slow_backward`).

It is built with ``torch.utils.cpp_extension`` (a C++ compiler, ninja and the CUDA headers) on first use, into
the kernel cache folder (``native/<hash of source and torch version>``), and loaded from there afterwards.
``MACE_ACCEL_NATIVE``: ``auto`` (default: used when it builds; if it does not, one warning names the reason and
the Python path runs), ``1`` (required: a build failure raises), ``0`` (off). :func:`status` says which path
runs and why.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import threading
import time
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

# native.py is imported after the package (lazily, by the ops layer): the package's names are all defined
from . import (THREADS_PER_BLOCK, WARPS_PER_BLOCK, _dtype, _function, atomic_backward_spec, codegen, device_index,
               forward_spec, graph_csr)

NATIVE_ENV = "MACE_ACCEL_NATIVE"
SOURCE = "native_conv.cpp"
#: The backward kernel slot for the gradients asked (kernels/native_conv.cpp: need_x * 4 + need_y * 2 + need_w).
_SLOT_BITS = (4, 2, 1)
_FORWARD_SLOT = -1

_log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_STATE: Dict[str, object] = {"module": None, "error": None, "tried": False, "build_s": None}
#: (plan key, dtype, device index) -> native plan id (forgotten when the compile target changes)
_PLANS: Dict[tuple, int] = {}
#: native plan id -> (plan, dtype, device index)
_PLAN_INFO: Dict[int, Tuple] = {}
#: Every CuPy function whose handle a native plan holds: kept alive for the process (a node may launch it late).
_KEEP = []
#: The ops layer's differentiable backward: (x, y, w, gout, sender, receiver, plan_key, nx, ny, nw) -> grads.
_PYTHON_BACKWARD: Optional[Callable] = None


class NativeUnavailable(RuntimeError):
    """The C++ extension could not be built or loaded (the message says why)."""


def mode() -> str:
    value = os.environ.get(NATIVE_ENV, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{NATIVE_ENV} must be auto, 0 or 1, not {value!r}")
    return value


def status() -> Dict[str, object]:
    """Which path the eager conv takes on CUDA tensors, and why (the build's error, if any)."""
    m = mode()
    return {"mode": m, "loaded": _STATE["module"] is not None, "error": _STATE["error"],
            "build_s": _STATE["build_s"], "tried": _STATE["tried"]}


def describe() -> str:
    """:func:`status` as one line for a user (the demo prints it)."""
    st = status()
    if st["mode"] == "0":
        return f"Python launches ({NATIVE_ENV}=0)"
    if st["loaded"]:
        return f"native C++ extension (built or loaded in {st['build_s']} s)"
    if st["error"]:
        return f"Python launches (the native extension is unavailable: {str(st['error'])[:200]})"
    return "native C++ extension not used yet (no eager conv call on CUDA)"


def _driver_entry_points() -> Tuple[int, int]:
    """Addresses of cuLaunchKernel and cuCtxGetCurrent in the driver library CuPy and torch use."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    return (ctypes.cast(libcuda.cuLaunchKernel, ctypes.c_void_p).value,
            ctypes.cast(libcuda.cuCtxGetCurrent, ctypes.c_void_p).value)


def _build():
    from torch.utils import cpp_extension

    from .compiler import cache_dir

    src = codegen.template_text(SOURCE)
    digest = hashlib.sha256("\n".join([src, torch.__version__, str(torch.version.cuda)]).encode()).hexdigest()[:16]
    build = cache_dir() / "native" / digest
    t0 = time.perf_counter()
    for attempt in range(2):
        build.mkdir(parents=True, exist_ok=True)
        try:
            mod = cpp_extension.load_inline(f"mace_accel_native_{digest}", cpp_sources=[src], with_cuda=True,
                                            build_directory=str(build), extra_cflags=["-O2"], verbose=False)
            break
        except ImportError as e:  # a truncated or corrupt library in the cache: rebuild it once
            if attempt:
                raise
            warnings.warn(f"mace_accel: native extension in {build} did not load ({e}); rebuilding it")
            shutil.rmtree(build, ignore_errors=True)
    mod.set_driver(*_driver_entry_points())
    _STATE["build_s"] = round(time.perf_counter() - t0, 2)
    _log.info("mace_accel: native conv extension ready in %.1f s (%s)", _STATE["build_s"], build)
    return mod


def module():
    """The loaded extension, or None (off, or unavailable in ``auto`` mode: warned once). The mode is read on
    every call, so ``MACE_ACCEL_NATIVE=0`` turns the path off also after the extension has loaded."""
    m = mode()
    if m == "0":
        return None
    mod = _STATE["module"]
    if mod is not None:
        return mod
    if _STATE["tried"]:
        if m == "1":
            raise NativeUnavailable(f"mace_accel native conv extension: {_STATE['error']}")
        return None
    with _LOCK:
        if not _STATE["tried"]:
            try:
                _STATE["module"] = _build()
            except Exception as e:  # noqa: BLE001 - the reason is kept, warned and (mode 1) raised
                _STATE["error"] = f"{type(e).__name__}: {e}"[:2000]
                if m != "1":
                    warnings.warn(f"mace_accel: the native conv extension is unavailable, the eager conv runs "
                                  f"through Python instead (slower host path). Reason: {_STATE['error'][:500]}")
            _STATE["tried"] = True
    if _STATE["module"] is None and m == "1":
        raise NativeUnavailable(f"mace_accel native conv extension: {_STATE['error']}")
    return _STATE["module"]


def forget_plans():
    """Forget the plans (their kernels were compiled for another target); the kernels stay loaded."""
    with _LOCK:
        _PLANS.clear()


def _plan_id(mod, plan, dt: str, index: int) -> int:
    key = (plan.key, dt, index)
    pid = _PLANS.get(key)
    if pid is not None:
        return pid
    with _LOCK:
        pid = _PLANS.get(key)
        if pid is None:
            pid = mod.new_plan(plan.num_chunks, WARPS_PER_BLOCK, THREADS_PER_BLOCK, codegen.BULK_ALIGN_BYTES,
                               plan.out_dim, plan.in2_dim, plan.weight_numel, bool(plan.unused_out),
                               bool(plan.unused_in2), _slow_backward)
            spec = forward_spec(plan, dt, index)
            _set_kernel(mod, pid, _FORWARD_SLOT, spec, _function(plan, spec, index))
            _PLANS[key] = pid
            _PLAN_INFO[pid] = (plan, dt, index)
    return pid


def _set_kernel(mod, pid: int, slot: int, spec, fn) -> None:
    _KEEP.append(fn)
    mod.set_kernel(pid, slot, int(fn.ptr), int(spec.edges_per_warp), int(spec.num_parts),
                   bool(spec.bulk_weight_rows), bool(spec.dy_atomic))


def _slow_backward(pid, x, y, w, gout, sender, receiver, nx, ny, nw):
    """Called from the C++ backward (GIL held) under create_graph, or when its kernel is not compiled yet:
    the Python path's gradients; in the second case the kernel it compiled is then registered for next time."""
    plan, dt, index = _PLAN_INFO[pid]
    grads = _PYTHON_BACKWARD(x, y, w, gout, sender, receiver, plan.key, nx, ny, nw)
    if not torch.is_grad_enabled():
        spec = atomic_backward_spec(plan, dt, index, nx, ny, nw)
        slot = sum(b for b, need in zip(_SLOT_BITS, (nx, ny, nw)) if need)
        _set_kernel(_STATE["module"], pid, slot, spec, _function(plan, spec, index))
    return grads


def set_python_backward(fn: Callable) -> None:
    """The ops layer registers its differentiable backward (stage 4 calls stage 3, not the other way)."""
    global _PYTHON_BACKWARD
    _PYTHON_BACKWARD = fn


def conv(mod, x, y, w, sender, receiver, num_rows: int, plan) -> torch.Tensor:
    """The atomic-variant fused conv through the extension (x on CUDA, inputs checked and contiguous)."""
    pid = _plan_id(mod, plan, _dtype(x), device_index(x.device))
    perm, seg = graph_csr(receiver, num_rows, stable=False)
    return mod.conv(x, y, w, sender, receiver, perm, seg, num_rows, pid)
