"""The native (C++) eager path of the atomic conv: mace_accel/backends/cuda/native.py, kernels/native_conv.cpp.

CPU: its mode switch, the failure reporting, that CPU tensors never take it, and that the C++ source compiles
(syntax only: this machine's torch has no CUDA libraries to link). GPU: that it is the path taken, and that
it gives the Python path's results (the same kernels) for every subset of gradients, shared weights, a second
backward, double backward, gradcheck / gradgradcheck, poisoned buffers and CUDA-graph capture.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings

import pytest
import torch

import mace_accel
from mace_accel import ops
from mace_accel.backends.cuda import codegen, native
from tp_cases import mace_conv_args, random_graph, rel

DEV = "cuda"


@pytest.fixture
def fresh_state(monkeypatch):
    """native's load state, emptied for the test and restored after it."""
    saved = dict(native._STATE)
    native._STATE.update(module=None, error=None, tried=False, build_s=None)
    yield native._STATE
    native._STATE.clear()
    native._STATE.update(saved)


# ---------------------------------------------------------------------------------------------------------- CPU
def test_mode_switch(monkeypatch, fresh_state):
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("mode 0 must not build"))
    assert native.module() is None and native.status()["mode"] == "0"
    assert native.describe() == "Python launches (MACE_ACCEL_NATIVE=0)"
    fresh_state.update(module=object(), tried=True)  # loaded: mode 0 still turns it off
    assert native.module() is None
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    assert native.module() is fresh_state["module"]
    monkeypatch.setenv(native.NATIVE_ENV, "yes")
    with pytest.raises(ValueError, match="MACE_ACCEL_NATIVE must be auto, 0 or 1"):
        native.module()


def test_build_failure_is_warned_once_or_raised(monkeypatch, fresh_state):
    def broken():
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler here"):
        assert native.module() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert native.module() is None
    assert "no C++ compiler here" in native.status()["error"] and not native.status()["loaded"]
    assert "unavailable: RuntimeError: no C++ compiler here" in native.describe()
    monkeypatch.setenv(native.NATIVE_ENV, "1")
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler here"):
        native.module()
    fresh_state.update(tried=False, error=None)
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler here"):
        native.module()


def test_a_corrupt_cached_extension_is_rebuilt(monkeypatch, tmp_path):
    """A library in the cache that does not load (truncated, corrupt) is deleted and built again, once; a second
    failure is reported."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("MACE_ACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_driver_entry_points", lambda: (1, 2))
    seen = []

    class Built:
        def set_driver(self, launch, ctx):
            seen.append(("driver", launch, ctx))

    def load_inline(name, cpp_sources, build_directory, **kw):
        seen.append(("load", name, os.listdir(build_directory)))
        if len([e for e in seen if e[0] == "load"]) == 1:
            open(os.path.join(build_directory, name + ".so"), "wb").write(b"\x7fELF truncated")
            raise ImportError("file too short")
        return Built()

    monkeypatch.setattr(cpp_extension, "load_inline", load_inline)
    with pytest.warns(UserWarning, match="did not load .*file too short.*rebuilding"):
        mod = native._build()
    assert isinstance(mod, Built)
    loads = [e for e in seen if e[0] == "load"]
    assert len(loads) == 2 and loads[1][2] == []  # the corrupt library was deleted before the rebuild
    assert seen[-1] == ("driver", 1, 2)

    def always_broken(name, cpp_sources, build_directory, **kw):
        raise ImportError("still corrupt")

    monkeypatch.setattr(cpp_extension, "load_inline", always_broken)
    with pytest.warns(UserWarning), pytest.raises(ImportError, match="still corrupt"):
        native._build()


def test_cpu_tensors_never_take_the_native_path(monkeypatch):
    monkeypatch.setattr(native, "module", lambda: pytest.fail("CPU tensors asked for the native extension"))
    node, sh, mid, ins = mace_conv_args("layer0", mul=4, lmax_sh=2)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, node.dim, generator=g, requires_grad=True)
    y = torch.randn(12, sh.dim, generator=g)
    w = torch.randn(12, conv.weight_numel, generator=g)
    s, r = random_graph(5, 12, generator=g)
    torch.autograd.grad(conv(x, y, w, s, r).sum(), x)


def test_native_launch_arguments_follow_conv_params():
    """The C++ launches pass the kernel arguments in CONV_PARAMS' order (kernels/tp_conv.cu), as the Python
    launch does: a reorder of the kernel parameters must show here, on the CPU, not only on a GPU."""
    import inspect
    import re

    from mace_accel.backends import cuda

    params = codegen.template_text("tp_conv.cu").split("#define CONV_PARAMS")[1].split("#define CONV_ARGS")[0]
    kernel = re.findall(r"(?:\*\s*__restrict__\s+|index_t\s+)(\w+)", params)
    assert kernel[:15] == ["X", "Y", "W", "G", "sender", "receiver", "perm", "seg_ptr", "OUT", "DY", "DW", "X2",
                           "Y2", "W2", "OUT2"] and kernel[15:] == ["num_edges", "num_items", "w_stride"], kernel
    cpp = codegen.template_text(native.SOURCE)
    documented = re.search(r"// CONV_PARAMS: ([\w, ]+) \(pointers\), then\s*//\s*([\w, ]+) \(index_t", cpp)
    assert documented, "native_conv.cpp no longer states the argument order it follows"
    assert [n.strip() for n in documented.group(1).split(",")] == kernel[:15]
    assert [n.strip() for n in documented.group(2).split(",")] == kernel[15:]
    # the Python launch's keyword arguments, in its argument tuple's order
    launch = inspect.signature(cuda._launch).parameters
    assert list(launch)[6:] == kernel[:15]
    assert "int(num_edges), int(num_items), int(w_stride))" in inspect.getsource(cuda._launch)


def _cuda_include():
    for d in filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        if os.path.exists(os.path.join(d, "include", "cuda_runtime_api.h")):
            return os.path.join(d, "include")
    return None


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                    reason="needs g++ and the CUDA toolkit's headers")
def test_native_source_compiles(tmp_path):
    """g++ -fsyntax-only on the C++ source with torch's headers (a CPU build of torch lacks one generated CUDA
    header, stood in for by an empty file; nothing is linked or run)."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    src = tmp_path / native.SOURCE
    src.write_text(codegen.template_text(native.SOURCE))
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type", "-DTORCH_EXTENSION_NAME=check",
           f"-I{tmp_path}", *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
           f"-I{_cuda_include()}", str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 0 and not errors, done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------- GPU
