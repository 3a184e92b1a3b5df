"""Test helper: build a generated symmetric-contraction kernel for the host CPU (g++) and run its grid
serially, so the generated source's arithmetic is checked on machines without a GPU.

The kernels use only thread/block indices (no shuffles, shared memory or atomics), so a shim that turns
``__global__`` into a plain function and loops over (block, thread) reproduces their semantics exactly.
"""
import ctypes
import shutil
import subprocess
from pathlib import Path

SHIM = """
#define __global__
#define __launch_bounds__(x)
#define __restrict__ __restrict
struct mace_accel_dim3 { unsigned x; };
static mace_accel_dim3 blockIdx, threadIdx;
"""


def available() -> bool:
    return shutil.which("g++") is not None


def build(source: str, name: str, folder: Path):
    """A callable f(X, WN, G, OUT, DX, DW, num_nodes, blocks) over torch CPU tensors (or None)."""
    driver = f"""
extern "C" void run_grid(const scalar_t* X, const scalar_t* WN, const scalar_t* G, scalar_t* OUT,
                         scalar_t* DX, scalar_t* DW, long long n, long long blocks) {{
  for (long long b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < THREADS; ++t) {{ blockIdx.x = (unsigned)b; threadIdx.x = t; {name}(X, WN, G, OUT, DX, DW, n); }}
}}"""
    cpp = folder / f"{name}.cpp"
    cpp.write_text(SHIM + source + driver)
    so = cpp.with_suffix(".so")
    subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-o", str(so), str(cpp)], check=True, capture_output=True)
    fn = ctypes.CDLL(str(so)).run_grid

    def call(*tensors, num_nodes, blocks):
        ptrs = [ctypes.c_void_p(0 if t is None else t.data_ptr()) for t in tensors]
        fn(*ptrs, ctypes.c_longlong(num_nodes), ctypes.c_longlong(blocks))

    return call
