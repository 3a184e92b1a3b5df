"""Stage 3a (run time): launch the generated kernels on PyTorch's current CUDA stream.

``forward`` / ``backward`` have the same signature and meaning as the reference executor's. Output
buffers the kernels fully overwrite are allocated uninitialised (``torch.empty``); the atomic variant
accumulates into zeroed buffers.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch

from ...plan import TPPlan
from ...plan.schedule import WARPS_PER_BLOCK, lane_dims
from . import codegen
from .codegen import (DX_ATOMIC, DX_NONE, DX_STORE, KIND_BACKWARD, KIND_DOUBLE, KIND_FORWARD, KIND_GRAD_X,
                      THREADS_PER_BLOCK, KernelSpec, parts_for, render)

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_FUNCS: Dict[Tuple[str, object, int], object] = {}
_LOCK = threading.Lock()
#: Kernel arguments are Python ints: CuPy passes an int as a 64-bit integer, and every parameter of our kernels
#: is a pointer or a 64-bit index. Measured on the H100 host: 10.8 us per 5-argument launch against 14.0 us with
#: numpy scalars, same results.
_NULL = 0


def check_available(device: torch.device) -> None:
    """Raise a clear error if the CUDA backend cannot run on ``device``."""
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("mace_accel: CUDA tensors need CuPy for the generated kernels; install it with "
                           "`pip install mace_accel[cuda]` (cupy-cuda13x), or move the inputs to the CPU "
                           f"to use the reference backend ({exc})") from exc


def compiled(plan_key: str, spec, device_index: int, render_fn):
    """The kernel for (plan, spec) on a device, rendered by ``render_fn()`` and compiled on first use (memory
    cache here, disk cache in :mod:`.compiler`). Shared by every generated-kernel family."""
    key = (plan_key, spec, device_index)
    fn = _FUNCS.get(key)
    if fn is None:
        from .compiler import load_function

        rendered = render_fn()
        fn = load_function(rendered["source"], rendered["name"], device_index)
        with _LOCK:
            _FUNCS[key] = fn
    return fn


@contextlib.contextmanager
def target_arch_override(arch: Optional[str]):
    """Within the block, compile and load every generated kernel for ``arch`` (e.g. ``compute_80``: PTX that runs
    an A100's code paths on a newer GPU; see :mod:`.compiler`), then go back to the previous target. The
    kernels loaded before are forgotten on entry and on exit, so no launch mixes targets."""
    from . import compiler, native

    previous = compiler.arch_override()
    compiler.set_arch_override(arch)
    with _LOCK:
        _FUNCS.clear()
        _TARGET_SM90.clear()
    native.forget_plans()
    try:
        yield
    finally:
        compiler.set_arch_override(previous)
        with _LOCK:
            _FUNCS.clear()
            _TARGET_SM90.clear()
        native.forget_plans()


#: device index -> whether its compile target has sm_90's bulk copies and L2 prefetch (the tables differ before:
#: codegen.PRE_SM90_STAGED_ROWS). Asked on every launch, so memoised; target_arch_override forgets it.
_TARGET_SM90: Dict[int, bool] = {}


def target_is_sm90(index: int) -> bool:
    """Whether the kernels for device ``index`` are compiled for sm_90 or newer (compiler.target_arch)."""
    hit = _TARGET_SM90.get(index)
    if hit is None:
        from . import compiler

        hit = _TARGET_SM90[index] = compiler.parse_arch(compiler.target_arch(index))[1] >= 90
    return hit


def _function(plan: TPPlan, spec: KernelSpec, device_index: int):
    return compiled(plan.key, spec, device_index, lambda: render(plan, spec))


_STREAMS: Dict[Tuple[int, int], object] = {}


def _cupy_stream(ptr: int, index: int):
    """A CuPy view of PyTorch's current stream (cached: wrapping costs host time on every launch)."""
    st = _STREAMS.get((ptr, index))
    if st is None:
        import warnings

        import cupy

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            st = cupy.cuda.ExternalStream(ptr, index)
        _STREAMS[(ptr, index)] = st
    return st


def _ptr(t) -> int:
    return _NULL if t is None else t.data_ptr()


def _launch(plan: TPPlan, spec: KernelSpec, device: torch.device, num_items: int, num_edges: int, w_stride: int,
            X=None, Y=None, W=None, G=None, sender=None, receiver=None, perm=None, seg_ptr=None,
            OUT=None, DY=None, DW=None, X2=None, Y2=None, W2=None, OUT2=None) -> None:
    warps = num_items * plan.num_chunks * spec.num_parts
    if warps == 0:
        return
    index = device_index(device)
    if spec.bulk_weight_rows:  # a weight view that does not start 16-byte aligned is copied
        W, W2 = (t.clone() if t is not None and t.data_ptr() % codegen.BULK_ALIGN_BYTES else t for t in (W, W2))
    # spelled out rather than a comprehension over a helper: this runs for every launch (~3 us less host time)
    args = (_NULL if X is None else X.data_ptr(), _NULL if Y is None else Y.data_ptr(),
            _NULL if W is None else W.data_ptr(), _NULL if G is None else G.data_ptr(),
            _NULL if sender is None else sender.data_ptr(), _NULL if receiver is None else receiver.data_ptr(),
            _NULL if perm is None else perm.data_ptr(), _NULL if seg_ptr is None else seg_ptr.data_ptr(),
            _NULL if OUT is None else OUT.data_ptr(), _NULL if DY is None else DY.data_ptr(),
            _NULL if DW is None else DW.data_ptr(), _NULL if X2 is None else X2.data_ptr(),
            _NULL if Y2 is None else Y2.data_ptr(), _NULL if W2 is None else W2.data_ptr(),
            _NULL if OUT2 is None else OUT2.data_ptr(), int(num_edges), int(num_items), int(w_stride))
    _launch_on(_function(plan, spec, index), index, -(-warps // WARPS_PER_BLOCK), THREADS_PER_BLOCK, args)


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _raw_stream(index: int) -> int:
    """Handle of PyTorch's current stream on device ``index``. ``torch._C._cuda_getCurrentRawStream`` (what
    torch's own Triton launchers call) costs ~1 us; ``torch.cuda.current_stream`` builds a Stream object (~10
    us, four times per conv forward + backward)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


def run_on_torch_stream(fn, device: torch.device, blocks: int, threads: int, args) -> None:
    """Launch a compiled kernel on PyTorch's current stream of ``device`` (1-D grid)."""
    _launch_on(fn, device_index(device), blocks, threads, args)


def _launch_on(fn, index: int, blocks: int, threads: int, args) -> None:
    """:func:`run_on_torch_stream` for a device index."""
    import cupy

    stream = _cupy_stream(_raw_stream(index), index)
    if cupy.cuda.runtime.getDevice() == index:  # the common case: no device switch (enter/exit costs host time)
        fn((blocks,), (threads,), args, stream=stream)
        return
    with cupy.cuda.Device(index):
        fn((blocks,), (threads,), args, stream=stream)


#: Threads per block of the CSR-building kernels (one thread per edge).
CSR_THREADS = 256


def _csr_function(suffix: str, device_index: int):
    name = "mace_accel_csr"
    return compiled("csr", suffix, device_index, lambda: {
        "name": f"{name}_{suffix}",
        "source": codegen.fill_template(codegen.template_text("csr.cu"), {"NAME": name})})


#: Persistent zeroed counters of csr_unordered, per (device index, raw stream): the CSR kernels leave them zeroed
#: (kernels/csr.cu), so a call allocates and clears nothing for them. Stream-keyed, because two streams could run
#: the kernels concurrently; regrown (a fresh zeroed buffer) when a graph has more rows.
_CSR_COUNTERS: Dict[Tuple[int, int], torch.Tensor] = {}
#: Held from taking the counters to the second launch: another Python thread on the same stream (the default
#: stream is shared) must not enqueue its count kernel between this call's count and place kernels.
_CSR_LOCK = threading.Lock()


def _csr_counters(num_rows: int, device: torch.device, index: int, capturing: bool):
    """(key, counters): counts[rows + 1] + blocks-done ticket, all zero. While a CUDA graph is being captured a
    fresh zeroed buffer is used instead (key None; captured as a memset: a replay must not depend on a buffer
    that may be regrown)."""
    need = num_rows + 2
    if capturing:
        return None, torch.zeros(need, dtype=torch.int32, device=device)
    key = (index, _raw_stream(index))
    buf = _CSR_COUNTERS.get(key)
    if buf is None or buf.numel() < need:
        buf = _CSR_COUNTERS[key] = torch.zeros(max(need, 2 * (0 if buf is None else buf.numel())),
                                               dtype=torch.int32, device=device)
    return key, buf


def csr_unordered(keys: torch.Tensor, num_rows: int, capturing: Optional[bool] = None):
    """(perm, seg_ptr) like :func:`csr`, but the order of the edges inside a row is the order in which atomics
    arrived (varies between runs): two small kernels (count + prefix sum in the last block, then place) on a
    persistent zeroed workspace instead of a radix sort. For the atomic variant only. ``capturing``: whether a
    CUDA graph is being captured on the current stream (asked when None)."""
    if keys.dtype != torch.int64 or not keys.is_contiguous():
        keys = keys.to(torch.int64).contiguous()
    n, dev = keys.shape[0], keys.device
    perm = torch.empty(n, dtype=torch.int64, device=dev)
    if n == 0:
        return perm, torch.zeros(num_rows + 1, dtype=torch.int64, device=dev)
    seg = torch.empty(num_rows + 1, dtype=torch.int64, device=dev)
    index = device_index(dev)
    count, place = _csr_function("count", index), _csr_function("place", index)  # both compiled before either runs
    if capturing is None:
        capturing = torch.cuda.is_current_stream_capturing()
    blocks = -(-n // CSR_THREADS)
    with _CSR_LOCK:
        key, counters = _csr_counters(num_rows, dev, index, capturing)
        args = (keys.data_ptr(), counters.data_ptr(), seg.data_ptr(), int(n), int(num_rows))
        try:
            run_on_torch_stream(count, dev, blocks, CSR_THREADS, args)
            run_on_torch_stream(place, dev, blocks, CSR_THREADS,
                                (args[0], args[2], args[1], perm.data_ptr()) + args[3:])
        except BaseException:
            _CSR_COUNTERS.pop(key, None)  # the counts may be left non-zero: the next call takes a fresh buffer
            raise
    return perm, seg


def csr(keys: torch.Tensor, num_rows: int):
    """(perm, seg_ptr): edges ordered by key (stable), and each row's segment [seg_ptr[r], seg_ptr[r+1])."""
    # searchsorted rather than bincount: no data-dependent output size, so no host sync (graph-capturable)
    if num_rows < 2**31:
        keys = keys.to(torch.int32)  # 32-bit keys: half the radix-sort passes
    sorted_keys, perm = torch.sort(keys, stable=True)
    rows = torch.arange(num_rows + 1, dtype=keys.dtype, device=keys.device)
    return perm, torch.searchsorted(sorted_keys, rows)


_CSR_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CSR_CACHE_SIZE = 4


def graph_csr(keys: torch.Tensor, num_rows: int, stable: bool = True):
    """``csr(keys, num_rows)`` (``stable``: edges of a row in index order, for the deterministic variant) or
    ``csr_unordered``, memoised for the index tensors a model reuses across layers and passes.

    The key is the tensor's memory and version counter; the entry keeps a reference to ``keys``, so the memory
    cannot be reused while cached, and any in-place change bumps the version. Not used while a CUDA graph is
    being captured: a replay must recompute the order from the (possibly refilled) static index buffer.
    """
    if torch.cuda.is_current_stream_capturing():
        return csr(keys, num_rows) if stable else csr_unordered(keys, num_rows, capturing=True)
    key = (keys.data_ptr(), keys.numel(), keys.stride(0) if keys.dim() else 1, keys._version, num_rows,
           keys.dtype, keys.device, stable)
    hit = _CSR_CACHE.get(key)
    if hit is not None:
        _CSR_CACHE.move_to_end(key)
        return hit[1], hit[2]
    perm, seg = csr(keys, num_rows) if stable else csr_unordered(keys, num_rows, capturing=False)
    _CSR_CACHE[key] = (keys, perm, seg)
    while len(_CSR_CACHE) > _CSR_CACHE_SIZE:
        _CSR_CACHE.popitem(last=False)
    return perm, seg


def _alloc(shape, like: torch.Tensor, partly_written: bool) -> torch.Tensor:
    """Output buffer: uninitialised when the kernel writes every element, zeroed when some block is never
    written (an irreps block that no path touches)."""
    return (torch.zeros if partly_written else torch.empty)(shape, dtype=like.dtype, device=like.device)


def _dtype(t: torch.Tensor) -> str:
    try:
        return _DTYPES[t.dtype]
    except KeyError:
        raise ValueError(f"mace_accel CUDA kernels support float32 and float64, not {t.dtype}") from None


def _reduce_partials(dy_part, dw_edge, w):
    """Sum the kernels' per-chunk dy partials, and the per-edge dw when the weights are shared (fixed order:
    deterministic). Either may be None (not asked for)."""
    dy = None if dy_part is None else (dy_part[0] if dy_part.shape[0] == 1 else dy_part.sum(0))
    dw = None if dw_edge is None else (dw_edge if w.dim() == 2 else dw_edge.sum(0))
    return dy, dw


_SPECS: Dict[tuple, KernelSpec] = {}


def _spec(plan: TPPlan, kind: int, dt: str, segmented: bool, dx_mode: int = DX_NONE, need_dy: bool = False,
          need_dw: bool = False, need_gg: bool = True, sm90: bool = True) -> KernelSpec:
    """The kernel spec for a launch: the tables' choices (codegen.table_choices; ``sm90``: whether the compile
    target is sm_90 or newer, :func:`target_is_sm90`) and the output parts the schedule picks for this plan and
    dtype (memoised: this runs on every call, and splitting the paths is Python work)."""
    choices = codegen.table_choices(plan, kind, dt, segmented, dx_mode, need_dy, need_gg, sm90)
    key = (plan.key, kind, dt, segmented, dx_mode, need_dy, need_dw, choices)
    spec = _SPECS.get(key)
    if spec is None:
        fields = dict(zip(codegen.TABLE_CHOICE_FIELDS, choices))
        part_words, min_blocks = fields.pop("part_words"), fields.pop("min_blocks_by_unroll")
        parts = parts_for(plan, kind, dt, dx_mode, max_words=part_words, need_gg=fields["need_gg"])
        spec = KernelSpec(kind, dt, segmented, dx_mode, need_dy, need_dw, parts=parts, **fields)
        spec = replace(spec, min_blocks=min_blocks[codegen.unrolls_edge_loop(plan, spec)])
        spec = _SPECS[key] = codegen.fit_stage(plan, spec)
    return spec


def _dy_partials(plan: TPPlan, spec: KernelSpec, x, num_edges: int):
    """[parts * chunks, E, D2] partial sums of the y gradient, one slice per (part, chunk) warp; or, when the
    kernel adds them with atomics (``spec.dy_atomic``), one zeroed [1, E, D2] slice."""
    if spec.dy_atomic:
        return torch.zeros((1, num_edges, plan.in2_dim), dtype=x.dtype, device=x.device)
    return _alloc((spec.num_parts * plan.num_chunks, num_edges, plan.in2_dim), x, plan.unused_in2)


def forward_spec(plan: TPPlan, dt: str, index: int) -> KernelSpec:
    """The forward kernel (segmented: one warp per receiver segment) for a dtype on device ``index``; the
    native path (native.py) registers the same one."""
    return _spec(plan, KIND_FORWARD, dt, True, sm90=target_is_sm90(index))


def atomic_backward_spec(plan: TPPlan, dt: str, index: int, need_x: bool, need_y: bool,
                         need_w: bool) -> KernelSpec:
    """The atomic variant's backward kernel (receiver-grouped runs, dx by atomics) for the gradients asked; the
    native path registers the same one."""
    return _spec(plan, KIND_BACKWARD, dt, False, DX_ATOMIC if need_x else DX_NONE, need_y, need_w,
                 sm90=target_is_sm90(index))


def forward(plan: TPPlan, x, y, w, sender, receiver, num_rows: int, deterministic: bool = False):
    dt, dev = _dtype(x), x.device
    num_edges = y.shape[0]
    w_stride = plan.weight_numel if w.dim() == 2 else 0
    common = dict(X=x, Y=y, W=w, sender=sender, receiver=receiver)
    spec = forward_spec(plan, dt, device_index(dev))
    if receiver is None:  # plain tensor product: row e <- edge e
        out = _alloc((num_edges, plan.out_dim), x, plan.unused_out)
        _launch(plan, spec, dev, num_edges, num_edges, w_stride, OUT=out, **common)
    else:  # one warp per (receiver segment, part, channel chunk): no atomics; bitwise reproducible when the
        # grouping is stable (deterministic), else the order inside a row follows csr_unordered's atomics
        perm, seg = graph_csr(receiver, num_rows, stable=deterministic)
        out = _alloc((num_rows, plan.out_dim), x, plan.unused_out)
        _launch(plan, spec, dev, num_rows, num_edges, w_stride, OUT=out, perm=perm, seg_ptr=seg, **common)
    return out


def backward(plan: TPPlan, x, y, w, gout, sender, receiver, need_x: bool, need_y: bool, need_w: bool,
             deterministic: bool = False):
    dt, dev = _dtype(x), x.device
    num_edges = y.shape[0]
    w_stride = plan.weight_numel if w.dim() == 2 else 0
    index = device_index(dev)
    sm90 = target_is_sm90(index)
    if receiver is None:  # plain tensor product
        spec = _spec(plan, KIND_BACKWARD, dt, True, DX_STORE if need_x else DX_NONE, need_y, need_w, sm90=sm90)
    elif deterministic:
        spec = _spec(plan, KIND_BACKWARD, dt, True, DX_NONE, need_y, need_w, sm90=sm90)
    else:
        spec = atomic_backward_spec(plan, dt, index, need_x, need_y, need_w)
    dy_part = _dy_partials(plan, spec, x, num_edges) if need_y else None
    dw_edge = torch.empty(num_edges, plan.weight_numel, dtype=x.dtype, device=dev) if need_w else None
    common = dict(X=x, Y=y, W=w, G=gout, sender=sender, receiver=receiver, DY=dy_part, DW=dw_edge)
    dx = None
    if receiver is None:
        dx = _alloc(x.shape, x, plan.unused_in1) if need_x else None
        _launch(plan, spec, dev, num_edges, num_edges, w_stride, OUT=dx, **common)
    elif deterministic:
        if need_y or need_w:
            perm, seg = graph_csr(receiver, gout.shape[0])
            _launch(plan, spec, dev, gout.shape[0], num_edges, w_stride, perm=perm, seg_ptr=seg, **common)
        if need_x:
            dx = _alloc(x.shape, x, plan.unused_in1)
            perm, seg = graph_csr(sender, x.shape[0])
            _launch(plan, _spec(plan, KIND_GRAD_X, dt, True, sm90=sm90), dev, x.shape[0], num_edges, w_stride,
                    X=None, Y=y, W=w, G=gout, sender=sender, receiver=receiver, perm=perm, seg_ptr=seg, OUT=dx)
    else:
        dx = torch.zeros_like(x) if need_x else None
        items = -(-num_edges // spec.edges_per_warp)
        perm, _ = graph_csr(receiver, gout.shape[0], stable=False)  # receiver-grouped runs: few gout reloads
        _launch(plan, spec, dev, items, num_edges, w_stride, OUT=dx, perm=perm, **common)
    return (dx,) + _reduce_partials(dy_part, dw_edge, w)


#: Per-lane live values (in 32-bit registers) above which the fused double-backward kernel spills badly; the
#: op then composes three forward and three backward launches instead (measured: large layer-1 float64 ran
#: 27.6 ms composed vs 46.1 ms fused; medium float32 6.6 ms composed vs 5.1 ms fused; benchmarks/results).
FUSED_DOUBLE_MAX_LANE_WORDS = 256


_FITS: Dict[Tuple[str, KernelSpec], bool] = {}


def fused_double_fits(plan: TPPlan, dtype: torch.dtype, need_gg: bool = True) -> bool:
    """Whether every output part of the fused double-backward kernel keeps its lane state in registers:
    gout (+ the gg accumulator when ``need_gg``) per output value, x + ggx + gx per in1 value, y + ggy + gy
    per in2 value (memoised per spec: asked on every double backward)."""
    dt = _DTYPES.get(dtype, "float64")
    spec = _spec(plan, KIND_DOUBLE, dt, False, DX_ATOMIC, True, True, need_gg=need_gg)
    fits = _FITS.get((plan.key, spec))
    if fits is None:
        words = 0
        for part in spec.parts or (tuple(range(len(plan.paths))),):
            in1, in2, out = lane_dims([plan.paths[i] for i in part])
            words = max(words, codegen.out_values_per_lane(KIND_DOUBLE, need_gg) * out + 3 * in1 + 3 * in2)
        fits = _FITS[(plan.key, spec)] = words * codegen.register_words(dt) <= FUSED_DOUBLE_MAX_LANE_WORDS
    return fits


def double_backward(plan: TPPlan, x, y, w, gout, ggx, ggy, ggw, sender, receiver, need_gg: bool = True):
    """Fused derivative of the backward pass (atomic variant, conv only): one pass over the edges instead of
    three forward and three backward passes. Returns (gx, gy, gw, ggout); ggout is None unless ``need_gg``
    (the kernel then skips that contraction)."""
    dt, dev = _dtype(x), x.device
    num_edges = y.shape[0]
    w_stride = plan.weight_numel if w.dim() == 2 else 0
    gx = torch.zeros_like(x)
    gg = torch.zeros_like(gout) if need_gg else None
    spec = _spec(plan, KIND_DOUBLE, dt, False, DX_ATOMIC, True, True, need_gg=need_gg,
                 sm90=target_is_sm90(device_index(dev)))
    gy_part = _dy_partials(plan, spec, x, num_edges)
    gw_edge = torch.empty(num_edges, plan.weight_numel, dtype=x.dtype, device=dev)
    perm, _ = graph_csr(receiver, gout.shape[0], stable=False)
    _launch(plan, spec, dev, -(-num_edges // spec.edges_per_warp), num_edges, w_stride, X=x, Y=y, W=w, G=gout,
            sender=sender, receiver=receiver, perm=perm, OUT=gx, DY=gy_part, DW=gw_edge, X2=ggx, Y2=ggy, W2=ggw,
            OUT2=gg)
    gy, gw = _reduce_partials(gy_part, gw_edge, w)
    return gx, gy, gw, gg
