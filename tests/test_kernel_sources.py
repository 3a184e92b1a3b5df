"""CPU: every generated kernel source compiles for sm_90 (nvcc here; NVRTC where CuPy can load it)."""
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from mace_accel.backends.cuda.codegen import (DX_ATOMIC, DX_NONE, DX_STORE, KIND_BACKWARD, KIND_DOUBLE, KIND_FORWARD,
                                              KIND_GRAD_X, KernelSpec, render)
from mace_accel.plan import build_plan
from mace_accel.problem import TPProblem
from tp_cases import mace_conv_args


def _specs(dtype):
    """Every kernel the CUDA backend launches (mace_accel/backends/cuda/__init__.py)."""
    return [
        KernelSpec(KIND_FORWARD, dtype, True),                            # conv and plain forward
        KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True),   # atomic backward
        KernelSpec(KIND_BACKWARD, dtype, False, DX_ATOMIC, False, False),
        KernelSpec(KIND_BACKWARD, dtype, True, DX_NONE, True, True),      # deterministic backward
        KernelSpec(KIND_BACKWARD, dtype, True, DX_STORE, True, True),     # plain backward
        KernelSpec(KIND_GRAD_X, dtype, True),                             # deterministic dx
        KernelSpec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True),     # fused double backward
    ]


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
    jobs = [(spec, render(plan, spec)) for dt in ("float32", "float64") for spec in _specs(dt)]

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