def _case(layer, dtype, mul=32, n=40, e=600, seed=0, shared=False):
    node, sh, mid, ins = mace_conv_args(layer, mul=mul)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, shared_weights=shared)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, node.dim, generator=g, dtype=dtype)
    y = torch.randn(e, sh.dim, generator=g, dtype=dtype)
    w = torch.randn(*(() if shared else (e,)), conv.weight_numel, generator=g, dtype=dtype)
    s, r = random_graph(n, e, generator=g)
    go = torch.randn(n, mid.dim, generator=g, dtype=dtype)
    return conv, [t.to(DEV) for t in (x, y, w, s, r, go)]


def _python_path(conv, x, y, w, s, r):
    return ops._TPForward.apply(x, y, w, s, r, x.shape[0], conv.plan.key, False)


def _native_node(out):
    """Whether ``out`` came from the C++ autograd node (the Python path's node is _TPForwardBackward)."""
    return type(out.grad_fn).__name__ == "CppFunction"


def _native_loaded():
    mod = native.module()
    assert mod is not None, f"the native extension did not build on this GPU machine: {native.status()['error']}"
    return mod


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", ["layer0", "medium1", "large1"])
def test_native_path_is_taken_and_matches_the_python_path(layer, dtype):
    _native_loaded()
    conv, (x, y, w, s, r, go) = _case(layer, dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for _ in range(2):  # the first backward compiles its kernel through Python, the second runs in C++
        xs = [t.clone().requires_grad_(True) for t in (x, y, w)]
        out = conv(*xs, s, r)
        assert _native_node(out), type(out.grad_fn).__name__
        ref_in = [t.clone().requires_grad_(True) for t in (x, y, w)]
        ref = _python_path(conv, *ref_in, s, r)
        assert torch.equal(out, ref)  # same kernel, same receiver grouping
        got = torch.autograd.grad(out, xs, go)
        want = torch.autograd.grad(ref, ref_in, go)
        for name, a, b in zip("xyw", got, want):
            assert rel(a, b) < tol, f"d/d{name}"


@pytest.mark.gpu
def test_native_off_switch_after_loading(monkeypatch):
    _native_loaded()
    conv, (x, y, w, s, r, go) = _case("layer0", torch.float32)
    xr = x.clone().requires_grad_(True)
    assert _native_node(conv(xr, y, w, s, r))
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert not _native_node(conv(xr, y, w, s, r))
    d = mace_accel.TensorProductConv(*mace_conv_args("layer0", mul=32), deterministic=True)
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    assert not _native_node(d(xr, y, w, s, r))  # the deterministic variant stays on the Python path


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True])
def test_native_gradient_subsets(shared, monkeypatch):
    _native_loaded()
    conv, (x, y, w, s, r, go) = _case("medium1", torch.float64, shared=shared, seed=3)
    calls = []
    real = native._slow_backward
    monkeypatch.setattr(native, "_slow_backward", lambda *a: calls.append(a[7:10]) or real(*a))
    native.forget_plans()  # the plan made from here holds the counting callback
    for wanted in [(0,), (1,), (2,), (0, 1), (1, 2), (0, 2), (0, 1, 2)]:
        for rep in range(2):
            xs = [t.clone().requires_grad_(i in wanted) for i, t in enumerate((x, y, w))]
            got = torch.autograd.grad(conv(*xs, s, r), [xs[i] for i in wanted], go)
            ref_in = [t.clone().requires_grad_(True) for t in (x, y, w)]
            want = torch.autograd.grad(_python_path(conv, *ref_in, s, r), [ref_in[i] for i in wanted], go)
            for i, a, b in zip(wanted, got, want):
                assert a.shape == b.shape and rel(a, b) < 1e-12, (wanted, i)
    # each subset's kernel went through Python once (compiled, then registered), never again
    assert sorted(calls) == sorted({tuple(i in wd for i in range(3)) for wd in
                                    [(0,), (1,), (2,), (0, 1), (1, 2), (0, 2), (0, 1, 2)]})


