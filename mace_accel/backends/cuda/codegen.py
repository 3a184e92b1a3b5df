"""Stage 3a: render CUDA C++ for a :class:`~mace_accel.plan.TPPlan` from the templates in ``kernels/``.

Torch-free and CuPy-free, so the generated source can be inspected and compiled (nvcc or NVRTC) on any
machine. The straight-line contraction code is produced from ``plan.paths[*].nonzeros``, the same list
the reference executor builds its dense blocks from.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ...plan import TPPlan
from ...plan.schedule import EDGES_PER_WARP, WARP_SIZE, WARPS_PER_BLOCK, lane_dims, split_outputs

KIND_FORWARD, KIND_BACKWARD, KIND_GRAD_X, KIND_DOUBLE = 0, 1, 2, 3
DX_NONE, DX_ATOMIC, DX_STORE = 0, 1, 2
THREADS_PER_BLOCK = WARP_SIZE * WARPS_PER_BLOCK
_SCALAR = {"float32": "float", "float64": "double"}
SCALAR_BYTES = {"float32": 4, "float64": 8}


def register_words(dtype: str) -> int:
    """32-bit registers one value of ``dtype`` takes (the unit of the per-lane budgets)."""
    return SCALAR_BYTES[dtype] // 4


def template_text(name: str) -> str:
    """Read a kernel template: from the installed package data, else from the source tree's kernels/."""
    try:
        return resources.files("mace_accel.kernels").joinpath(name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        here = Path(__file__).resolve().parents[3] / "kernels" / name
        return here.read_text()


def fill_template(src: str, subs: Dict[str, str]) -> str:
    """Replace every ``$$NAME$$`` of a kernel template; a placeholder left over is an error."""
    for k, v in subs.items():
        src = src.replace(f"$${k}$$", v)
    if "$$" in src:
        raise RuntimeError(f"unrendered placeholder in kernel template: {src[src.index('$$'):][:40]}")
    return src


@dataclass(frozen=True)
class KernelSpec:
    """Everything that selects one generated kernel (besides the plan)."""

    kind: int
    dtype: str  # "float32" | "float64"
    segmented: bool
    dx_mode: int = DX_NONE
    need_dy: bool = False
    need_dw: bool = False
    edges_per_warp: int = EDGES_PER_WARP  # runs (atomic) variant only
    #: output parts (positions in plan.paths, see plan.schedule.split_outputs); () = one part, every path
    parts: Tuple[Tuple[int, ...], ...] = ()
    #: __launch_bounds__ minimum resident blocks per SM (0: no register cap), see MIN_BLOCKS_PER_SM
    min_blocks: int = 0
    #: edges ahead whose weight rows are prefetched into L2 (0: off), see PREFETCH_EDGES
    prefetch: int = 0
    #: weight rows read (and dW rows written) with an L2 evict-first policy, see STREAM_WEIGHTS
    stream_w: bool = False
    #: dy of every (part, chunk) warp added with atomics into one [E, D2] row (runs variant only; the
    #: deterministic variant writes one partial row per (part, chunk), summed in a fixed order)
    dy_atomic: bool = False
    #: sender-row atomics staged through shared memory (coalesced), see COALESCED_DX_ATOMICS
    coalesced_dx: bool = False
    #: KIND 3: also compute the gradient w.r.t. gout (OUT2). Off when the engine will not use it (the first
    #: backward started from a constant upstream gradient: a benchmark's grad_outputs, a Hessian-vector
    #: product); one of the four contractions, its accumulators and their flush atomics then drop out
    need_gg: bool = True
    #: float32 staged dx atomics issued 4 elements at a time (sm_90 vector reduction), see VECTOR_DX_ATOMICS
    vector_dx: bool = False
    #: rows copied one edge ahead into shared memory: "" none, "w" weight rows (cp.async, per lane), "wx"
    #: weight and sender rows, "b" weight rows by bulk copies (sm_90, one per path and warp), "bx" bulk
    #: weight rows and cp.async sender rows (see STAGED_ROWS); "r" the block-shared ring of whole weight rows,
    #: ``stage_ahead + 1`` slots (see ROW_RING)
    stage: str = ""
    #: edges ahead of the contracted one whose rows are in flight (``stage``; one buffer each, plus the
    #: current edge's), see STAGE_AHEAD
    stage_ahead: int = 1
    #: forward: edges per loop iteration in the parts whose accumulators fit UNROLL_MAX_ACC_WORDS (a power of
    #: two), see SMALL_FORWARD_UNROLL
    unroll: int = 1
    #: sender rows loaded as ``*(x_row + i)`` instead of ``x_row[i]``: the same loads, but ptxas allocates
    #: registers differently (a compiler effect, measured per kernel kind), see POINTER_X_LOADS
    pointer_x_loads: bool = False
    #: per-receiver rows as streaming data (L2 evict-first): the output rows the forward stores, the output-
    #: gradient rows the backward kinds load; see STREAM_RECEIVER_ROWS
    stream_rows: bool = False

    def __post_init__(self):
        if self.stage not in STAGE_CHOICES:
            raise ValueError(f"KernelSpec.stage = {self.stage!r}: expected one of {STAGE_CHOICES}")
        if not 1 <= self.stage_ahead < WARP_SIZE:
            raise ValueError(f"KernelSpec.stage_ahead = {self.stage_ahead}: expected 1 .. {WARP_SIZE - 1}")
        if self.edges_per_warp < 1:
            raise ValueError(f"KernelSpec.edges_per_warp = {self.edges_per_warp}: a work item holds at least one edge")
        if self.unroll < 1 or self.unroll & (self.unroll - 1):
            raise ValueError(f"KernelSpec.unroll = {self.unroll}: the edge loop unroll must be a power of two "
                             "(the CUDA compiler drops the trip-count checks of a partial unroll by 3)")

    @property
    def bulk_weight_rows(self) -> bool:
        """Whether the weight rows come in by sm_90 bulk copies (stages "b", "bx" and the ring "r"), which need
        16-byte aligned rows."""
        return "b" in self.stage or "r" in self.stage

    @property
    def num_parts(self) -> int:
        return max(1, len(self.parts))

    def tag(self) -> str:
        return (f"k{self.kind}_{self.dtype[-2:]}_{'seg' if self.segmented else f'run{self.edges_per_warp}'}"
                f"_dx{self.dx_mode}_dy{int(self.need_dy)}_dw{int(self.need_dw)}_p{self.num_parts}"
                + (f"_mb{self.min_blocks}" if self.min_blocks else "")
                + (f"_pf{self.prefetch}" if self.prefetch else "")
                + ("_sw" if self.stream_w else "") + ("_dya" if self.dy_atomic else "")
                + ("_cx" if self.coalesced_dx else "") + ("_v4" if self.vector_dx else "")
                + ("" if self.need_gg else "_nogg") + (f"_st{self.stage}" if self.stage else "")
                + (f"_a{self.stage_ahead}" if self.stage and self.stage_ahead > 1 else "")
                + (f"_u{self.unroll}" if self.unroll > 1 else "")
                + ("_xp" if self.pointer_x_loads else "") + ("_sr" if self.stream_rows else ""))


#: Per-lane output values (accumulators or gradient-row values, in 32-bit words) above which a kernel's
#: paths are split into output parts, one warp each (``plan.schedule.split_outputs``). Chosen from the
#: device sweep in benchmarks/results/part_sweep_h100.txt (scripts/part_sweep.py, kernel ms one part -> 96):
#: large layer-1 float64 forward 2.09 -> 1.70, backward 5.49 -> 4.95, double 32.4 -> 11.2 (3 parts); medium
#: float64 double 4.98 -> 3.75; every kernel that already fits keeps one part (smaller budgets were slower).
PART_MAX_LANE_WORDS = {KIND_FORWARD: 96, KIND_BACKWARD: 96, KIND_DOUBLE: 96}
#: dtype -> the same budget for the fused double backward without the gradient w.r.t. gout (need_gg=False).
#: Kernel alone on the H100 (scripts/double_sweep.py, double_sweep_h100.txt), budget 96 -> 64: medium float64
#: 2.650 -> 2.456 ms (one part -> two), large float64 5.368 -> 5.337 (two -> three); float32 stays at 96:
#: large float32 2.511 (one part) -> 3.260 (two).
DOUBLE_NO_GG_MAX_LANE_WORDS = {"float32": 96, "float64": 64}


#: (kind, dtype, unrolled) -> minimum resident blocks per SM asked of the compiler (``__launch_bounds__``; caps
#: registers per thread at 65536 / (blocks * THREADS_PER_BLOCK)); ``unrolled``: the kernel walks more than one
#: edge per loop iteration in some part (SMALL_FORWARD_UNROLL: the layer-0 forwards, see
#: ``unrolls_edge_loop``), which changes its register needs, so the two are chosen apart. Kernel alone
#: on the H100 (scripts/layout_sweep.py --tables min_blocks, layout_sweep_min_blocks*_h100.txt), float32
#: forward off -> 3: large layer 1 0.678 -> 0.617 ms (178 -> 168 registers: 3 blocks per SM instead of 2, no
#: spills), medium 0.347 -> 0.334 (2 and 4 the same; layer 0 with its unroll 0.150 -> 0.174, hence the
#: exception). Everything else lost or spilled: float64 forwards (large 1.21 -> 1.22-1.56), and with the
#: non-binding 2 the backward and double kernels (medium float32 backward 0.756 -> 0.787, no-gg double 1.106
#: -> 1.229); medium float32 no-gg double at 4 (167 -> 128 registers, no spills) 1.106 -> 1.118.
MIN_BLOCKS_PER_SM: Dict[Tuple[int, str, bool], int] = {(KIND_FORWARD, "float32", False): 3}


#: (kind, dtype) -> edges ahead whose weight rows (W, and ggw in the double backward) a warp prefetches into
#: L2 with one bulk prefetch per row (sm_90+; no registers held, results unchanged). The kernels wait on
#: one edge's loads at a time (docs/design.md). Device sweep, kernel alone, distance 0 -> 1
#: (scripts/prefetch_sweep.py, benchmarks/results/prefetch_sweep_h100.txt): forward float64 medium 0.904 ->
#: 0.690 ms, large 1.711 -> 1.342; layer-0 float32 forward 0.186 -> 0.156, backward 0.391 -> 0.328;
#: medium float64 double 3.74 -> 3.39. Costs up to 3% elsewhere (medium float32 forward 0.382 -> 0.392,
#: large float64 backward 5.00 -> 5.11); distances 2-8 were no better anywhere.
PREFETCH_EDGES: Dict[Tuple[int, str], int] = {
    (kind, dt): 1 for kind in (KIND_FORWARD, KIND_BACKWARD, KIND_DOUBLE) for dt in ("float32", "float64")}
# the fused float64 double backward, after the coalesced dx atomics (prefetch_sweep_coalesced_h100.txt),
# distance 0 -> 1: layer 0 1.135 -> 1.170 ms, medium 3.277 -> 3.135, large 8.235 -> 8.424
PREFETCH_EDGES[(KIND_DOUBLE, "float64")] = 0


#: (kind, dtype) -> read the per-edge weight rows (and write dW) as streaming data (L2 evict-first): each row
#: is used once, while the gathered x rows and the sender-gradient rows the atomics add into (each touched by
#: ~78 edges spread over the whole launch) must stay in L2 between their uses. Nsight Compute on the large
#: float32 layer (ncu_stream_h100.txt): off, the backward reads 1.88 GB from DRAM where its weights are 1.39
#: GB (the reused rows are evicted and re-read); on, 1.69 GB (double without d/dgout: 3.57 -> 3.25 GB).
#: Kernel alone on the H100 (then prefetch_sweep.py --stream, now layout_sweep.py --tables stream_w;
#: stream_sweep_v16c_h100.txt), off -> on:
#: float32 backward large 1.567 -> 1.489 ms, medium 0.762 -> 0.760, layer 0 0.296 -> 0.299; float32 double
#: without d/dgout large 2.223 -> 2.060, medium 1.132 -> 1.104, layer 0 0.437 -> 0.455; with d/dgout large
#: 3.673 -> 3.688, medium 1.555 -> 1.537. Float64 and the forwards gain nothing or lose (large float64
#: double 9.17 -> 9.41 in the same file; medium float32 forward 0.346 -> 0.356 in stream_sweep_v16_h100.txt;
#: v8's stream_sweep_h100.txt: large float64 forward 1.206 -> 1.389). Streaming the edge attributes, edge indices
#: and the dy atomics too was slower (large float32 double without d/dgout 2.06 -> 2.14,
#: stream_sweep_v16_edge_data_h100.txt).
STREAM_WEIGHTS: Dict[Tuple[int, str], bool] = {(KIND_BACKWARD, "float32"): True, (KIND_DOUBLE, "float32"): True}

#: (kind, dtype) -> treat the per-receiver rows as streaming data (L2 evict-first): the forward stores its
#: output rows with ``__stcs``, the backward and the fused double backward load the output-gradient rows with
#: ``__ldcs``. Each receiver's row (large layer 1: 71 x 128 values, 74 MB over the graph) is used by the warps
#: of its few runs close together in time and then never again, while the sender rows (x, ggx and the dx
#: rows the atomics add into: 19-28 MB) are reused over the whole launch. Kernel alone on the H100
#: (scripts/layout_sweep.py, layout_sweep_stream_g_h100.txt, three repeats in layout_sweep_bwd_combos_h100.txt):
#: large float32 backward 1.485 -> 1.445 ms, medium 0.758 -> 0.758; everything else the same or slower (layer 0
#: float32 double 0.567 -> 0.57-0.72, float64 double without d/dgout 0.84 -> 0.90; forwards unchanged,
#: layout_sweep_stream_rows_h100.txt). Nsight Compute (ncu_stream_g_h100.txt): the DRAM bytes do not change
#: (1.69-1.70 GB backward, 3.26 GB double), so these rows were not what evicts the sender rows.
STREAM_RECEIVER_ROWS: Dict[Tuple[int, str], bool] = {(KIND_BACKWARD, "float32"): True}

#: (kind, dtype, need_gg) -> spell the sender-row loads as pointer arithmetic (``*(x_row + i)``), which ptxas
#: allocates differently from ``x_row[i]`` (large float32 forward 178 -> 142 registers). Nothing else
#: changes, so it is chosen per kernel from measurements, kernel alone on the H100, two sessions
#: (ab_x_load_spelling_h100.txt; layout_sweep_pointer_x_h100.txt): fused double backward with d/dgout large
#: float32 3.72 -> 3.55 ms and 3.68 -> 3.53, float64 8.98 -> 8.36 and 9.19 -> 8.30 (medium and layer 0 the
#: same); without d/dgout large float64 5.33 -> 5.16 and 5.74 -> 5.49 (spread 5.25-5.88), float32 2.06 ->
#: 2.08 (off); backward large float32 1.49 -> 1.47, and with STREAM_RECEIVER_ROWS 1.483 -> 1.437 against
#: 1.445 for the streamed rows alone (layout_sweep_bwd_combos_h100.txt; medium 0.758 -> 0.755); forwards
#: slower (large float32 0.69 -> 0.77, medium 0.35 -> 0.42). With the whole-row ring (v28,
#: layout_ring_sweep_h100.txt, two repeats each): float32 double without d/dgout on, large 1.924-1.925 ->
#: 1.912-1.913, medium 1.033-1.034 -> 1.030-1.031, layer 0 0.441 -> 0.441-0.442 (so it joined the table);
#: medium float32 backward and layer-0 float64 backward and no-gg double the same either way.
POINTER_X_LOADS: Dict[Tuple[int, str, bool], bool] = {
    (KIND_BACKWARD, "float32", True): True,
    (KIND_DOUBLE, "float32", True): True,
    (KIND_DOUBLE, "float32", False): True,
    (KIND_DOUBLE, "float64", True): True,
    (KIND_DOUBLE, "float64", False): True,
}


#: Runs-variant kernels (atomic backward, fused double) add their dy into one zeroed [E, D2] buffer with
#: atomics instead of writing [parts * chunks, E, D2] partial rows that torch then sums (for the MP-0 configs
#: 4 chunks: 82 MB read and 20 MB written per float64 call, plus a torch launch). Kernel alone on the H100,
#: off -> on (scripts/bwd_breakdown.py, dy_atomic_ab_h100.txt): layer-0 float64 backward 0.631 -> 0.586 ms,
#: double 1.112 -> 0.999; medium float64 backward 1.741 -> 1.678; large float64 backward 3.407 -> 3.294,
#: but large float64 double 7.905 -> 8.213. The deterministic variant always keeps the partial rows.
ATOMIC_DY = True


def out_values_per_lane(kind: int, need_gg: bool = True) -> int:
    """Values a lane holds per output component of its part: the accumulator (forward) or the gout value
    (backward), and in the fused double backward gout plus the gg accumulator (unless ``need_gg`` is off)."""
    return 2 if kind == KIND_DOUBLE and need_gg else 1


def part_budget(kind: int, dtype: str, need_gg: bool = True) -> int:
    """Per-lane output words a warp may hold before the kernel's paths are split into parts: PART_MAX_LANE_WORDS,
    or DOUBLE_NO_GG_MAX_LANE_WORDS for the fused double backward without d/dgout."""
    budget = PART_MAX_LANE_WORDS.get(kind, 1 << 30)
    if kind == KIND_DOUBLE and not need_gg:
        budget = DOUBLE_NO_GG_MAX_LANE_WORDS.get(dtype, budget)
    return budget


def parts_for(plan: TPPlan, kind: int, dtype: str, dx_mode: int = DX_NONE,
              max_words: Optional[int] = None, need_gg: bool = True) -> Tuple[Tuple[int, ...], ...]:
    """The output parts a kernel of this kind runs with (``()``: one part). Kinds that store a per-edge or
    per-sender row with plain stores (grad-x; backward with DX_STORE) need every path in one warp."""
    if kind == KIND_GRAD_X or dx_mode == DX_STORE:
        return ()
    budget = part_budget(kind, dtype, need_gg) if max_words is None else max_words
    per_value = register_words(dtype) * out_values_per_lane(kind, need_gg)
    parts = split_outputs(plan, max(1, budget // per_value))
    return () if len(parts) == 1 else parts


def _lit(v: float) -> str:
    return f"C({v!r})"


def _blocks(paths):
    in1 = {}  # block -> (offset, d, mul)
    out = {}
    in2 = {}
    for p in paths:
        in1[p.in1_block] = (p.in1_offset, p.d1, p.mul)
        out[p.out_block] = (p.out_offset, p.do, p.mul)
        in2[p.in2_block] = (p.in2_offset, p.d2)
    return in1, in2, out


class _Code:
    def __init__(self, indent: int):
        self.lines: List[str] = []
        self.indent = indent

    def __call__(self, line: str = ""):
        self.lines.append(" " * self.indent + line if line else "")

    def text(self) -> str:
        return "\n".join(self.lines)


def _elem(off: int, d: int, m: int) -> str:
    """Index of the lane's value m of an irreps block at ``off`` with ``d`` components, in e3nn's layout: the
    block's channel u (the lane's) holds its d values at off + u * d + m."""
    return f"{off} + u * {d} + {m}"


def _load_rows(code: _Code, prefix: str, base: str, blocks: Dict[int, tuple], stage: "_Stage" = None,
               pointer: bool = False):
    """Per-lane loads of a row in e3nn layout into ``{prefix}{b}_{m}``: from the shared memory stage where
    ``stage`` holds the value, else from ``base``, spelt ``*(base + i)`` when ``pointer`` (the same load; ptxas
    allocates registers differently: KernelSpec.pointer_x_loads) or ``base[i]``."""
    for b, (off, d, mul) in sorted(blocks.items()):
        for m in range(d):
            if stage is not None and stage.has(prefix, b, m):
                src = stage.read(prefix, b, m)
            elif pointer:
                src = f"*({base} + {_elem(off, d, m)})"
            else:
                src = f"{base}[{_elem(off, d, m)}]"
            code(f"const scalar_t {prefix}{b}_{m} = (u < {mul}) ? {src} : C(0);")


#: Values of ``KernelSpec.stage`` (see there and STAGED_ROWS).
STAGE_CHOICES = ("", "w", "x", "wx", "b", "bx", "r")
#: Bytes of one mbarrier (the bulk-staged rows keep one per buffer, after the warp's buffers).
MBARRIER_BYTES = 8
#: Size and alignment granule of a bulk copy (cp.async.bulk): both addresses and the size are multiples.
BULK_ALIGN_BYTES = 16


def bulk_rows_aligned(plan: TPPlan, dtype: str) -> bool:
    """Whether every (path, channel chunk) slice of a weight row starts 16-byte aligned and spans a multiple of
    16 bytes (given a 16-byte aligned weight tensor), as the bulk-staged rows ("b") need."""
    sz = SCALAR_BYTES[dtype]
    return (plan.weight_numel * sz % BULK_ALIGN_BYTES == 0
            and all(p.weight_offset * sz % BULK_ALIGN_BYTES == 0 and p.mul * sz % BULK_ALIGN_BYTES == 0
                    for p in plan.paths))


def ring_refusal(plan: TPPlan, spec: KernelSpec, num_parts: int) -> str:
    """Why the whole-row ring (stage "r") cannot serve this kernel ("" if it can): the block's warps must be the
    channel chunks of one work item (so they walk the same edges), a row must be a whole number of 16-byte
    bulk-copy granules and of per-lane slots, and the slot count must divide a batch of WARP_SIZE edges (the
    slot of an edge is its position in the batch modulo the slot count)."""
    buffers = spec.stage_ahead + 1
    if num_parts * plan.num_chunks != WARPS_PER_BLOCK:
        return (f"needs a block to be one work item: {num_parts} part(s) x {plan.num_chunks} chunk(s) "
                f"!= {WARPS_PER_BLOCK} warps")
    if plan.weight_numel % WARP_SIZE or plan.weight_numel * SCALAR_BYTES[spec.dtype] % BULK_ALIGN_BYTES:
        return f"needs a weight row of a multiple of {WARP_SIZE} values, not {plan.weight_numel}"
    if buffers & (buffers - 1) or WARP_SIZE % buffers:
        return f"needs a power-of-two slot count that divides {WARP_SIZE}, not {buffers}"
    if spec.kind == KIND_GRAD_X:
        return "does not serve the grad-x kernel (it walks the receivers of a sender)"
    return ""


class _Stage:
    """The per-lane values of one edge that a kernel copies into shared memory one edge ahead, and where they
    sit: slot n of the warp's current buffer holds lane u's value at ``stg[n * WARP_SIZE + lane]``.

    Rows (``spec.stage``): "w" the weight rows (and ggw's in the fused double backward), "x" the sender
    rows (and ggx's), both with cp.async: each lane copies and later reads only its own slots, so the copies
    need no barrier, only a wait. "b": the weight rows with one bulk copy per slot (the chunk's 32 values of
    one path are consecutive in the row), issued by one lane each and counted in by the buffer's mbarrier.
    Keys: ("w", path) / ("v", path) for W / W2, (prefix, block, m) for X ("x") / X2 ("xa").
    """

    def __init__(self, spec: KernelSpec, paths, in1, wn: int = 0):
        self.dtype = spec.dtype
        self.ahead = spec.stage_ahead
        self.buffers = spec.stage_ahead + 1
        self.slots: Dict[tuple, int] = {}
        self.copies: List[str] = []  # cp.async issue statements, in terms of E (edge), S (sender row), dst
        self.bulk: List[Tuple[int, int, str]] = []  # (slot, mul, source) of the bulk copies
        rows = spec.stage
        bulk = "b" in rows
        #: whole-row ring ("r"): block-shared slots of the full weight row(s), see ring_issue in tp_conv.cu
        self.ring = "r" in rows
        self.ring_rows = 2 if spec.kind == KIND_DOUBLE else 1
        self.wn = wn
        if self.ring:
            self.ring_words = self.ring_rows * wn  # one slot
        elif "w" in rows or bulk:
            srcs = [("w", "W")] + ([("v", "W2")] if spec.kind == KIND_DOUBLE else [])
            for key, arr in srcs:
                for p in paths:
                    if bulk:
                        n = self.slots[(key, p.index)] = len(self.slots)
                        self.bulk.append((n, p.mul, f"{arr} + E * w_stride + {p.weight_offset} + chunk * WARP_SIZE"))
                    else:
                        self._add((key, p.index), p.mul, f"{arr} + E * w_stride + {p.weight_offset} + u")
        if "x" in rows:
            srcs = [("x", "X")] + ([("xa", "X2")] if spec.kind == KIND_DOUBLE else [])
            for prefix, arr in srcs:
                for b, (off, d, mul) in sorted(in1.items()):
                    for m in range(d):
                        self._add((prefix, b, m), mul, f"{arr} + S * D1 + {_elem(off, d, m)}")

    def _add(self, key, mul: int, src: str):
        n = self.slots[key] = len(self.slots)
        self.copies.append(f"if (u < {mul}) stage_copy(dst + {n} * WARP_SIZE, {src});")

    def has(self, *key) -> bool:
        return tuple(key) in self.slots

    def slot_count(self) -> int:
        """STAGE_SLOTS of the template: values per lane of one buffer (the ring: one slot's rows / WARP_SIZE)."""
        return self.ring_words // WARP_SIZE if self.ring else len(self.slots)

    def read(self, *key) -> str:
        return f"stg[{self.slots[tuple(key)]} * WARP_SIZE + lane]"

    def weight(self, p, which: str = "w") -> str:
        """The lane's weight of path ``p`` (``which``: "w" W, "v" W2), staged or loaded."""
        direct = f"LOAD_W({'w_row' if which == 'w' else 'w2_row'} + {p.weight_offset} + u)"
        if self.ring:
            return f"RING_WEIGHT(stg[{0 if which == 'w' else self.wn} + {p.weight_offset} + u], {direct})"
        if self.has(which, p.index):
            return self.read(which, p.index)
        return direct

    def words(self) -> int:
        """Elements per warp: the buffers of the slots, then (bulk) one mbarrier per buffer. The ring is shared
        by the block's warps: its slots and two mbarriers per slot, divided over the warps (rounded up)."""
        if self.ring:
            bar_words = 2 * self.buffers * MBARRIER_BYTES // SCALAR_BYTES[self.dtype]
            return -(-(self.buffers * self.ring_words + bar_words) // WARPS_PER_BLOCK)
        if not self.slots:
            return 0
        bars = 0
        if self.bulk:  # the mbarriers' bytes, rounded up so that every warp's buffers stay 16-byte aligned
            bar_bytes = -(-self.buffers * MBARRIER_BYTES // BULK_ALIGN_BYTES) * BULK_ALIGN_BYTES
            bars = bar_bytes // SCALAR_BYTES[self.dtype]
        return self.buffers * WARP_SIZE * len(self.slots) + bars

    def init(self) -> str:
        if self.ring:
            return ("    unsigned long long* const stage_bars = reinterpret_cast<unsigned long long*>(\n"
                    f"        row_stage + {self.buffers} * {self.ring_words});  // full[buffers], then empty[buffers]\n"
                    f"    ring_init<{self.buffers}>(stage_bars);")
        if not self.bulk:
            return ""
        return ("    unsigned long long* const stage_bars = reinterpret_cast<unsigned long long*>(\n"
                f"        row_stage + {self.buffers} * {len(self.slots)} * WARP_SIZE);  // one mbarrier per buffer\n"
                "    unsigned stage_phase = 0;  // parity of each buffer's next phase\n"
                f"    bulk_init<{self.buffers}>(stage_bars);")

    def issue(self, e: str, s: str, buffer: str, pos: str = "") -> str:
        """Statements that copy edge ``e``'s values (sender row ``s``) into ``buffer``; ``pos``: the edge's
        position in the batch (the ring needs it: its running position in the item is base - p0 + pos)."""
        if self.ring:  # every lane evaluates ``e`` (a shuffle); lane 0 of chunk 0 copies
            return (f"{{ const index_t e_ring = {e}; if (chunk == 0 && lane == 0) ring_issue<{self.buffers}>("
                    f"row_stage + ({buffer}) * {self.ring_words}, stage_bars, {buffer}, base - p0 + ({pos}), "
                    "W, W2, e_ring, w_stride); }")
        if not self.slots:
            return ""
        lines = [f"{{ const index_t E = {e}; const index_t S = {s}; (void)E; (void)S;"]
        if self.copies:
            lines.append(f"  scalar_t* __restrict__ dst = row_stage + ({buffer}) * {len(self.slots)} * WARP_SIZE + lane;")
            lines += ["  " + c for c in self.copies]
        if self.bulk:
            lines.append(f"  scalar_t* __restrict__ bdst = row_stage + ({buffer}) * {len(self.slots)} * WARP_SIZE;")
            lines.append(f"  unsigned long long* const bar = stage_bars + ({buffer});")
            muls = sorted({m for _n, m, _s in self.bulk})
            for m in muls:  # bytes of this chunk's slice of a path with m channels (0: the chunk is past it)
                lines.append(f"  const int n{m} = {m} - chunk * WARP_SIZE;")
                lines.append(f"  const unsigned bytes{m} = n{m} <= 0 ? 0u : "
                             f"(unsigned)((n{m} < WARP_SIZE ? n{m} : WARP_SIZE) * sizeof(scalar_t));")
            total = " + ".join(f"{sum(1 for _n, mm, _s in self.bulk if mm == m)}u * bytes{m}" for m in muls)
            lines.append(f"  bulk_expect(bar, {total});")
            for n, m, src in self.bulk:
                lines.append(f"  if (lane == {n % WARP_SIZE} && bytes{m}) "
                             f"bulk_copy(bdst + {n} * WARP_SIZE, {src}, bytes{m}, bar);")
        return "\n".join(lines + ["}"])

    def first(self) -> str:
        """The batch's first ``ahead`` edges into buffers 0 .. ahead - 1 (one cp.async group each, empty past
        the batch's end, so that the loop's group count stays fixed)."""
        if not self.slots and not self.ring:
            return ""
        out = []
        for k in range(self.ahead):
            e, s = f"__shfl_sync(0xffffffffu, my_e, {k})", f"__shfl_sync(0xffffffffu, my_other, {k})"
            out.append(f"if ({k} < batch) " + self.issue(e, s, str(k), str(k)))
            if self.copies:
                out.append("stage_commit();")
        return "\n".join(out)

    def wait(self) -> str:
        """Statements (in the edge loop, after the next edge's copies) that wait for edge q's buffer."""
        lines = []
        if self.copies:
            lines += ["                stage_commit();", f"                stage_wait_prev<{self.ahead}>();"]
        if self.bulk:
            lines.append("                bulk_wait(stage_bars + q % STAGE_BUFFERS, q % STAGE_BUFFERS, stage_phase);")
        if self.ring:
            lines.append("                mbar_wait_parity(stage_bars + q % STAGE_BUFFERS, "
                         "(unsigned)(((base - p0 + q) / STAGE_BUFFERS) & 1));")
        return "\n".join(lines)

    def release(self) -> str:
        """Statement after the edge's contraction: this thread is done with the ring slot of edge q."""
        if not self.ring:
            return ""
        return "            ring_release(stage_bars + STAGE_BUFFERS + q % STAGE_BUFFERS);"


def _y_loads(code: _Code, in2: Dict[int, tuple]):
    for b, (off, d) in sorted(in2.items()):
        for j in range(d):
            code(f"const scalar_t y{off + j} = y_row[{off + j}];")


def _factored(terms, a_name, b_name) -> List[str]:
    """``sum c * A[a] * B[b]`` over ``terms`` (a, b, c) as a list of products ``A[a] * (sum_b c * B[b])`` (or
    grouped on b, whichever gives fewer groups). Each product is emitted as its own ``acc += ...`` statement,
    so a term costs one FMA and a group one more (instead of two multiplies and an add per term)."""
    by_a: Dict[int, list] = {}
    by_b: Dict[int, list] = {}
    for a, b, c in terms:
        by_a.setdefault(a, []).append((b, c))
        by_b.setdefault(b, []).append((a, c))
    if len(by_b) < len(by_a):
        groups, outer, inner = by_b, b_name, a_name
    else:
        groups, outer, inner = by_a, a_name, b_name
    return [f"{outer(key)} * (" + " + ".join(f"{_lit(c)} * {inner(v)}" for v, c in rest) + ")"
            for key, rest in sorted(groups.items())]


def _accumulate(code: _Code, target: str, products: List[str], declare: bool = False):
    """``target (+)= sum(products)``, one statement per product (each compiles to an FMA chain)."""
    for n, prod in enumerate(products):
        if n == 0 and declare:
            code(f"  scalar_t {target} = {prod};")
        else:
            code(f"  {target} += {prod};")
    if declare and not products:
        code(f"  const scalar_t {target} = C(0);")


def _by(p, axis: str, first: str, second: str):
    """The path's nonzeros keyed by one index (``axis``), each term as (index ``first``, index ``second``, c)."""
    out: Dict[int, list] = {}
    pos = "ijk"
    for nz in p.nonzeros:
        out.setdefault(nz[pos.index(axis)], []).append((nz[pos.index(first)], nz[pos.index(second)], nz[3]))
    return sorted(out.items())


def _path_is(p):
    """The in1 components (i) the path's nonzeros use."""
    return sorted({nz[0] for nz in p.nonzeros})


def _scaled_x(code: _Code, p):
    """``wx_i = w * x_i`` for the in1 components the path uses (w folded into x once per path)."""
    for i in _path_is(p):
        code(f"  const scalar_t wx{i} = w * x{p.in1_block}_{i};")


def _forward_body(paths, spec: KernelSpec, code: _Code, in1, in2, st: _Stage):
    code("const index_t s = other;  // sender")
    code("const scalar_t* __restrict__ x_row = X + s * D1;")
    _y_loads(code, in2)
    _load_rows(code, "x", "x_row", in1, st, spec.pointer_x_loads)
    for p in paths:
        o2 = p.in2_offset
        code(f"{{  // path {p.index}: l{p.l1} x l{p.l2} -> l{p.lo}, {len(p.nonzeros)} nonzeros")
        code(f"  const scalar_t w = (u < {p.mul}) ? {st.weight(p)} : C(0);")
        _scaled_x(code, p)
        for k, terms in _by(p, "k", "i", "j"):
            _accumulate(code, f"a{p.out_block}_{k}", _factored(terms, lambda i: f"wx{i}", lambda j: f"y{o2 + j}"))
        code("}")


def _t_stmts(code: _Code, p, y_name: str, g_name: str, t_name: str):
    """t_i = sum_jk c_ijk y_j g_k for each i of the path (declared here)."""
    o2, ob = p.in2_offset, p.out_block
    out = []
    for i, terms in _by(p, "i", "j", "k"):
        _accumulate(code, f"{t_name}{i}", _factored(terms, lambda j: f"{y_name}{o2 + j}", lambda k: f"{g_name}{ob}_{k}"),
                    declare=True)
        out.append(i)
    return out


def _backward_body(paths, spec: KernelSpec, code: _Code, in1, in2, all_in2, st: _Stage):
    code("const index_t s = other;  // sender")
    code("const scalar_t* __restrict__ x_row = X + s * D1;")
    _y_loads(code, in2)
    _load_rows(code, "x", "x_row", in1, st, spec.pointer_x_loads)
    want_dx = spec.dx_mode != DX_NONE
    if spec.need_dy:  # every column of every part's partial row is written (zero where the part adds nothing)
        for b, (off, d) in sorted(all_in2.items()):
            for j in range(d):
                code(f"scalar_t dy{off + j} = C(0);")
    if want_dx:
        for b, (off, d, mul) in sorted(in1.items()):
            for i in range(d):
                code(f"scalar_t dx{b}_{i} = C(0);")
    for p in paths:
        b1, o2, ob = p.in1_block, p.in2_offset, p.out_block
        code(f"{{  // path {p.index}: l{p.l1} x l{p.l2} -> l{p.lo}")
        code(f"  const scalar_t w = (u < {p.mul}) ? {st.weight(p)} : C(0);")
        if want_dx or spec.need_dw:
            t = _t_stmts(code, p, "y", "g", "t")
            if want_dx:
                for i in t:
                    code(f"  dx{b1}_{i} += w * t{i};")
            if spec.need_dw:
                dw = " + ".join(f"x{b1}_{i} * t{i}" for i in t)
                code(f"  if (u < {p.mul}) STORE_DW(DW + e * WN + {p.weight_offset} + u, {dw});")
        if spec.need_dy:
            _scaled_x(code, p)
            for j, terms in _by(p, "j", "i", "k"):
                _accumulate(code, f"dy{o2 + j}", _factored(terms, lambda i: f"wx{i}", lambda k: f"g{ob}_{k}"))
        code("}")
    if spec.need_dy:
        _emit_dy_reduce(code, in2, all_in2)
    if spec.dx_mode == DX_ATOMIC:
        _emit_dx_atomic(code, in1, "OUT + s * D1", spec.coalesced_dx, spec.vector_dx)
    elif want_dx:
        code("scalar_t* __restrict__ dx_row = OUT + e * D1;")
        for b, (off, d, mul) in sorted(in1.items()):
            code(f"if (u < {mul}) {{")
            for i in range(d):
                code(f"  dx_row[{_elem(off, d, i)}] = dx{b}_{i};")
            code("}")


def _grad_x_body(paths, code: _Code, in1, in2, out):
    code("const index_t r = other;  // receiver")
    code("const scalar_t* __restrict__ g_row = G + r * DO;")
    _y_loads(code, in2)
    _load_rows(code, "g", "g_row", out)
    for p in paths:
        code(f"{{  // path {p.index}")
        code(f"  const scalar_t w = (u < {p.mul}) ? LOAD_W(w_row + {p.weight_offset} + u) : C(0);")
        for i in _t_stmts(code, p, "y", "g", "t"):
            code(f"  a{p.in1_block}_{i} += w * t{i};")
        code("}")


def _double_body(paths, spec: KernelSpec, code: _Code, in1, in2, all_in2, st: _Stage):
    """Fused double backward (KIND 3); see the kernel template's header for the four outputs (gg only when
    ``spec.need_gg``)."""
    need_gg, pointer_x = spec.need_gg, spec.pointer_x_loads
    code("const index_t s = other;  // sender")
    code("const scalar_t* __restrict__ x_row = X + s * D1;")
    code("const scalar_t* __restrict__ xa_row = X2 + s * D1;")
    _y_loads(code, in2)
    for b, (off, d) in sorted(in2.items()):
        for j in range(d):
            code(f"const scalar_t yb{off + j} = y2_row[{off + j}];")
    _load_rows(code, "x", "x_row", in1, st, pointer_x)
    _load_rows(code, "xa", "xa_row", in1, st, pointer_x)
    for b, (off, d) in sorted(all_in2.items()):
        for j in range(d):
            code(f"scalar_t dy{off + j} = C(0);")
    for b, (off, d, mul) in sorted(in1.items()):
        for i in range(d):
            code(f"scalar_t dx{b}_{i} = C(0);")
    for p in paths:
        b1, o2, ob = p.in1_block, p.in2_offset, p.out_block
        code(f"{{  // path {p.index}: l{p.l1} x l{p.l2} -> l{p.lo}")
        code(f"  const scalar_t w = (u < {p.mul}) ? {st.weight(p)} : C(0);")
        code(f"  const scalar_t v = (u < {p.mul}) ? {st.weight(p, 'v')} : C(0);")
        for i in _path_is(p):  # z = w ggx + v x multiplies y (and g in dy); w x multiplies ggy
            code(f"  const scalar_t z{i} = w * xa{b1}_{i} + v * x{b1}_{i};")
        if need_gg:
            _scaled_x(code, p)
            for k, terms in _by(p, "k", "i", "j"):
                _accumulate(code, f"a{ob}_{k}", _factored(terms, lambda i: f"z{i}", lambda j: f"y{o2 + j}")
                            + _factored(terms, lambda i: f"wx{i}", lambda j: f"yb{o2 + j}"))
        t = _t_stmts(code, p, "y", "g", "t")
        _t_stmts(code, p, "yb", "g", "q")
        for i in t:
            code(f"  dx{b1}_{i} += w * q{i} + v * t{i};")
        dw = " + ".join(f"xa{b1}_{i} * t{i} + x{b1}_{i} * q{i}" for i in t)
        code(f"  if (u < {p.mul}) STORE_DW(DW + e * WN + {p.weight_offset} + u, {dw});")
        for j, terms in _by(p, "j", "i", "k"):
            _accumulate(code, f"dy{o2 + j}", _factored(terms, lambda i: f"z{i}", lambda k: f"g{ob}_{k}"))
        code("}")
    _emit_dy_reduce(code, in2, all_in2)
    _emit_dx_atomic(code, in1, "OUT + s * D1", spec.coalesced_dx, spec.vector_dx)


#: dtype -> whether the per-edge atomics into the sender's gradient row go through the warp's shared-memory
#: stage (coalesced: consecutive lanes add consecutive elements) instead of each lane adding its own channel's
#: d components (lanes d elements apart: one 32-byte sector per lane and instruction). Kernel alone on the
#: H100 (scripts/bwd_breakdown.py, bwd_breakdown_coalesced_h100.txt), off -> on: float64 large backward
#: 5.07 -> 3.43 ms, double 10.24 -> 8.42, medium backward 1.79 -> 1.75, double 3.28 -> 3.12. float32 read
#: slower there (large backward 1.87 -> 2.32); re-measured after the no-gg double and with the stage 16-byte
#: aligned (scripts/dx_atomic_sweep.py, dx_atomic_sweep_h100.txt), off -> on: large backward 1.855 -> 1.557,
#: medium backward 0.862 -> 0.764, large no-gg double 2.507 -> 2.262, medium no-gg double 1.174 -> 1.246.
COALESCED_DX_ATOMICS = {"float32": True, "float64": True}
#: elements per vector reduction of the staged float32 dx atomics (float4: the generated code is written for 4)
VECTOR_WIDTH = 4
#: (kind, dtype) -> the staged dx atomics of a float32 kernel go out 4 elements per instruction (``atomicAdd``
#: on a float4, sm_90) where the row layout allows it (block offsets and the row length multiples of 4).
#: Kernel alone on the H100 (scripts/dx_atomic_sweep.py, dx_atomic_sweep_v4_h100.txt), staged -> staged-v4:
#: fused double without d/dgout medium 1.246 -> 1.132 ms, large 2.268 -> 2.217; with it medium 1.604 -> 1.560,
#: large 3.749 -> 3.664; backward medium 0.765 -> 0.776 (slower), large 1.559 -> 1.553: on for the double only.
VECTOR_DX_ATOMICS: Dict[Tuple[int, str], bool] = {(KIND_DOUBLE, "float32"): True}


def vector_rows_aligned(plan: TPPlan) -> bool:
    """Whether every sender row of the plan starts 16-byte aligned in a freshly allocated [N, D1] float32
    buffer (D1 a multiple of VECTOR_WIDTH), as the vector dx atomics need; each block's own offset is checked
    where its atomics are emitted."""
    return plan.in1_dim % VECTOR_WIDTH == 0


def _dx_stage_words(in1, coalesced: bool) -> int:
    """Elements of one warp's shared-memory stage for the coalesced dx atomics (0: not used)."""
    dmax = max((d for (_o, d, _m) in in1.values()), default=1)
    return WARP_SIZE * dmax if coalesced and dmax > 1 else 0


def _emit_dx_atomic(code: _Code, in1, row: str, coalesced: bool, vector: bool = False):
    """Add each lane's dx values into the sender's row with atomics. A block with d > 1 components per
    channel is first written to the warp's stage [lane * d + i] and read back transposed, so atomic m of
    the warp covers the 32 consecutive elements m * 32 + lane of the chunk's slice (e3nn layout u * d + i).
    With ``vector`` (float32, the block's offset and the row length multiples of 4), lane q of round r adds
    the 4 elements 4 (r * 32 + q) .. + 3 with one vector reduction (sm_90; scalar atomics elsewhere), bounded
    by the chunk's own 32 d elements and by its valid channels."""
    code(f"scalar_t* __restrict__ dx_row = {row};")
    stage = _dx_stage_words(in1, coalesced)
    for b, (off, d, mul) in sorted(in1.items()):
        if d == 1 or not stage:
            code(f"if (u < {mul}) {{")
            for i in range(d):
                code(f"  atomicAdd(&dx_row[{_elem(off, d, i)}], dx{b}_{i});")
            code("}")
            continue
        code("{")
        code("  __syncwarp();  // the previous use of the stage is complete")
        for i in range(d):
            code(f"  dx_stage[lane * {d} + {i}] = dx{b}_{i};")
        code("  __syncwarp();")
        code(f"  scalar_t* __restrict__ slice = dx_row + {off} + chunk * (WARP_SIZE * {d});")
        code(f"  const int valid = ({mul} - chunk * WARP_SIZE) * {d};  // elements of this chunk's channels")
        vec = vector and off % VECTOR_WIDTH == 0
        if vec:
            v = VECTOR_WIDTH
            groups = WARP_SIZE * d // v  # v-element groups of the chunk's slice
            code("#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900")
            for r in range(-(-groups // WARP_SIZE)):
                code(f"  {{ const int q = {r} * WARP_SIZE + lane;")
                code(f"    if (q < {groups} && {v} * q < valid) {{")
                code(f"      if ({v} * q + {v - 1} < valid) {{")
                code("        atomicAdd(reinterpret_cast<float4*>(slice) + q, reinterpret_cast<const float4*>(dx_stage)[q]);")
                code("      } else {")
                code(f"        for (int t = {v} * q; t < valid; ++t) atomicAdd(&slice[t], dx_stage[t]);")
                code("      }")
                code("    }")
                code("  }")
            code("#else")
        for m in range(d):
            code(f"  if ({m} * WARP_SIZE + lane < valid) "
                 f"atomicAdd(&slice[{m} * WARP_SIZE + lane], dx_stage[{m} * WARP_SIZE + lane]);")
        if vec:
            code("#endif")
        code("}")


def _emit_dy_reduce(code: _Code, in2, all_in2):
    """Sum each lane's dy values over the warp and write this (part, chunk)'s partial row: all of the plan's
    columns (``all_in2``), zeros where this part's paths (``in2``) add nothing.

    With the used columns contiguous and at most WARP_SIZE of them (always, for MACE), a transposed
    reduction: at each shuffle round a lane keeps one half of its values and sends the other half, so P
    values (P = next power of two) cost P - 1 + (5 - log2 P) shuffles instead of 5 per value, and 16
    lanes write the 16 results in one coalesced store instead of lane 0 writing all of them.
    """
    cols = [off + j for b, (off, d) in sorted(all_in2.items()) for j in range(d)]
    code("scalar_t* __restrict__ dy_row = DY + (DY_SLICE(PART_ID, chunk) * num_edges + e) * D2;")
    n = len(cols)
    if n > WARP_SIZE or cols != list(range(cols[0], cols[0] + n)):
        for c in cols:
            v = f"dy{c}"
            code(f"for (int o = WARP_SIZE / 2; o > 0; o >>= 1) {v} += __shfl_xor_sync(0xffffffffu, {v}, o);")
        code("if (lane == 0) {")
        for c in cols:
            code(f"  DY_PUT(&dy_row[{c}], dy{c});")
        code("}")
        return
    size = 1
    while size < n:
        size *= 2
    names = [f"dy{c}" for c in cols] + ["C(0)"] * (size - n)
    index_terms, low_mask, level, o = [], 0, 0, WARP_SIZE // 2
    code("{")
    while o >= 1:
        if len(names) > 1:
            h = len(names) // 2
            new_names = []
            for i in range(h):
                lo, hi = names[i], names[i + h]
                nm = f"rd{level}_{i}"
                code(f"  const scalar_t {nm} = ((lane & {o}) ? {hi} : {lo}) + "
                     f"__shfl_xor_sync(0xffffffffu, (lane & {o}) ? {lo} : {hi}, {o});")
                new_names.append(nm)
            names = new_names
            index_terms.append(f"((lane & {o}) ? {h} : 0)")
        else:
            nm = f"rd{level}_0"
            code(f"  const scalar_t {nm} = {names[0]} + __shfl_xor_sync(0xffffffffu, {names[0]}, {o});")
            names = [nm]
            low_mask |= o
        level += 1
        o //= 2
    index = " + ".join(index_terms) if index_terms else "0"
    code(f"  const int idx = {index};")
    code(f"  if ((lane & {low_mask}) == 0 && idx < {n}) DY_PUT(&dy_row[{cols[0]} + idx], {names[0]});")
    code("}")


def _acc_decl(blocks) -> str:
    names = [f"a{b}_{m}" for b, (off, d, *_rest) in sorted(blocks.items()) for m in range(d)]
    return "    scalar_t " + ", ".join(f"{n} = C(0)" for n in names) + ";"


def _acc_zero(blocks) -> str:
    return "\n".join(f"        a{b}_{m} = C(0);" for b, (off, d, *_r) in sorted(blocks.items()) for m in range(d))


def _acc_flush(blocks, row_dim: str, atomic: bool, streaming: bool = False) -> str:
    """Add (``atomic``) or store the accumulators into the segment's output row (``streaming``: stores with an
    L2 evict-first policy)."""
    lines = [f"        scalar_t* __restrict__ o_row = OUT + row * {row_dim};"]
    for b, (off, d, mul) in sorted(blocks.items()):
        lines.append(f"        if (u < {mul}) {{")
        for m in range(d):
            t = f"o_row[{_elem(off, d, m)}]"
            if atomic:
                lines.append(f"            atomicAdd(&{t}, a{b}_{m});")
            elif streaming:
                lines.append(f"            __stcs(&{t}, a{b}_{m});")
            else:
                lines.append(f"            {t} = a{b}_{m};")
        lines.append("        }")
    return "\n".join(lines)


#: Forward kernels whose per-lane accumulators fit in this many 32-bit registers walk SMALL_FORWARD_UNROLL
#: edges per loop iteration (more loads in flight per warp). Measured on the H100, forward kernel alone:
#: layer 0 (16 accumulators) float32 unroll 2/3/4 0.186/0.177/0.228 ms (unroll 4 needs 71 registers: 28
#: warps per SM and 3 rounds of warps instead of 2), float64 0.384/0.425/0.294 ms
#: (benchmarks/results/occupancy_sweep_h100.txt); medium layer 1 (40) and large (71) are fastest without
#: unrolling (unroll_sweep_h100.txt). Only powers of two: with ``#pragma unroll 3`` the CUDA 13 compiler
#: (nvcc and NVRTC) emits the loop over a batch's edges three copies at a time with no trip-count check
#: before the second and third copy and no remainder loop (2 and 4 get a remainder loop), so a batch whose
#: length is not a multiple of 3 also adds edges past its end: rel err 0.2 against the reference on the H100
#: (sanitize_conv_unroll3_h100.txt; memcheck clean, independent of the L2 prefetch). The backend copies the
#: entry into ``KernelSpec.unroll``, which refuses anything else.
UNROLL_MAX_ACC_WORDS = 32
SMALL_FORWARD_UNROLL = {"float32": 2, "float64": 4}


def _edge_unroll(paths, spec: KernelSpec) -> int:
    if spec.kind != KIND_FORWARD:
        return 1
    words = lane_dims(paths)[2] * register_words(spec.dtype)
    return spec.unroll if words <= UNROLL_MAX_ACC_WORDS else 1


def unrolls_edge_loop(plan: TPPlan, spec: KernelSpec) -> bool:
    """Whether ``spec`` walks more than one edge per loop iteration in some part (SMALL_FORWARD_UNROLL, where
    a part's accumulators fit UNROLL_MAX_ACC_WORDS): the third key of MIN_BLOCKS_PER_SM."""
    parts = spec.parts or (tuple(range(len(plan.paths))),)
    return any(_edge_unroll([plan.paths[i] for i in part], spec) > 1 for part in parts)


def _render_part(plan: TPPlan, spec: KernelSpec, paths, part: int, name: str) -> str:
    """The device function of one output part (kernels/tp_conv_part.cuh) for the given paths."""
    in1, in2, out = _blocks(paths)
    all_in2 = _blocks(plan.paths)[1]
    body = _Code(8)
    st = _Stage(spec, paths, in1, plan.weight_numel)
    if spec.kind == KIND_FORWARD:
        _forward_body(paths, spec, body, in1, in2, st)
        acc_blocks, row_dim = out, "DO"
    elif spec.kind == KIND_BACKWARD:
        _backward_body(paths, spec, body, in1, in2, all_in2, st)
        acc_blocks, row_dim = None, None
    elif spec.kind == KIND_GRAD_X:
        if spec.stage:
            raise ValueError("the grad-x kernel walks receivers of a sender: its rows are not staged")
        _grad_x_body(paths, body, in1, in2, out)
        acc_blocks, row_dim = in1, "D1"
    elif spec.kind == KIND_DOUBLE:
        if spec.segmented and spec.need_gg:  # the gg accumulators are flushed with atomics at run ends
            raise ValueError("the fused double backward with d/dgout runs over receiver-sorted runs "
                             "(segmented=False)")
        _double_body(paths, spec, body, in1, in2, all_in2, st)
        acc_blocks, row_dim = out, "DO"
    else:
        raise ValueError(f"unknown kernel kind {spec.kind}")

    g_names = [f"g{b}_{m}" for b, (off, d, mul) in sorted(out.items()) for m in range(d)]
    g_at = ("__ldcs(g_row + {})" if spec.stream_rows else "g_row[{}]").format
    g_lines = ["        const scalar_t* __restrict__ g_row = G + row * DO;"] + [
        f"        g{b}_{m} = (u < {mul}) ? {g_at(_elem(off, d, m))} : C(0);"
        for b, (off, d, mul) in sorted(out.items()) for m in range(d)]
    if spec.kind == KIND_DOUBLE:
        g_state = "    scalar_t " + ", ".join(f"{n} = C(0)" for n in g_names) + ";"
        load, end_store = "\n".join(g_lines), ""
        if spec.need_gg:
            state, zero = _acc_decl(acc_blocks) + "\n" + g_state, _acc_zero(acc_blocks)
            end_atomic = _acc_flush(acc_blocks, row_dim, atomic=True).replace("OUT + row", "OUT2 + row")
        else:
            state, zero, end_atomic = g_state, "", ""
    elif acc_blocks is not None:
        state = _acc_decl(acc_blocks)
        load, zero = "", _acc_zero(acc_blocks)
        end_store = _acc_flush(acc_blocks, row_dim, atomic=False, streaming=spec.stream_rows)
        end_atomic = _acc_flush(acc_blocks, row_dim, atomic=True)
    else:  # backward: the segment's state is the output gradient row, reloaded when the receiver changes
        state = "    scalar_t " + ", ".join(f"{n} = C(0)" for n in g_names) + ";"
        load, zero = "\n".join(g_lines), ""
        end_store = end_atomic = ""
    return fill_template(template_text("tp_conv_part.cuh"), {
        "NAME": name,
        "PART": str(part),
        "SEGMENT_STATE": state,
        "SEGMENT_LOAD": load,
        "SEGMENT_ZERO": zero,
        "SEGMENT_END_STORE": end_store,
        "SEGMENT_END_ATOMIC": end_atomic,
        "EDGE_BODY": body.text(),
        "EDGE_UNROLL": str(_edge_unroll(paths, spec)),
        "STAGE_SLOTS": str(st.slot_count()),
        "STAGE_INIT": st.init(),
        "STAGE_AHEAD": str(spec.stage_ahead),
        "STAGE_FIRST": st.first(),
        "STAGE_NEXT": st.issue("e_next", "s_next", "(q + STAGE_AHEAD) % STAGE_BUFFERS", "q + STAGE_AHEAD"),
        "STAGE_WAIT": st.wait(),
        "STAGE_RELEASE": st.release(),
    })


#: static shared memory one block may declare (CUDA's limit without the dynamic opt-in is 48 KB)
SMEM_STATIC_MAX_BYTES = 48 * 1024
#: (kind, dtype) -> rows a kernel copies one edge ahead into shared memory with cp.async ("w": the weight
#: rows, and ggw's in the fused double backward; "wx": also the sender's x row, and ggx's), so that the
#: edge's contraction reads them from shared memory instead of waiting on global loads; a kernel whose
#: buffers would not fit SMEM_STATIC_MAX_BYTES stages fewer rows. Kernel alone on the H100
#: (scripts/stage_sweep.py, stage_sweep_h100.txt), off -> on: float64 backward "wx" medium 1.685 -> 1.506 ms,
#: large 3.347 -> 3.284, layer 0 0.587 -> 0.599; float64 double without d/dgout "w" layer 0 0.862 -> 0.834,
#: medium 2.461 -> 2.488, large 5.588 -> 5.541. Every float32 kernel and the float64 forwards were slower
#: (staging took registers: large float32 backward 168 -> 191-203, one block less per SM; at the same
#: occupancy, with __launch_bounds__ asking for 3 blocks, it was 1.562 -> 1.551-1.576).
#: "b" (weight rows by sm_90 bulk copies, one 128-byte copy per path and warp, counted in by an mbarrier;
#: no L2 prefetch needed, so each weight sector crosses L2 once instead of twice) was slower in every kernel
#: (stage_sweep_bulk_h100.txt, no stage + prefetch -> "b" two edges ahead: large float32 forward 0.742 ->
#: 1.275 ms, backward 1.559 -> 2.125, double without d/dgout 2.211 -> 3.26 (one ahead); float64 backward
#: medium 1.680 -> 1.645, large 3.354 -> 3.589): the prediction that the prefetch's second L2 pass was what
#: bounds these kernels was wrong (cp.async "w" two ahead without the prefetch, large float32 backward:
#: 1.572 ms, same as now).
STAGED_ROWS: Dict[Tuple[int, str], str] = {(KIND_BACKWARD, "float64"): "wx", (KIND_DOUBLE, "float64"): "w"}
#: Before sm_90 (an A100 is sm_80) the tables above do not fit: the whole-row ring has no bulk copies there (its
#: kernels read the weights from global memory) and the L2 prefetch is compiled out, so a kernel that relies on
#: them waits on every edge's weight loads in turn. Where the compile target is older than sm_90
#: (:func:`table_choices` with ``sm90=False``), the kernels take no ring and no prefetch, and stage these rows
#: one edge ahead with cp.async ((kind, dtype) -> stage; other kinds: none). Chosen from the A100's code paths
#: run on the H100 (MACE_ACCEL_ARCH=compute_80, stage_sweep_compute80_h100.txt: a proxy, no A100 here), then
#: checked against the sm_90 tables for every kind (stage_sweep_presm90_ab_h100.txt), kernel alone, layer 0 /
#: medium / large: float32 forward 0.200 -> 0.163, 0.368 -> 0.366, 0.725 -> 0.755 ms; backward "w" 0.336 ->
#: 0.351, 0.910 -> 0.830, 1.963 -> 1.528; deterministic backward 0.373 -> 0.350, 0.941 -> 0.781, 1.484 ->
#: 1.404; double without d/dgout "w" 0.515 -> 0.476, 1.432 -> 1.214, 2.704 -> 2.376; with d/dgout 0.684 ->
#: 0.556, 1.947 -> 1.571, 4.194 -> 3.674; float64 forward "wx" 0.476 -> 0.308, 0.707 -> 0.712, 1.387 -> 1.325;
#: backward "wx" 0.603 -> 0.594, 1.694 -> 1.513, 3.156 -> 3.118; double "w" layer 0 0.858 -> 0.833 (the
#: others had these stages already).
PRE_SM90_STAGED_ROWS: Dict[Tuple[int, str], str] = {
    (KIND_FORWARD, "float64"): "wx", (KIND_BACKWARD, "float32"): "w", (KIND_BACKWARD, "float64"): "wx",
    (KIND_DOUBLE, "float32"): "w", (KIND_DOUBLE, "float64"): "w"}
#: Whether targets older than sm_90 use PRE_SM90_STAGED_ROWS (False: the sm_90 tables, as before v32; sweeps
#: compare the two).
PRE_SM90_TABLES = True
#: (kind, dtype) -> edges ahead of the contracted one that a staged kernel keeps in flight (default 1). Two
#: ahead (stage_sweep_bulk_h100.txt): float64 double without d/dgout "w" large 5.27-5.31 ms, medium 2.44-2.46,
#: against 5.36 / 2.47 unstaged in the same run: within 2%, so one.
STAGE_AHEAD: Dict[Tuple[int, str], int] = {}
#: (kind, dtype, segmented) -> edges ahead whose whole weight rows (and ggw's in the fused double backward) the block's
#: ring holds (stage "r": one bulk copy per row into block-shared slots, ``ahead + 1`` of them; 0: off). It
#: replaces STAGED_ROWS and the L2 prefetch where :func:`ring_refusal` allows it (the block's warps are the
#: channel chunks of one item); elsewhere those apply. Why: the bare row traffic of these kernels in our edge
#: order runs at 2.2-2.8 TB/s when many small warps keep it in flight (scripts/row_order_probe.py,
#: row_order_probe_h100.txt), while our warps, holding a lane's whole state in registers, are 12-16 per SM.
#: Kernel alone on the H100 (scripts/stage_sweep.py --kinds bwd double_nogg --settings noring default,
#: ring_sweep_v24b_h100.txt; the slot counts from ring_sweep_h100.txt), no ring -> ring: float32 backward
#: medium 0.755 -> 0.719 ms, large 1.467 -> 1.299 (layer 0 0.302 -> 0.303); float64 backward layer 0 0.598 ->
#: 0.590, medium 1.504 -> 1.445; no-gg double float32 layer 0 0.455 -> 0.442, medium 1.106 -> 1.035, large
#: 2.066 -> 1.934 (one edge ahead: what fits), float64 layer 0 0.840 -> 0.799; with-gg double float32 medium
#: 1.541 -> 1.395 (ring_sweep_gg_h100.txt). Keyed by (kind, dtype, segmented): the kernels that walk one
#: receiver segment per item lost with it, the forwards (layer 0 float64 0.284 -> 0.379, large float32 0.647 ->
#: 0.706) and the deterministic backward (ring_sweep_det_h100.txt: float32 layer 0 0.331 -> 0.361, large 1.263 ->
#: 1.370, float64 layer 0 0.619 -> 0.633; medium float64 1.413 -> 1.373): off there.
ROW_RING: Dict[Tuple[int, str, bool], int] = {
    (KIND_BACKWARD, "float32", False): 1, (KIND_BACKWARD, "float64", False): 3,
    (KIND_DOUBLE, "float32", False): 3, (KIND_DOUBLE, "float64", False): 3}
#: (kind, dtype, need_gg) -> edges of one work item of the runs (atomic) kernels (default schedule.EDGES_PER_WARP:
#: one batch of WARP_SIZE edges; need_gg is True for every kind but the double backward). An item longer than a
#: batch is walked in batches and flushes its accumulators at every batch end as well as at every change of
#: receiver. Kernel alone on the H100 (scripts/stage_sweep.py --settings default e64 e128 / e16 e24;
#: run_edges_sweep_h100.txt, run_edges_short_sweep_h100.txt, fwd_prefetch_and_run_edges_f64_h100.txt): longer items
#: were slower everywhere (64 edges: +0.5-4%, 128: +6-14%), so the prediction that a block's unhidden first copy
#: costs ~2% was wrong; shorter items moved the float32 kernels by under 1% (medium no-gg double 1.034 ->
#: 1.035-1.039 ms), while the float64 layer-0 backward took 0.566-0.567 ms with 24 edges against 0.589-0.590 with 32
#: (three runs) and the no-gg double 0.783 with 16 against 0.796-0.799 (medium within 0.5%, large within the spread
#: of its repeats).
RUN_EDGES: Dict[Tuple[int, str, bool], int] = {
    (KIND_BACKWARD, "float64", True): 24, (KIND_DOUBLE, "float64", False): 16}


def stage_words(plan: TPPlan, spec: KernelSpec) -> Tuple[int, int]:
    """Elements per warp of (the dx-atomics stage, the staged-row buffers), each for the largest part."""
    parts = spec.parts or (tuple(range(len(plan.paths))),)
    dx = row = 0
    for part in parts:
        paths = [plan.paths[i] for i in part]
        in1 = _blocks(paths)[0]
        if spec.kind == KIND_DOUBLE or spec.dx_mode == DX_ATOMIC:
            dx = max(dx, _dx_stage_words(in1, spec.coalesced_dx))
        if spec.stage:
            row = max(row, _Stage(spec, paths, in1, plan.weight_numel).words())
    return dx, row


def smem_bytes(spec: KernelSpec, words: Tuple[int, int]) -> int:
    """Static shared memory of one block of the kernel, from its ``stage_words``."""
    return sum(words) * SCALAR_BYTES[spec.dtype] * WARPS_PER_BLOCK


#: The values :func:`table_choices` returns, in order: MIN_BLOCKS_PER_SM's entries for a kernel that walks one
#: edge per iteration and for one that unrolls (the spec's ``min_blocks`` is picked once its parts are known),
#: KernelSpec fields, then the output-part budget.
TABLE_CHOICE_FIELDS = ("min_blocks_by_unroll", "edges_per_warp", "prefetch", "stream_w", "dy_atomic", "coalesced_dx",
                       "need_gg", "vector_dx", "stage", "stage_ahead", "unroll", "pointer_x_loads", "stream_rows",
                       "part_words")


def table_choices(plan: TPPlan, kind: int, dtype: str, segmented: bool, dx_mode: int, need_dy: bool,
                  need_gg: bool, sm90: bool = True) -> tuple:
    """What this module's per-kernel tables choose for a launch (values of TABLE_CHOICE_FIELDS: KernelSpec
    fields, then the output-part budget that :func:`parts_for` splits by). The one place that reads the
    tables: a launch's spec is memoised by these values, so a table changed at run time (a sweep, a test)
    selects a new kernel. ``sm90``: whether the compile target has sm_90's bulk copies and L2 prefetch (else
    PRE_SM90_STAGED_ROWS applies)."""
    need_gg = need_gg or kind != KIND_DOUBLE
    coalesced_dx = COALESCED_DX_ATOMICS.get(dtype, False) and (kind == KIND_DOUBLE or dx_mode == DX_ATOMIC)
    if sm90 or not PRE_SM90_TABLES:
        ring = ROW_RING.get((kind, dtype, segmented), 0)  # where the ring cannot serve, fit_stage falls back
        stage, ahead, prefetch = ("r", ring, 0) if ring else staged_rows(plan, kind, dtype)
    else:  # no ring, no prefetch: cp.async-staged rows
        stage, ahead, _ = staged_rows(plan, kind, dtype, PRE_SM90_STAGED_ROWS)
        prefetch = 0
    return (
        (MIN_BLOCKS_PER_SM.get((kind, dtype, False), 0), MIN_BLOCKS_PER_SM.get((kind, dtype, True), 0)),
        EDGES_PER_WARP if segmented else RUN_EDGES.get((kind, dtype, need_gg), EDGES_PER_WARP),
        prefetch,
        STREAM_WEIGHTS.get((kind, dtype), False),
        ATOMIC_DY and need_dy and not segmented and kind in (KIND_BACKWARD, KIND_DOUBLE),
        coalesced_dx,
        need_gg,
        # 16-byte vector atomics need 16-byte aligned rows (the backend allocates the dx buffers, so their
        # start is)
        coalesced_dx and VECTOR_DX_ATOMICS.get((kind, dtype), False) and vector_rows_aligned(plan),
        stage,
        ahead,
        SMALL_FORWARD_UNROLL.get(dtype, 1) if kind == KIND_FORWARD else 1,
        POINTER_X_LOADS.get((kind, dtype, need_gg), False),
        STREAM_RECEIVER_ROWS.get((kind, dtype), False) and kind != KIND_GRAD_X,
        part_budget(kind, dtype, need_gg),
    )


def staged_rows(plan: TPPlan, kind: int, dtype: str, table: Optional[Dict[Tuple[int, str], str]] = None
                ) -> Tuple[str, int, int]:
    """(stage, stage_ahead, prefetch) from ``table`` (default STAGED_ROWS), STAGE_AHEAD and PREFETCH_EDGES: what
    a kernel without the whole-row ring uses."""
    stage = "" if kind == KIND_GRAD_X else (STAGED_ROWS if table is None else table).get((kind, dtype), "")
    if "b" in stage and not bulk_rows_aligned(plan, dtype):  # bulk copies need 16-byte slices
        stage = stage.replace("b", "")
    return stage, (STAGE_AHEAD.get((kind, dtype), 1) if stage else 1), PREFETCH_EDGES.get((kind, dtype), 0)


def fit_stage(plan: TPPlan, spec: KernelSpec) -> KernelSpec:
    """``spec`` with its staged rows fitted to a block's static shared memory (large layers), by one rule for
    every stage: fewer edges ahead first (half as many buffers), then fewer rows ("wx" -> "w" -> "", "bx" -> "b"
    -> ""). The whole-row ring ("r") gives way to the tables' staged rows and L2 prefetch (:func:`staged_rows`)
    where it cannot serve the kernel (:func:`ring_refusal`) or does not fit with two slots."""
    def without_ring(spec: KernelSpec) -> KernelSpec:
        stage, ahead, prefetch = staged_rows(plan, spec.kind, spec.dtype)
        return replace(spec, stage=stage, stage_ahead=ahead, prefetch=prefetch)

    if "r" in spec.stage and ring_refusal(plan, spec, spec.num_parts):
        spec = without_ring(spec)
    while spec.stage and smem_bytes(spec, stage_words(plan, spec)) > SMEM_STATIC_MAX_BYTES:
        if spec.stage_ahead > 1:
            spec = replace(spec, stage_ahead=max(1, (spec.stage_ahead + 1) // 2 - 1))
        elif "r" in spec.stage:
            spec = without_ring(spec)
        else:
            spec = replace(spec, stage=spec.stage[:-1] if len(spec.stage) == 2 else "")
    return spec


def render(plan: TPPlan, spec: KernelSpec) -> Dict[str, str]:
    """Returns {"name": kernel symbol, "source": CUDA C++}."""
    prefix = f"mace_accel_tp_{plan.key[:12]}_{spec.tag()}"
    parts = spec.parts or (tuple(range(len(plan.paths))),)
    covered = sorted(i for part in parts for i in part)
    if covered != list(range(len(plan.paths))):
        raise ValueError(f"kernel parts {parts} do not cover each of the plan's {len(plan.paths)} paths once")
    blocks_of = [{plan.paths[i].out_block for i in part} for part in parts]
    if any(a & b for n, a in enumerate(blocks_of) for b in blocks_of[n + 1:]):
        raise ValueError(f"kernel parts {parts} share an output block")
    # per warp: a shared-memory stage for the coalesced dx atomics and the buffers of staged rows, each sized
    # for the largest part (a warp runs one part)
    if "b" in spec.stage and not bulk_rows_aligned(plan, spec.dtype):
        raise ValueError(f"kernel {prefix}: bulk-staged weight rows need every path's slice of a row to be "
                         f"{BULK_ALIGN_BYTES}-byte aligned (path offsets, multiplicities and the row length)")
    if "r" in spec.stage:
        why = ring_refusal(plan, spec, len(parts))
        if why:
            raise ValueError(f"kernel {prefix}: whole-row ring (stage 'r') {why}")
    if spec.vector_dx and not vector_rows_aligned(plan):
        raise ValueError(f"kernel {prefix}: vector dx atomics need a row length that is a multiple of "
                         f"{VECTOR_WIDTH}, not {plan.in1_dim}")
    dx_words, row_words = words = stage_words(plan, spec)
    smem = smem_bytes(spec, words)
    if smem > SMEM_STATIC_MAX_BYTES:
        raise ValueError(f"kernel {prefix}: {smem} bytes of static shared memory per block, over "
                         f"{SMEM_STATIC_MAX_BYTES}")
    stage_decl = (f"    __shared__ __align__(16) scalar_t dx_stage_all[(THREADS / WARP_SIZE) * {dx_words}];\n"
                  f"    scalar_t* const dx_stage = dx_stage_all + (threadIdx.x / WARP_SIZE) * {dx_words};"
                  if dx_words else "    scalar_t* const dx_stage = nullptr;  // no staged atomics in this kernel")
    # the ring ("r") is one block-shared array; the other stages give each warp its own buffers
    row_base = "" if "r" in spec.stage else f" + (threadIdx.x / WARP_SIZE) * {row_words}"
    stage_decl += ("\n" + f"    __shared__ __align__(16) scalar_t row_stage_all[(THREADS / WARP_SIZE) * {row_words}];\n"
                   f"    scalar_t* const row_stage = row_stage_all{row_base};"
                   if row_words else "\n    scalar_t* const row_stage = nullptr;  // no staged rows in this kernel")
    part_src = "\n".join(_render_part(plan, spec, [plan.paths[i] for i in part], n, prefix)
                          for n, part in enumerate(parts))
    if len(parts) == 1:
        dispatch = f"    {prefix}_part0(CONV_ARGS, item, chunk, lane, dx_stage, row_stage);"
    else:
        dispatch = "    switch (part) {\n" + "\n".join(
            f"    case {n}: {prefix}_part{n}(CONV_ARGS, item, chunk, lane, dx_stage, row_stage); break;"
            for n in range(len(parts))
        ) + "\n    }"
    subs = {
        "NAME": prefix,
        "SCALAR": _SCALAR[spec.dtype],
        "WARP_SIZE": str(WARP_SIZE),
        "NCHUNK": str(plan.num_chunks),
        "NPART": str(len(parts)),
        "PREFETCH_EDGES": str(spec.prefetch),
        "STREAM_W": str(int(spec.stream_w)),
        "DY_ATOMIC": str(int(spec.dy_atomic)),
        "EDGES_PER_WARP": str(spec.edges_per_warp),
        "SEGMENTED": str(int(spec.segmented)),
        "KIND": str(spec.kind),
        "DX_MODE": str(spec.dx_mode),
        "NEED_DY": str(int(spec.need_dy)),
        "NEED_DW": str(int(spec.need_dw)),
        "D1": str(plan.in1_dim),
        "D2": str(plan.in2_dim),
        "DO": str(plan.out_dim),
        "WN": str(plan.weight_numel),
        "THREADS": str(THREADS_PER_BLOCK),
        "PARTS": part_src,
        "LAUNCH_BOUNDS": f"THREADS, {spec.min_blocks}" if spec.min_blocks else "THREADS",
        "PART_DISPATCH": stage_decl + "\n" + dispatch,
    }
    return {"name": prefix, "source": fill_template(template_text("tp_conv.cu"), subs)}
