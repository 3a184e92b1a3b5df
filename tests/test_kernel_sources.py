"""CPU: every generated kernel source compiles for sm_90 (nvcc here; NVRTC where CuPy can load it), and, as PTX,
for the older GPUs' code paths (sm_80, sm_75; NVRTC)."""
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from mace_accel.backends.cuda.codegen import (DX_ATOMIC, DX_NONE, DX_STORE, KIND_BACKWARD, KIND_DOUBLE, KIND_FORWARD,
                                              KIND_GRAD_X, KernelSpec, fit_stage, parts_for, render)
from mace_accel.plan import build_plan
from mace_accel.plan.schedule import EDGES_PER_WARP
from mace_accel.problem import TPProblem
from ptx_checks import nvrtc_or_skip
from tp_cases import launched_specs, mace_conv_args


def _split_specs(plan, dtype):
    """The kinds that may run as several output parts, forced to split (small register budget)."""
    out = []
    for kind, seg, dx, dy, dw in ((KIND_FORWARD, True, DX_NONE, False, False),
                                  (KIND_BACKWARD, False, DX_ATOMIC, True, True),
                                  (KIND_BACKWARD, True, DX_NONE, True, True),
                                  (KIND_DOUBLE, False, DX_ATOMIC, True, True)):
        parts = parts_for(plan, kind, dtype, dx, max_words=16)
        if parts:
            out.append(KernelSpec(kind, dtype, seg, dx, dy, dw, parts=parts))
    return out


def _specs(dtype):
    """Every kernel the CUDA backend launches (mace_accel/backends/cuda/__init__.py), each with one part."""
    return [
        KernelSpec(KIND_FORWARD, dtype, True),                            # conv and plain forward
        KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True),   # atomic backward
        KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, False, False),
        KernelSpec(KIND_BACKWARD, dtype, True, DX_NONE, True, True),      # deterministic backward
        KernelSpec(KIND_BACKWARD, dtype, True, DX_STORE, True, True),     # plain backward
        KernelSpec(KIND_GRAD_X, dtype, True),                             # deterministic dx
        KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True),     # fused double backward
    ]


def _option_specs(dtype):
    """The kinds that may prefetch weight rows into L2 (codegen.PREFETCH_EDGES) or stream them
    (codegen.STREAM_WEIGHTS), add dy with atomics (codegen.ATOMIC_DY) or stage the dx atomics
    (codegen.COALESCED_DX_ATOMICS, 4-wide: codegen.VECTOR_DX_ATOMICS) or copy rows one edge ahead into shared
    memory (codegen.STAGED_ROWS) or spell the sender-row loads as pointers (codegen.POINTER_X_LOADS) or stream
    the receiver rows (codegen.STREAM_RECEIVER_ROWS), with those on."""
    return [KernelSpec(KIND_FORWARD, dtype, True, prefetch=2),
            KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True, prefetch=2),
            KernelSpec(KIND_BACKWARD, dtype, True, DX_NONE, True, True, prefetch=2),
            KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True, prefetch=2),
            KernelSpec(KIND_FORWARD, dtype, True, prefetch=1, stream_w=True),         # streamed weight rows
            KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True, prefetch=1, stream_w=True),
            KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True, stream_w=True),
            KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True, dy_atomic=True),  # dy with atomics
            KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True, dy_atomic=True),
            KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True, coalesced_dx=True),  # staged dx
            KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True, coalesced_dx=True),
            KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True, coalesced_dx=True,  # 4-wide
                       vector_dx=dtype == "float32"),
            KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True, coalesced_dx=True, need_gg=False,
                       vector_dx=dtype == "float32"),
            KernelSpec(KIND_FORWARD, dtype, True, stage="wx"),  # rows copied one edge ahead (cp.async)
            KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True, coalesced_dx=True, stage="w"),
            KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True, coalesced_dx=True, stage="wx"),
            KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True, stage="x", stage_ahead=2),
            KernelSpec(KIND_FORWARD, dtype, True, stage="bx", unroll=2),  # bulk-copied weight rows (sm_90)
            KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True, coalesced_dx=True, stage="b"),
            KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True, coalesced_dx=True, stage="bx"),
            KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True, coalesced_dx=True, need_gg=False,
                       stage="b", prefetch=1),
            KernelSpec(KIND_FORWARD, dtype, True, pointer_x_loads=True, stream_rows=True),  # layout switches
            KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True, pointer_x_loads=True, stream_rows=True),
            KernelSpec(KIND_BACKWARD, dtype, True, DX_NONE, True, True, pointer_x_loads=True, stream_rows=True),
            KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True, coalesced_dx=True, pointer_x_loads=True,
                       stream_rows=True, stage="x")]