@pytest.mark.gpu
def test_native_gradcheck_gradgradcheck_and_second_backward():
    _native_loaded()
    node, sh, mid, ins = mace_conv_args("large1", mul=3, lmax_sh=2)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, node.dim, generator=g, dtype=torch.float64), torch.randn(9, sh.dim, generator=g,
                                                                                     dtype=torch.float64)
    w = torch.randn(9, conv.weight_numel, generator=g, dtype=torch.float64)
    s, r = random_graph(4, 9, generator=g)
    args = tuple(t.to(DEV).requires_grad_(True) for t in (x, y, w))
    s, r = s.to(DEV), r.to(DEV)
    f = lambda a, b, c: conv(a, b, c, s, r)  # noqa: E731
    assert _native_node(f(*args))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)
    out = f(*args)  # a second backward through the same node (retain_graph) gives the same gradients
    go = torch.randn_like(out)
    first = torch.autograd.grad(out, args, go, retain_graph=True)
    second = torch.autograd.grad(out, args, go)
    for a, b in zip(first, second):
        assert rel(a, b) < 1e-14


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_double_backward_matches_the_python_path(dtype):
    _native_loaded()
    conv, (x, y, w, s, r, go) = _case("medium1", dtype, seed=5)
    vs = [torch.randn_like(t) for t in (x, y, w)]
    res = []
    for fn in (lambda *a: conv(*a, s, r), lambda *a: _python_path(conv, *a, s, r)):
        xs = [t.clone().requires_grad_(True) for t in (x, y, w)]
        g1 = torch.autograd.grad(fn(*xs), xs, go, create_graph=True)
        res.append(torch.autograd.grad(sum((a * v).sum() for a, v in zip(g1, vs)), xs))
    for name, a, b in zip("xyw", *res):
        assert rel(a, b) < (1e-12 if dtype == torch.float64 else 1e-5), name


@pytest.mark.gpu
def test_native_outputs_are_fully_written_in_poisoned_memory():
    _native_loaded()
    conv, (x, y, w, s, r, go) = _case("medium1", torch.float32, mul=64, n=37, e=400, seed=4)
    r[r == 5] = 6  # node 5 receives nothing: its output row must still be written (zeros)
    s[s == 7] = 8  # node 7 sends nothing: its dx row must be zero
    for _ in range(3):
        blocks = [torch.full((nb,), float("nan"), device=DEV) for nb in (37 * go.shape[1], 37 * x.shape[1],
                                                                          400 * conv.weight_numel, 400 * 16)]
        torch.cuda.synchronize()
        del blocks
        xs = [t.clone().requires_grad_(True) for t in (x, y, w)]
        out = conv(*xs, s, r)
        assert torch.isfinite(out).all() and torch.all(out[5] == 0)
        grads = torch.autograd.grad(out, xs, go)
        assert all(torch.isfinite(gr).all() for gr in grads) and torch.all(grads[0][7] == 0)


@pytest.mark.gpu
def test_native_forward_and_backward_in_a_cuda_graph():
    _native_loaded()
    conv, (x, y, w, s, r, go) = _case("medium1", torch.float32, mul=128, n=100, e=3000, seed=7)
    xs = [t.clone().requires_grad_(True) for t in (x, y, w)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: kernels compiled, receiver grouping made
            torch.autograd.grad(conv(*xs, s, r), xs, go)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = torch.autograd.grad(conv(*xs, s, r), xs, go)
    with torch.no_grad():
        xs[0].copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref_in = [t.detach().clone().requires_grad_(True) for t in xs]
    want = torch.autograd.grad(_python_path(conv, *ref_in, s, r), ref_in, go)
    for name, a, b in zip("xyw", grads, want):
        assert rel(a, b) < 1e-5, name


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
