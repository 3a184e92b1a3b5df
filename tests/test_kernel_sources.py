"""CPU: every generated kernel source compiles for sm_90 (nvcc here; NVRTC where CuPy can load it)."""
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from mace_accel.backends.cuda.codegen import (DX_ATOMIC, DX_NONE, DX_STORE, KIND_BACKWARD, KIND_DOUBLE, KIND_FORWARD,
                                              KIND_GRAD_X, KernelSpec, parts_for, render)
from mace_accel.plan import build_plan
from mace_accel.problem import TPProblem
from tp_cases import mace_conv_args


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


def _prefetch_specs(dtype):
    """The kinds that may prefetch weight rows into L2 (codegen.PREFETCH_EDGES) or stream them
    (codegen.STREAM_WEIGHTS), add dy with atomics (codegen.ATOMIC_DY) or stage the dx atomics
    (codegen.COALESCED_DX_ATOMICS), with those on."""
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
            KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True, coalesced_dx=True)]


def _compiler():
    if shutil.which("nvcc"):
        return "nvcc"
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return "nvrtc"
    except Exception:
        return None


@pytest.mark.parametrize("layer", ["layer0", "medium1", "large1"])
def test_generated_sources_compile(layer, tmp_path):
    compiler = _compiler()
    if compiler is None:
        pytest.skip("neither nvcc nor NVRTC is available on this machine")
    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    plan = build_plan(TPProblem.from_e3nn_args(node, sh, mid, ins))
    jobs = [(spec, render(plan, spec)) for dt in ("float32", "float64") for spec in _specs(dt) + _split_specs(plan, dt) + _prefetch_specs(dt)]

    def build(job):
        spec, r = job
        if compiler == "nvrtc":
            from mace_accel.backends.cuda.compiler import nvrtc_compile

            return spec, 0, str(len(nvrtc_compile(r["source"], r["name"], "sm_90")))
        src = tmp_path / f"{r['name']}.cu"
        src.write_text(r["source"])
        p = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-cubin", "-o", str(src.with_suffix(".cubin")),
                            str(src)], capture_output=True, text=True)
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
    path = tmp_path / "csr.cu"
    path.write_text(src)
    p = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-cubin", "-o", str(path.with_suffix(".cubin")),
                        str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