def _compiler():
    if shutil.which("nvcc"):
        return "nvcc"
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return "nvrtc"
    except Exception:
        return None


def _nvcc_cubin(path, source: str, arch: str):
    """Write ``source`` to ``path`` and build it with nvcc for ``arch`` (e.g. "sm_90"): the CompletedProcess."""
    path.write_text(source)
    return subprocess.run(["nvcc", f"-arch={arch}", "-std=c++17", "-cubin", "-o", str(path.with_suffix(".cubin")),
                           str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("layer", ["layer0", "medium1", "large1"])
def test_generated_sources_compile(layer, tmp_path):
    compiler = _compiler()
    if compiler is None:
        pytest.skip("neither nvcc nor NVRTC is available on this machine")
    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    specs = [spec for dt in ("float32", "float64")
             for spec in _specs(dt) + _split_specs(plan, dt) + [fit_stage(plan, sp) for sp in _option_specs(dt)]
             + list(launched_specs(plan, dt).values())]
    jobs = [(spec, render(plan, spec)) for spec in dict.fromkeys(specs)]  # each distinct spec once

    def build(job):
        spec, r = job
        if compiler == "nvrtc":
            from mace_accel.backends.cuda.compiler import nvrtc_compile

            return spec, 0, str(len(nvrtc_compile(r["source"], r["name"], "sm_90")))
        p = _nvcc_cubin(tmp_path / f"{r['name']}.cu", r["source"], "sm_90")
        return spec, p.returncode, p.stderr

    with ThreadPoolExecutor(2) as pool:
        for spec, rc, log in pool.map(build, jobs):
            assert rc == 0, f"{layer} {spec.tag()} failed to compile:\n{log}"


@pytest.mark.parametrize("layer", ["medium1", "large1"])
def test_output_parts_partition_whole_blocks(layer):
    """split_outputs: every path in exactly one part, a block's paths together, parts within the budget (a
    block larger than the budget alone in its part), and one part when everything fits."""
    from mace_accel.plan.schedule import split_outputs

    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    assert split_outputs(plan, plan.lane_out_dim) == (tuple(range(len(plan.paths))),)
    for budget in (7, 12, 20, 33):
        parts = split_outputs(plan, budget)
        assert len(parts) > 1
        assert sorted(i for p in parts for i in p) == list(range(len(plan.paths)))
        owner = {}
        for k, part in enumerate(parts):
            dims = {plan.paths[i].out_block: plan.paths[i].do for i in part}
            assert sum(dims.values()) <= budget or len(dims) == 1
            for b in dims:
                assert owner.setdefault(b, k) == k, "an output block split over two parts"


def test_render_refuses_parts_that_do_not_partition():
    node, sh, mid, ins = mace_conv_args("medium1", mul=128)
    plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    n = len(plan.paths)
    with pytest.raises(ValueError, match="cover"):
        render(plan, KernelSpec(KIND_FORWARD, "float32", True, parts=(tuple(range(n - 1)),)))
    with pytest.raises(ValueError, match="cover"):
        render(plan, KernelSpec(KIND_FORWARD, "float32", True, parts=(tuple(range(n)), (0,))))


def test_csr_source_compiles(tmp_path):
    compiler = _compiler()
    if compiler is None:
        pytest.skip("neither nvcc nor NVRTC is available on this machine")
    from mace_accel.backends.cuda.codegen import fill_template, template_text

    src = fill_template(template_text("csr.cu"), {"NAME": "mace_accel_csr"})
    if compiler == "nvrtc":
        from mace_accel.backends.cuda.compiler import nvrtc_compile

        assert nvrtc_compile(src, "mace_accel_csr_count", "sm_90")
        return
    p = _nvcc_cubin(tmp_path / "csr.cu", src, "sm_90")
    assert p.returncode == 0, p.stderr


def test_neighbour_list_source_compiles(tmp_path):
    compiler = _compiler()
    if compiler is None:
        pytest.skip("neither nvcc nor NVRTC is available on this machine")
    from mace_accel.backends.cuda.codegen import template_text

    src = template_text("neighbours.cu")
    if compiler == "nvrtc":
        from mace_accel.backends.cuda.compiler import nvrtc_compile

        for kind in ("bin", "count", "fill"):
            assert nvrtc_compile(src, f"mace_accel_nl_{kind}", "sm_90")
        return
    p = _nvcc_cubin(tmp_path / "neighbours.cu", src, "sm_90")
    assert p.returncode == 0, p.stderr


def _run_statements(lines, env):
    """Evaluate generated statements of the forms ``[const] scalar_t NAME = EXPR;`` and ``NAME += EXPR;`` (the
    straight-line contraction code) in Python, with ``C(v)`` the identity."""
    import re

    env = dict(env, C=float)
    for line in lines:
        line = line.strip()
        m = re.fullmatch(r"(?:const )?scalar_t (\w+) = (.+);", line)
        if m:
            env[m[1]] = eval(m[2], {}, env)
            continue
        m = re.fullmatch(r"(\w+) \+= (.+);", line)
        assert m, f"unexpected generated statement: {line}"
        env[m[1]] = env.get(m[1], 0.0) + eval(m[2], {}, env)
    return env


@pytest.mark.parametrize("layer", ["medium1", "large1"])
def test_factored_contractions_match_the_nonzeros(layer):
    """The factored FMA chains the kernels are generated from (codegen._factored) compute exactly the sums over
    the plan's nonzeros: out_k = sum c x_i y_j (forward), t_i = sum c y_j g_k and dy_j = sum c x_i g_k
    (backward), per path, on random values. A wrong grouping or index shows here, on the CPU, before any GPU run."""
    import random

    from mace_accel.backends.cuda import codegen as cg

    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    rng = random.Random(0)
    for p in plan.paths:
        o2, ob = p.in2_offset, p.out_block
        env = {f"wx{i}": rng.uniform(-1, 1) for i in range(p.d1)}
        env.update({f"y{o2 + j}": rng.uniform(-1, 1) for j in range(p.d2)})
        env.update({f"g{ob}_{k}": rng.uniform(-1, 1) for k in range(p.do)})
        code = cg._Code(0)
        for k, terms in cg._by(p, "k", "i", "j"):
            cg._accumulate(code, f"a{ob}_{k}", cg._factored(terms, lambda i: f"wx{i}", lambda j: f"y{o2 + j}"))
        t = cg._t_stmts(code, p, "y", "g", "t")
        for j, terms in cg._by(p, "j", "i", "k"):
            cg._accumulate(code, f"dy{o2 + j}", cg._factored(terms, lambda i: f"wx{i}", lambda k: f"g{ob}_{k}"))
        got = _run_statements(code.lines, env)
        for j in range(p.d2):
            want = sum(c * env[f"wx{i}"] * env[f"g{ob}_{k}"] for i, jj, k, c in p.nonzeros if jj == j)
            assert abs(got.get(f"dy{o2 + j}", 0.0) - want) <= 1e-12 * (1 + abs(want)), (p.index, j)
        for k in range(p.do):
            want = sum(c * env[f"wx{i}"] * env[f"y{o2 + j}"] for i, j, kk, c in p.nonzeros if kk == k)
            assert abs(got.get(f"a{ob}_{k}", 0.0) - want) <= 1e-12 * (1 + abs(want)), (p.index, k)
        for i in range(p.d1):
            want = sum(c * env[f"y{o2 + j}"] * env[f"g{ob}_{k}"] for ii, j, k, c in p.nonzeros if ii == i)
            assert (i in t) == any(nz[0] == i for nz in p.nonzeros)
            assert abs(got.get(f"t{i}", 0.0) - want) <= 1e-12 * (1 + abs(want)), (p.index, i)


@pytest.mark.parametrize("unroll", [0, 3, 6])
def test_forward_unroll_must_be_a_power_of_two(unroll, monkeypatch):
    """A partial unroll by 3 of the edge loop was compiled without its trip-count checks (wrong results on the
    H100, docs/design.md), so a kernel spec refuses any unroll that is not a power of two, and so does the
    backend for a table entry; 1, 2 and 4 render."""
    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    node, sh, mid, ins = mace_conv_args("layer0", mul=32)
    plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    for ok in (1, 2, 4):
        assert f"#pragma unroll {ok}" in render(plan, KernelSpec(KIND_FORWARD, "float32", True, unroll=ok))["source"]
    with pytest.raises(ValueError, match="power of two"):
        KernelSpec(KIND_FORWARD, "float32", True, unroll=unroll)
    monkeypatch.setattr(codegen, "SMALL_FORWARD_UNROLL", {"float32": unroll, "float64": unroll})
    monkeypatch.setattr(B, "_SPECS", {})
    with pytest.raises(ValueError, match="power of two"):
        B._spec(plan, KIND_FORWARD, "float32", True)


def test_register_cap_is_chosen_apart_for_unrolled_forwards(monkeypatch):
    """MIN_BLOCKS_PER_SM's entry for kernels that walk one edge per iteration reaches the medium and large
    layer-1 forwards, and the one for kernels that unroll their edge loop reaches layer 0's (none by
    default); the cap shows in the rendered bounds."""
    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    assert codegen.MIN_BLOCKS_PER_SM == {(KIND_FORWARD, "float32", False): 3}
    for table, wants in (({(KIND_FORWARD, "float32", False): 3}, (0, 3, 3)),
                         ({(KIND_FORWARD, "float32", True): 2}, (2, 0, 0))):
        monkeypatch.setattr(codegen, "MIN_BLOCKS_PER_SM", table)
        for layer, want in zip(("layer0", "medium1", "large1"), wants):
            node, sh, mid, ins = mace_conv_args(layer)
            plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
            spec = B._spec(plan, KIND_FORWARD, "float32", True)
            assert spec.min_blocks == want and codegen.unrolls_edge_loop(plan, spec) == (layer == "layer0"), layer
            bounds = f"__launch_bounds__(THREADS, {want})" if want else "__launch_bounds__(THREADS)"
            assert bounds in render(plan, spec)["source"], layer
            assert B._spec(plan, KIND_FORWARD, "float64", True).min_blocks == 0


def test_bulk_staged_rows_rules(tmp_path, monkeypatch):
    """Bulk-copied weight rows (stage "b"): the copies need 16-byte slices, so render refuses a plan whose
    path slices are not (and the backend does not pick "b" for it); fit_stage drops rows in order; an unknown
    stage is refused; and the fallback for GPUs before sm_90 (lanes copy synchronously) compiles."""
    from mace.modules.irreps_tools import tp_out_irreps_with_instructions
    from e3nn import o3

    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    with pytest.raises(ValueError, match="stage"):
        KernelSpec(KIND_FORWARD, "float32", True, stage="q")
    node, sh = o3.Irreps("6x0e+6x1o"), o3.Irreps.spherical_harmonics(2)  # 6 float32 channels: 24-byte slices
    mid, ins = tp_out_irreps_with_instructions(node, sh, o3.Irreps("6x0e+6x1o"))
    odd = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    assert not codegen.bulk_rows_aligned(odd, "float32") and codegen.bulk_rows_aligned(odd, "float64")
    with pytest.raises(ValueError, match="bulk"):
        render(odd, KernelSpec(KIND_BACKWARD, "float32", False, DX_ATOMIC, True, True, stage="b"))
    monkeypatch.setattr(codegen, "STAGED_ROWS", {(KIND_BACKWARD, "float32"): "bx"})
    monkeypatch.setattr(B, "_SPECS", {})
    assert B._spec(odd, KIND_BACKWARD, "float32", False, DX_ATOMIC, True, True).stage == "x"
    node, sh, mid, ins = mace_conv_args("large1", mul=128)
    plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    big = KernelSpec(KIND_DOUBLE, "float64", False, DX_ATOMIC, True, True, coalesced_dx=True, stage="bx")
    assert fit_stage(plan, big).stage in ("b", "")
    for ahead in (1, 2, 3):  # every warp's buffers start 16-byte aligned (the bulk copies' destinations)
        for dt in ("float32", "float64"):
            spec = KernelSpec(KIND_BACKWARD, dt, False, DX_ATOMIC, True, True, stage="bx", stage_ahead=ahead)
            assert codegen.stage_words(plan, spec)[1] * codegen.SCALAR_BYTES[dt] % codegen.BULK_ALIGN_BYTES == 0
    with pytest.raises(ValueError, match="stage_ahead"):
        KernelSpec(KIND_FORWARD, "float32", True, stage="b", stage_ahead=0)
    if shutil.which("nvcc") is None:
        return
    spec = KernelSpec(KIND_BACKWARD, "float32", False, DX_ATOMIC, True, True, coalesced_dx=True, stage="b")
    p = _nvcc_cubin(tmp_path / "bulk80.cu", render(plan, spec)["source"], "sm_80")
    assert p.returncode == 0, p.stderr


def test_ring_refusal_and_fit_stage_rules(monkeypatch):
    """The whole-row ring ("r") is refused where a block is not one item's chunks (output parts, fewer than 128
    channels) or its slot count does not divide a batch, and the tables' staged rows and prefetch take over;
    a ring too large for the block's shared memory gets fewer slots; fit_stage's one rule for every stage."""
    from dataclasses import replace

    from mace.modules.irreps_tools import tp_out_irreps_with_instructions
    from e3nn import o3

    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    node, sh = o3.Irreps("6x0e+6x1o"), o3.Irreps.spherical_harmonics(2)  # 6 channels: one chunk, 4 items a block
    mid, ins = tp_out_irreps_with_instructions(node, sh, o3.Irreps("6x0e+6x1o"))
    odd = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    node, sh, mid, ins = mace_conv_args("large1", mul=128)
    plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    big = KernelSpec(KIND_DOUBLE, "float64", False, DX_ATOMIC, True, True, coalesced_dx=True, stage="bx")
    ring = KernelSpec(KIND_BACKWARD, "float64", False, DX_ATOMIC, True, True, coalesced_dx=True, stage="r",
                      stage_ahead=3, parts=codegen.parts_for(plan, KIND_BACKWARD, "float64", DX_ATOMIC))
    assert ring.num_parts > 1
    assert "part" in codegen.ring_refusal(plan, ring, ring.num_parts)
    with pytest.raises(ValueError, match="ring"):
        render(plan, ring)
    assert "power-of-two" in codegen.ring_refusal(plan, replace(ring, parts=(), stage_ahead=2), 1)
    assert "chunk" in codegen.ring_refusal(odd, replace(ring, parts=()), 1)
    monkeypatch.setattr(codegen, "ROW_RING", {(KIND_BACKWARD, "float64", False): 3})
    monkeypatch.setattr(codegen, "STAGED_ROWS", {(KIND_BACKWARD, "float64"): "wx"})
    monkeypatch.setattr(codegen, "PREFETCH_EDGES", {(KIND_BACKWARD, "float64"): 1})
    monkeypatch.setattr(B, "_SPECS", {})
    fallback = B._spec(odd, KIND_BACKWARD, "float64", False, DX_ATOMIC, True, True)  # one chunk: 4 items a block
    assert (fallback.stage, fallback.prefetch) == ("wx", 1)
    node, sh, mid, ins = mace_conv_args("medium1", mul=128)
    medium = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    ringed = B._spec(medium, KIND_BACKWARD, "float64", False, DX_ATOMIC, True, True)
    assert (ringed.stage, ringed.stage_ahead, ringed.prefetch) == ("r", 3, 0)
    src = render(medium, ringed)["source"]
    assert "ring_issue<4>" in src and "ring_release(" in src and "row_stage = row_stage_all;" in src
    # a ring that does not fit the block's shared memory gets fewer slots (large layer 1 float32 double: one
    # slot holds two rows of 2176 values)
    monkeypatch.setattr(codegen, "ROW_RING", {(KIND_DOUBLE, "float32", False): 7})
    big_ring = B._spec(plan, KIND_DOUBLE, "float32", False, DX_ATOMIC, True, True, need_gg=False)
    assert big_ring.stage == "r" and big_ring.stage_ahead == 1
    assert codegen.smem_bytes(big_ring, codegen.stage_words(plan, big_ring)) <= codegen.SMEM_STATIC_MAX_BYTES
    assert codegen.smem_bytes(fit_stage(plan, big), codegen.stage_words(plan, fit_stage(plan, big))) \
        <= codegen.SMEM_STATIC_MAX_BYTES
    # one rule for every stage: fewer edges ahead first, then fewer rows; a ring that does not fit with two
    # slots gives way to the tables' staged rows and prefetch (a budget shrunk to force both)
    wide = KernelSpec(KIND_BACKWARD, "float32", False, DX_ATOMIC, True, True, coalesced_dx=True, stage="wx",
                      stage_ahead=2)
    words = lambda sp: codegen.smem_bytes(sp, codegen.stage_words(medium, sp))  # noqa: E731
    monkeypatch.setattr(codegen, "SMEM_STATIC_MAX_BYTES", words(replace(wide, stage_ahead=1)))
    assert (fit_stage(medium, wide).stage, fit_stage(medium, wide).stage_ahead) == ("wx", 1)
    monkeypatch.setattr(codegen, "SMEM_STATIC_MAX_BYTES", words(replace(wide, stage="w", stage_ahead=1)))
    assert (fit_stage(medium, wide).stage, fit_stage(medium, wide).stage_ahead) == ("w", 1)
    ring_spec = replace(wide, stage="r", stage_ahead=3, prefetch=0)
    monkeypatch.setattr(codegen, "STAGED_ROWS", {(KIND_BACKWARD, "float32"): ""})
    monkeypatch.setattr(codegen, "PREFETCH_EDGES", {(KIND_BACKWARD, "float32"): 1})
    monkeypatch.setattr(codegen, "SMEM_STATIC_MAX_BYTES", words(replace(ring_spec, stage_ahead=1)) - 1)
    assert (fit_stage(medium, ring_spec).stage, fit_stage(medium, ring_spec).prefetch) == ("", 1)


def test_ring_serves_the_runs_kernels(monkeypatch):
    """The tables give the whole-row ring to the runs-variant backward and double backward, not to the kernels
    that walk one receiver segment per item (the forwards and the deterministic backward, which were slower
    with it: ring_sweep_h100.txt, ring_sweep_det_h100.txt)."""
    from mace_accel.backends import cuda as B

    monkeypatch.setattr(B, "_SPECS", {})
    node, sh, mid, ins = mace_conv_args("medium1", mul=128)
    plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    for dt in ("float32", "float64"):
        assert B._spec(plan, KIND_BACKWARD, dt, False, DX_ATOMIC, True, True).stage == "r"
        assert B._spec(plan, KIND_BACKWARD, dt, True, DX_NONE, True, True).stage != "r"
        assert B._spec(plan, KIND_FORWARD, dt, True).stage != "r"
    assert B._spec(plan, KIND_DOUBLE, "float32", False, DX_ATOMIC, True, True, need_gg=False).stage == "r"


def test_older_targets_stage_rows_instead_of_the_ring_and_prefetch(monkeypatch):
    """For a compile target older than sm_90 (no bulk copies, no L2 prefetch) every kernel the backend launches
    takes no ring and no prefetch but codegen.PRE_SM90_STAGED_ROWS' cp.async-staged rows (fitted to the block's
    shared memory), and the deterministic dx kernel none; with PRE_SM90_TABLES off they get the sm_90 tables."""
    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    monkeypatch.setattr(B, "_SPECS", {})
    for layer in ("layer0", "medium1", "large1"):
        node, sh, mid, ins = mace_conv_args(layer, mul=128)
        plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
        for dt in ("float32", "float64"):
            for label, spec in launched_specs(plan, dt, sm90=False).items():
                want = "" if spec.kind == KIND_GRAD_X else codegen.PRE_SM90_STAGED_ROWS.get((spec.kind, dt), "")
                assert "r" not in spec.stage and "b" not in spec.stage and spec.prefetch == 0, (layer, dt, label)
                assert spec.stage and want.startswith(spec.stage) or not want and not spec.stage, (layer, dt, label)
            assert launched_specs(plan, dt, sm90=False) != launched_specs(plan, dt)
            monkeypatch.setattr(codegen, "PRE_SM90_TABLES", False)
            assert launched_specs(plan, dt, sm90=False) == launched_specs(plan, dt)
            monkeypatch.setattr(codegen, "PRE_SM90_TABLES", True)


def test_run_edges_set_the_items_of_the_runs_kernels(monkeypatch):
    """codegen.RUN_EDGES sets the edges per work item of the runs-variant kernels only (keyed by need_gg, so the
    no-gg and with-gg double backwards are chosen apart); the segmented kernels keep one receiver segment per
    item; the rendered source carries the item length."""
    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    node, sh, mid, ins = mace_conv_args("medium1", mul=128)
    plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    monkeypatch.setattr(B, "_SPECS", {})
    monkeypatch.setattr(codegen, "RUN_EDGES", {(KIND_BACKWARD, "float32", True): 80,
                                               (KIND_DOUBLE, "float32", False): 48})
    bwd = B._spec(plan, KIND_BACKWARD, "float32", False, DX_ATOMIC, True, True)
    assert bwd.edges_per_warp == 80 and "#define EDGES_PER_WARP 80\n" in render(plan, bwd)["source"]
    assert B._spec(plan, KIND_BACKWARD, "float32", True, DX_NONE, True, True).edges_per_warp == EDGES_PER_WARP
    assert B._spec(plan, KIND_DOUBLE, "float32", False, DX_ATOMIC, True, True, need_gg=False).edges_per_warp == 48
    assert B._spec(plan, KIND_DOUBLE, "float32", False, DX_ATOMIC, True, True).edges_per_warp == EDGES_PER_WARP
    assert B._spec(plan, KIND_DOUBLE, "float64", False, DX_ATOMIC, True, True).edges_per_warp == EDGES_PER_WARP
    with pytest.raises(ValueError, match="edges_per_warp"):
        KernelSpec(KIND_BACKWARD, "float32", False, DX_ATOMIC, True, True, edges_per_warp=0)


#: PTX that only the sm_90 branches of the templates emit: bulk copies and prefetches, mbarriers, L2 cache
#: policies, vector atomics (``atomicAdd`` on a float4: ``atom.global.add.v4.f32``; as a ``red`` too).
SM90_ONLY = (r"\bcp\.async\.bulk", r"\bmbarrier\b", r"\bcreatepolicy\b", r"\b(atom|red)(\.global)?\.add\.v4\.")


@pytest.mark.parametrize("layer", ["layer0", "medium1", "large1"])
def test_sources_compile_for_older_gpus_without_their_missing_instructions(layer):
    """Every kernel the backend launches, plus the staged-row, bulk-staged and layout variants, compiles to PTX
    for compute_80 (A100) and compute_75 (T4) -- the ``__CUDA_ARCH__ < 900`` branches, which the sm_90 build
    never compiles -- and that PTX uses none of the sm_90 instructions (and, for compute_75, no cp.async) and
    declares no ring slots; the compute_90 PTX of the same ring kernels does use bulk copies, mbarriers and
    the slots (the checks can fail)."""
    nvrtc_or_skip()
    from mace_accel.backends.cuda.compiler import nvrtc_compile

    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    # what these GPUs launch (codegen.PRE_SM90_STAGED_ROWS), what they launched before (the sm_90 tables: the
    # ring's fallback) and the option variants
    specs = [spec for dt in ("float32", "float64")
             for spec in list(launched_specs(plan, dt, sm90=False).values()) + list(launched_specs(plan, dt).values())
             + [fit_stage(plan, sp) for sp in _option_specs(dt)]]
    jobs = [(spec, render(plan, spec), arch) for spec in dict.fromkeys(specs)
            for arch in ("compute_80", "compute_75") + (("compute_90",) if spec.stage == "r" else ())]

    def build(job):
        spec, r, arch = job
        return spec, arch, nvrtc_compile(r["source"], r["name"], arch).decode()

    rings = vector_atomics = 0
    with ThreadPoolExecutor(2) as pool:
        for spec, arch, ptx in pool.map(build, jobs):
            assert f".target sm_{arch[-2:]}" in ptx, (spec.tag(), arch)
            if arch == "compute_90":
                rings += 1
                assert "cp.async.bulk" in ptx and "mbarrier" in ptx and "row_stage_all" in ptx, spec.tag()
                vector_atomics += bool(spec.vector_dx and re.search(SM90_ONLY[3], ptx))
                continue
            for instr in SM90_ONLY + ((r"\bcp\.async\b",) if arch == "compute_75" else ()):
                assert not re.search(instr, ptx), f"{spec.tag()} for {arch} uses {instr}"
            # nothing fills the ring's slots before sm_90: the compiler drops them, leaving the shared memory
            # to more resident blocks
            assert spec.stage != "r" or "row_stage_all" not in ptx, f"{spec.tag()} for {arch} keeps the ring slots"
    assert rings, "no launched kernel takes the whole-row ring"
    # medium layer 1's float32 fused double adds its sender rows with vector atomics (checked there)
    assert vector_atomics or layer != "medium1", "the float32 double's vector atomics were not found in its PTX"


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_100", "sm_120"])
def test_launched_kernels_build_cubins_for_other_gpus(arch):
    """Every kernel the backend launches for the MACE-MP-0 layers on the A100 (sm_80) and the RTX 30 / A10 / A40
    (sm_86) -- the pre-sm_90 tables' staged rows -- and on the Blackwell GPUs (sm_100, sm_120) -- the sm_90
    tables, whose bulk copies, mbarriers and vector atomics must assemble there too -- builds into a cubin
    (ptxas included)."""
    nvrtc_or_skip()
    from mace_accel.backends.cuda.compiler import nvrtc_compile

    jobs = []
    for layer in ("layer0", "medium1", "large1"):
        node, sh, mid, ins = mace_conv_args(layer, mul=128)
        plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
        jobs += [render(plan, spec) for dt in ("float32", "float64")
                 for spec in (launched_specs(plan, dt, sm90=arch in ("sm_100", "sm_120")).values())]
    with ThreadPoolExecutor(2) as pool:
        for r, cubin in zip(jobs, pool.map(lambda r: nvrtc_compile(r["source"], r["name"], arch), jobs)):
            assert cubin[:4] == b"\x7fELF", f"{r['name']} for {arch}: not a cubin"
