"""GPU: the generated kernels against the reference backend and e3nn (run on the device; skipped without CUDA)."""
import pytest
import torch
from e3nn import o3

import mace_accel
from tp_cases import e3nn_conv, e3nn_tp, launch_edge_kernel, mace_conv_args, random_graph, rel

pytestmark = pytest.mark.gpu
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}
DEV = "cuda"


def _inputs(conv, n, e, dtype, seed, shared=False, sort_receiver=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, conv.plan.in1_dim, generator=g, dtype=dtype)
    y = torch.randn(e, conv.plan.in2_dim, generator=g, dtype=dtype)
    w = torch.randn(*(() if shared else (e,)), conv.weight_numel, generator=g, dtype=dtype)
    s, r = random_graph(n, e, generator=g, sort_receiver=sort_receiver)
    return [t.to(DEV) for t in (x, y, w, s, r)]


def _all_orders(fn, args, go, vs):
    args = [a.clone().requires_grad_(True) for a in args]
    out = fn(*args)
    g1 = torch.autograd.grad(out, args, go, create_graph=True)
    g2 = torch.autograd.grad(sum((a * v).sum() for a, v in zip(g1, vs)), args)
    return out, g1, g2


def _second_order(fn, args, go, vs, with_gout):
    """Grads of sum(grad_i * v_i) (grad_i: fn's first-order gradients for upstream ``go``) w.r.t. the args and,
    ``with_gout``, go too."""
    args = [a.clone().requires_grad_(True) for a in args]
    go = go.clone().requires_grad_(with_gout)
    g1 = torch.autograd.grad(fn(*args), args, go, create_graph=True)
    loss = sum((a * v.to(a.dtype)).sum() for a, v in zip(g1, vs))
    return torch.autograd.grad(loss, args + ([go] if with_gout else []))


def _check_plain_tp(m, tp64, dtype, shared=False, n=300):
    """The plain tensor product ``m`` matches e3nn's ``tp64`` to every derivative order on ``n`` random rows."""
    ftol, gtol = TOL[dtype]
    x = torch.randn(n, m.plan.in1_dim, dtype=dtype, device=DEV)
    y = torch.randn(n, m.plan.in2_dim, dtype=dtype, device=DEV)
    w = torch.randn(*(() if shared else (n,)), m.weight_numel, dtype=dtype, device=DEV)
    go = torch.randn(n, m.plan.out_dim, dtype=torch.float64, device=DEV)
    vs = [torch.randn(t.shape, dtype=torch.float64, device=DEV) for t in (x, y, w)]
    ref = _all_orders(tp64, [t.double() for t in (x, y, w)], go, vs)
    out = _all_orders(m, [x, y, w], go.to(dtype), [v.to(dtype) for v in vs])
    assert rel(out[0].double(), ref[0]) < ftol, "plain tensor product"
    for order in (1, 2):
        for a, b in zip(out[order], ref[order]):
            assert rel(a.double(), b) < gtol, f"plain tensor product, order {order}"


def _check(conv, tp64, x, y, w, s, r, dtype):
    ftol, gtol = TOL[dtype]
    n = x.shape[0]
    go = torch.randn(n, conv.plan.out_dim, dtype=torch.float64, device=DEV)
    vs = [torch.randn(t.shape, dtype=torch.float64, device=DEV) for t in (x, y, w)]
    ref = _all_orders(lambda a, b, c: e3nn_conv(tp64, a, b, c, s, r, n), [t.double() for t in (x, y, w)], go, vs)
    out = _all_orders(lambda a, b, c: conv(a, b, c, s, r), [x, y, w], go.to(dtype), [v.to(dtype) for v in vs])
    assert rel(out[0].double(), ref[0]) < ftol, "forward"
    for order in (1, 2):
        for name, a, b in zip("xyw", out[order], ref[order]):
            assert rel(a.double(), b) < gtol, f"order {order} d/d{name}"


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", ["layer0", "medium1", "large1"])
def test_mace_layers_cuda_vs_e3nn(layer, dtype, deterministic):
    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=deterministic)
    tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
    x, y, w, s, r = _inputs(conv, 50, 700, dtype, seed=1)
    _check(conv, tp64, x, y, w, s, r, dtype)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_parts_cuda_vs_e3nn(dtype, deterministic, monkeypatch):
    """Every kernel kind forced to split its paths into many output parts (one warp each) still matches e3nn to
    every derivative order."""
    from mace_accel.backends.cuda import codegen

    monkeypatch.setattr(codegen, "PART_MAX_LANE_WORDS", {k: 8 for k in codegen.PART_MAX_LANE_WORDS})
    node, sh, mid, ins = mace_conv_args("large1", mul=40)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=deterministic)
    for kind in (codegen.KIND_FORWARD, codegen.KIND_BACKWARD, codegen.KIND_DOUBLE):
        assert len(codegen.parts_for(conv.plan, kind, str(dtype)[6:], codegen.DX_ATOMIC)) > 2
    tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
    x, y, w, s, r = _inputs(conv, 50, 700, dtype, seed=3)
    _check(conv, tp64, x, y, w, s, r, dtype)


MUL_CASES = [  # (node irreps, sh lmax, target, irrep_norm, path_norm)
    ("8x0e+8x1o+8x4e", 4, "8x0e+8x1o+8x3o+8x4e+8x4o", "component", "element"),
    ("16x0e+16x1o+16x2e", 2, "16x0e+16x1o+16x2e+16x1e", "norm", "path"),
    ("96x0e+96x1o", 2, "96x0e+96x1o+96x2e", "component", "path"),
    ("192x0e+192x1o", 1, "192x0e+192x1o+192x1e", "norm", "element"),
    ("33x0e+33x2e", 2, "33x0e+33x1e+33x2e", "none", "none"),
]


@pytest.mark.parametrize("case", range(len(MUL_CASES)))
@pytest.mark.parametrize("deterministic", [False, True])
def test_multiplicities_and_normalisations(case, deterministic):
    from mace.modules.irreps_tools import tp_out_irreps_with_instructions

    node, lmax, target, inorm, pnorm = MUL_CASES[case]
    node, sh = o3.Irreps(node), o3.Irreps.spherical_harmonics(lmax)
    mid, ins = tp_out_irreps_with_instructions(node, sh, o3.Irreps(target))
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, irrep_normalization=inorm, path_normalization=pnorm,
                                        deterministic=deterministic)
    tp64 = e3nn_tp(node, sh, mid, ins, irrep_normalization=inorm, path_normalization=pnorm, device=DEV)
    for dtype in (torch.float32, torch.float64):
        x, y, w, s, r = _inputs(conv, 20, 150, dtype, seed=case)
        _check(conv, tp64, x, y, w, s, r, dtype)


@pytest.mark.parametrize("shared", [False, True])
def test_plain_tp_cuda(shared):
    node, sh, mid, ins = mace_conv_args("large1", mul=32)
    m = mace_accel.TensorProduct(node, sh, mid, ins, shared_weights=shared)
    tp64 = e3nn_tp(node, sh, mid, ins, shared_weights=shared, device=DEV)
    for dtype in (torch.float32, torch.float64):
        _check_plain_tp(m, tp64, dtype, shared)


@pytest.mark.parametrize("deterministic", [False, True])
def test_gradcheck_gradgradcheck_cuda(deterministic):
    node, sh, mid, ins = mace_conv_args("large1", mul=3, lmax_sh=2)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=deterministic)
    x, y, w, s, r = _inputs(conv, 4, 9, torch.float64, seed=2)
    args = tuple(t.requires_grad_(True) for t in (x, y, w))
    f = lambda a, b, c: conv(a, b, c, s, r)  # noqa: E731
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def _poison_allocator(nbytes_list):
    """Leave NaN-filled blocks of the given sizes in PyTorch's caching allocator: uninitialised outputs of those
    sizes then start as NaN, so an element a kernel fails to write shows up."""
    blocks = [torch.full((nb // 4,), float("nan"), dtype=torch.float32, device=DEV) for nb in nbytes_list]
    torch.cuda.synchronize()
    del blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_poisoned_outputs_are_fully_written(dtype):
    node, sh, mid, ins = mace_conv_args("medium1", mul=64)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=True)
    x, y, w, s, r = _inputs(conv, 37, 400, dtype, seed=4)
    r[r == 5] = 6  # node 5 receives nothing: its row must still be written (zeros)
    s[s == 7] = 8  # node 7 sends nothing: its dx row must be written (zeros)
    es = torch.finfo(dtype).bits // 8
    for _ in range(3):
        _poison_allocator([37 * mid.dim * es, 37 * node.dim * es, 400 * conv.weight_numel * es,
                           2 * 400 * sh.dim * es])
        xs = [t.clone().requires_grad_(True) for t in (x, y, w)]
        out = conv(*xs, s, r)
        assert torch.isfinite(out).all()
        assert torch.all(out[5] == 0)
        grads = torch.autograd.grad(out, xs, torch.randn_like(out))
        for gr in grads:
            assert torch.isfinite(gr).all()
        assert torch.all(grads[0][7] == 0)


def test_deterministic_variant_is_bitwise_reproducible():
    node, sh, mid, ins = mace_conv_args("medium1", mul=128)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=True)
    x, y, w, s, r = _inputs(conv, 200, 20000, torch.float32, seed=5)
    go = torch.randn(200, mid.dim, device=DEV)
    results = []
    for _ in range(5):
        xs = [t.clone().requires_grad_(True) for t in (x, y, w)]
        out = conv(*xs, s, r)
        results.append([out] + list(torch.autograd.grad(out, xs, go)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [False, True])
def test_ragged_degrees_and_unsorted_indices(deterministic):
    node, sh, mid, ins = mace_conv_args("large1", mul=32)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=deterministic)
    tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
    n = 64
    # node 0 receives 3000 edges, most nodes a few, several none; order shuffled
    r = torch.cat([torch.zeros(3000, dtype=torch.long), torch.randint(1, n // 2, (500,))])
    r = r[torch.randperm(r.numel())].to(DEV)
    s = torch.randint(0, n, (r.numel(),)).to(DEV)
    x = torch.randn(n, node.dim, device=DEV, dtype=torch.float64)
    y = torch.randn(r.numel(), sh.dim, device=DEV, dtype=torch.float64)
    w = torch.randn(r.numel(), conv.weight_numel, device=DEV, dtype=torch.float64)
    _check(conv, tp64, x, y, w, s, r, torch.float64)


@pytest.mark.parametrize("deterministic", [False, True])
def test_million_edge_graph(deterministic):
    node, sh, mid, ins = mace_conv_args("medium1", mul=32)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=deterministic)
    n, e = 20000, 1_200_000
    x, y, w, s, r = _inputs(conv, n, e, torch.float32, seed=6)
    out = conv(x, y, w, s, r)
    # reference on the GPU in float64, in chunks of edges (the sum is linear in the edges)
    from mace_accel.backends import reference

    ref = torch.zeros(n, mid.dim, dtype=torch.float64, device=DEV)
    for a in range(0, e, 200_000):
        sl = slice(a, a + 200_000)
        ref += reference.forward(conv.plan, x.double(), y[sl].double(), w[sl].double(), s[sl], r[sl], n)
    assert rel(out.double(), ref) < 1e-5


def _assert_groups_like_sort(keys, num_rows, perm, seg):
    """(perm, seg) of csr_unordered: the stable sort's row pointers, and each row's segment holds exactly that
    row's edges."""
    from mace_accel.backends import cuda as B

    _, seg_s = B.csr(keys, num_rows)
    rows = torch.repeat_interleave(torch.arange(num_rows, device=DEV), seg_s[1:] - seg_s[:-1])
    assert torch.equal(seg, seg_s) and torch.equal(keys[perm], rows)


@pytest.mark.parametrize("num_rows,num_edges", [(1, 1), (7, 0), (50, 700), (3000, 200000)])
def test_unordered_csr_groups_every_edge_once(num_rows, num_edges):
    """csr_unordered (atomic variant): the same row pointers as the stable sort, and each row's segment holds
    exactly that row's edges (in arrival order); an out-of-range key is skipped, never written."""
    from mace_accel.backends import cuda as B

    keys = torch.randint(0, num_rows, (num_edges,), device=DEV)
    keys[: num_edges // 3] = keys[: num_edges // 3].sort().values  # sorted and unsorted stretches
    perm, seg = B.csr_unordered(keys, num_rows)
    _assert_groups_like_sort(keys, num_rows, perm, seg)
    assert torch.equal(perm.sort().values, torch.arange(num_edges, device=DEV))
    if num_edges:
        bad = keys.clone()
        bad[0] = num_rows + 5
        perm_b, seg_b = B.csr_unordered(bad, num_rows)
        assert int(seg_b[-1]) == num_edges - 1 and 0 not in set(perm_b[: num_edges - 1].tolist())
    for counters in B._CSR_COUNTERS.values():  # the kernels leave their persistent workspace zeroed
        assert not counters.any()


def test_unordered_csr_workspace_reuse_across_sizes_and_streams():
    """The persistent counters of csr_unordered: reused by calls with fewer and more rows (regrown), on a side
    stream (its own workspace), and left zeroed after each; every call agrees with the stable sort."""
    from mace_accel.backends import cuda as B

    gen = torch.Generator(device=DEV).manual_seed(5)
    side = torch.cuda.Stream()
    for num_rows, num_edges, stream in ((300, 5000, None), (40, 3000, None), (9000, 70000, None),
                                        (300, 5000, side), (77, 900, None)):
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            keys = torch.randint(0, num_rows, (num_edges,), device=DEV, generator=gen)
            _assert_groups_like_sort(keys, num_rows, *B.csr_unordered(keys, num_rows))
        torch.cuda.synchronize()
        assert all(not c.any() for c in B._CSR_COUNTERS.values())
    assert len(B._CSR_COUNTERS) >= 2  # the side stream has its own


def test_unordered_csr_threads_sharing_a_stream(monkeypatch):
    """Two Python threads group different graphs on the same (default) stream while the first one pauses
    between its count and place launches (the GIL is free then): the shared workspace must not take the second
    thread's counts in between. Both groupings agree with the stable sort."""
    import threading
    import time

    from mace_accel.backends import cuda as B

    real, paused = B.run_on_torch_stream, threading.Event()

    def slow_after_count(fn, device, blocks, threads, args):
        real(fn, device, blocks, threads, args)
        if threading.current_thread().name == "first" and not paused.is_set():
            paused.set()
            time.sleep(0.2)  # the second thread runs now

    gen = torch.Generator(device=DEV).manual_seed(9)
    sizes = {"first": 700, "second": 500}
    graphs = {name: torch.randint(0, rows, (20000,), device=DEV, generator=gen) for name, rows in sizes.items()}
    B.csr_unordered(graphs["first"], 1000)  # the workspace fits both graphs: the second call reuses it
    torch.cuda.synchronize()
    monkeypatch.setattr(B, "run_on_torch_stream", slow_after_count)
    got, errors = {}, []

    def work(name):
        try:
            if name == "second":
                paused.wait(5)
            got[name] = (B.csr_unordered(graphs[name], sizes[name]), sizes[name])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,), name=n) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    torch.cuda.synchronize()
    assert not errors and paused.is_set()
    for name, ((perm, seg), rows) in got.items():
        _assert_groups_like_sort(graphs[name], rows, perm, seg)
    assert all(not c.any() for c in B._CSR_COUNTERS.values())


def test_empty_graph_cuda():
    node, sh, mid, ins = mace_conv_args("medium1", mul=32)
    for det in (False, True):
        conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=det)
        x = torch.randn(5, node.dim, device=DEV, requires_grad=True)
        y = torch.randn(0, sh.dim, device=DEV, requires_grad=True)
        w = torch.randn(0, conv.weight_numel, device=DEV, requires_grad=True)
        e = torch.zeros(0, dtype=torch.long, device=DEV)
        out = conv(x, y, w, e, e)
        assert out.shape == (5, mid.dim) and torch.all(out == 0)
        gx, = torch.autograd.grad(out.sum(), (x,))
        assert torch.all(gx == 0)


def test_cuda_graph_capture_and_streams():
    node, sh, mid, ins = mace_conv_args("medium1", mul=128)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, check_inputs=False)
    x, y, w, s, r = _inputs(conv, 100, 3000, torch.float32, seed=7)
    ref = conv(x, y, w, s, r)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            conv(x, y, w, s, r)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = conv(x, y, w, s, r)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert rel(out, conv(x, y, w, s, r)) < 1e-6
    assert rel(out, ref) > 1e-3  # the replay used the new x


def test_torch_compile_cuda():
    node, sh, mid, ins = mace_conv_args("medium1", mul=32)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, check_inputs=False)
    x, y, w, s, r = _inputs(conv, 30, 300, torch.float32, seed=8)
    f = torch.compile(lambda a, b, c: conv(a, b, c, s, r).square().sum(), fullgraph=True)
    xs = [t.clone().requires_grad_(True) for t in (x, y, w)]
    val = f(*xs)
    g = torch.autograd.grad(val, xs)
    xr = [t.clone().requires_grad_(True) for t in (x, y, w)]
    val_ref = conv(*xr, s, r).square().sum()
    g_ref = torch.autograd.grad(val_ref, xr)
    assert rel(val, val_ref) < 1e-5
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", ["layer0", "medium1"])
def test_double_backward_with_and_without_grad_of_gout(layer, dtype):
    """The fused double backward with the gradient w.r.t. gout (gout requires grad: the kernel computes gg) and
    without it (gout constant: the gg contraction is compiled out) both match e3nn, gg included."""
    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins)
    tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
    x, y, w, s, r = _inputs(conv, 50, 700, dtype, seed=5)
    n = x.shape[0]
    _, gtol = TOL[dtype]
    go = torch.randn(n, conv.plan.out_dim, dtype=torch.float64, device=DEV)
    vs = [torch.randn(t.shape, dtype=torch.float64, device=DEV) for t in (x, y, w)]
    for with_gout in (True, False):
        ref = _second_order(lambda a, b, c: e3nn_conv(tp64, a, b, c, s, r, n), [t.double() for t in (x, y, w)], go,
                            vs, with_gout)
        out = _second_order(lambda a, b, c: conv(a, b, c, s, r), [x, y, w], go.to(dtype), vs, with_gout)
        assert len(out) == len(ref) == (4 if with_gout else 3)
        for name, a, b in zip("xywg", out, ref):
            assert rel(a.double(), b) < gtol, f"with_gout={with_gout} d/d{name}"


@pytest.mark.parametrize("node", ["128x0e+128x1o+128x2e", "4x0e+5x1o+1x2e"])
def test_vector_dx_atomics_float32(node, monkeypatch):
    """The staged float32 dx atomics issued as 4-element vector reductions (codegen.VECTOR_DX_ATOMICS) match
    e3nn in the backward and the fused double backward. The second case has a chunk of 5 channels of 1o (15
    elements: a last group of 3 added one by one) and a 2e block whose offset (19) is not a multiple of 4
    (scalar atomics for that block)."""
    from mace.modules.irreps_tools import tp_out_irreps_with_instructions

    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    kinds = (codegen.KIND_BACKWARD, codegen.KIND_DOUBLE)
    monkeypatch.setattr(codegen, "VECTOR_DX_ATOMICS", {(k, "float32"): True for k in kinds})
    monkeypatch.setattr(codegen, "COALESCED_DX_ATOMICS", {"float32": True, "float64": True})
    monkeypatch.setattr(B, "_SPECS", {})
    node, sh = o3.Irreps(node), o3.Irreps.spherical_harmonics(3)
    mid, ins = tp_out_irreps_with_instructions(node, sh, o3.Irreps("8x0e+8x1o+8x2e+8x3o"))
    conv = mace_accel.TensorProductConv(node, sh, mid, ins)
    assert conv.plan.in1_dim % codegen.VECTOR_WIDTH == 0
    spec = B._spec(conv.plan, codegen.KIND_BACKWARD, "float32", False, codegen.DX_ATOMIC, True, True)
    assert spec.vector_dx and "float4" in codegen.render(conv.plan, spec)["source"]
    tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
    x, y, w, s, r = _inputs(conv, 50, 700, torch.float32, seed=7)
    _check(conv, tp64, x, y, w, s, r, torch.float32)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("switch", ["stream_w", "layout"])
def test_table_switches_cuda_vs_e3nn(switch, on, dtype, deterministic, monkeypatch):
    """Every kernel kind with one of codegen's per-kernel switches forced on or off matches e3nn to every
    derivative order (large layer 1: float64 splits into output parts):

    * ``stream_w``: weight rows read and dW written as streaming data (STREAM_WEIGHTS: evict-first loads and
      prefetch, streaming stores);
    * ``layout``: sender rows loaded as ``*(x_row + i)`` (POINTER_X_LOADS) and receiver rows streamed
      (STREAM_RECEIVER_ROWS: forward output stores, output-gradient loads); the deterministic dx kernel has
      neither switch.
    """
    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    kinds = (codegen.KIND_FORWARD, codegen.KIND_BACKWARD, codegen.KIND_GRAD_X, codegen.KIND_DOUBLE)
    dts = ("float32", "float64")
    if switch == "stream_w":
        monkeypatch.setattr(codegen, "STREAM_WEIGHTS", {(k, dt): on for k in kinds for dt in dts})
    else:
        monkeypatch.setattr(codegen, "POINTER_X_LOADS", {(k, dt, gg): on for k in kinds for dt in dts
                                                         for gg in (False, True)})
        monkeypatch.setattr(codegen, "STREAM_RECEIVER_ROWS", {(k, dt): on for k in kinds for dt in dts})
    monkeypatch.setattr(B, "_SPECS", {})
    node, sh, mid, ins = mace_conv_args("large1", mul=128)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=deterministic)
    spec = B._spec(conv.plan, codegen.KIND_BACKWARD, str(dtype)[6:], deterministic,
                   codegen.DX_NONE if deterministic else codegen.DX_ATOMIC, True, True)
    if switch == "stream_w":
        assert spec.stream_w == on
    else:
        assert spec.pointer_x_loads == spec.stream_rows == on
        src = codegen.render(conv.plan, spec)["source"]
        assert ("__ldcs(g_row" in src) == on
        if "x" not in spec.stage:  # float64: the sender rows come from the shared-memory stage (STAGED_ROWS)
            assert ("*(x_row + " in src) == on
    tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
    x, y, w, s, r = _inputs(conv, 50, 700, dtype, seed=17 if switch == "stream_w" else 19)
    _check(conv, tp64, x, y, w, s, r, dtype)


DTYPES = ("float32", "float64")


def _every(kinds, value, flags=None):
    """A codegen table giving ``value`` to every kind of ``kinds`` in both dtypes; ``flags``: the values of the
    table's third key (need_gg, segmented) to give it under as well."""
    if flags is None:
        return {(k, d): value for k in kinds for d in DTYPES}
    return {(k, d, f): value for k in kinds for d in DTYPES for f in flags}


def _assert_close(names, got, ref, dtype, what):
    """Each of ``got`` matches ``ref`` to the gradient tolerance of ``dtype`` (a NaN anywhere fails)."""
    for name, a, b in zip(names, got, ref):
        assert rel(a.double(), b.double()) < TOL[dtype][1], f"{what}: {name}"


def _check_misaligned_weights(conv, tp64, x, y, w, s, r, dtype):
    """The forward with the weights as a view that starts one element (4 or 8 bytes) into its storage, which a
    launch with bulk-copied weight rows must copy to an aligned buffer, matches e3nn."""
    from mace_accel.backends.cuda import codegen

    flat = torch.randn(w.numel() + 1, dtype=dtype, device=DEV)
    w_odd = flat[1:].view_as(w)
    w_odd.copy_(w)
    assert w_odd.data_ptr() % codegen.BULK_ALIGN_BYTES
    out = conv(x, y, w_odd, s, r)
    assert rel(out.double(), e3nn_conv(tp64, x.double(), y.double(), w.double(), s, r, x.shape[0])) < \
        (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", ["layer0", "large1"])
def test_bulk_staged_rows_cuda_vs_e3nn(layer, dtype, deterministic, monkeypatch):
    """Every kernel kind with its weight rows bulk-copied one edge ahead into shared memory (stage "bx": the
    weight rows by sm_90 bulk copies and mbarriers, the sender rows by cp.async; as much as fits) matches e3nn
    to every derivative order, with and without the L2 prefetch, one and two edges ahead (a batch of edges
    shorter than that included: layer 0's segments). The weights come in as a view that starts 4
    bytes into its storage, which the launch must copy to an aligned buffer."""
    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    kinds = (codegen.KIND_FORWARD, codegen.KIND_BACKWARD, codegen.KIND_DOUBLE)
    monkeypatch.setattr(codegen, "STAGED_ROWS", _every(kinds, "bx"))
    monkeypatch.setattr(codegen, "ROW_RING", {})  # the staged rows, not the whole-row ring
    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=deterministic)
    tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
    x, y, w, s, r = _inputs(conv, 50, 700, dtype, seed=13)
    for prefetch, ahead in ((0, 2), (1, 1)):  # edges in flight: 2 (three buffers) and 1
        monkeypatch.setattr(codegen, "PREFETCH_EDGES", _every(kinds, prefetch))
        monkeypatch.setattr(codegen, "STAGE_AHEAD", _every(kinds, ahead))
        monkeypatch.setattr(B, "_SPECS", {})
        spec = B._spec(conv.plan, codegen.KIND_BACKWARD, str(dtype)[6:], deterministic,
                       codegen.DX_NONE if deterministic else codegen.DX_ATOMIC, True, True)
        assert "b" in spec.stage and "bulk_copy(bdst" in codegen.render(conv.plan, spec)["source"]
        _check(conv, tp64, x, y, w, s, r, dtype)
        _check_misaligned_weights(conv, tp64, x, y, w, s, r, dtype)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", ["layer0", "large1"])
def test_staged_rows_cuda_vs_e3nn(layer, dtype, deterministic, monkeypatch):
    """Every kernel kind that can copy its weight and sender rows one edge ahead into shared memory
    (codegen.STAGED_ROWS, as much as fits) matches e3nn to every derivative order: layer 0 walks two or four
    edges per loop iteration in the forward, large layer 1 float64 splits into output parts."""
    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    kinds = (codegen.KIND_FORWARD, codegen.KIND_BACKWARD, codegen.KIND_DOUBLE)
    monkeypatch.setattr(codegen, "STAGED_ROWS", _every(kinds, "wx"))
    monkeypatch.setattr(codegen, "ROW_RING", {})  # the staged rows, not the whole-row ring
    monkeypatch.setattr(B, "_SPECS", {})
    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=deterministic)
    spec = B._spec(conv.plan, codegen.KIND_BACKWARD, str(dtype)[6:], deterministic,
                   codegen.DX_NONE if deterministic else codegen.DX_ATOMIC, True, True)
    assert spec.stage and "stage_copy(dst" in codegen.render(conv.plan, spec)["source"]
    tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
    x, y, w, s, r = _inputs(conv, 50, 700, dtype, seed=11)
    _check(conv, tp64, x, y, w, s, r, dtype)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", ["layer0", "medium1", "large1"])
def test_row_ring_cuda_vs_e3nn(layer, dtype, deterministic, monkeypatch):
    """Every kernel kind with its whole weight rows brought into the block's ring (stage "r": bulk copies,
    full / empty mbarriers; codegen.ROW_RING) matches e3nn to every derivative order, for rings of 2, 4 and 8
    slots (as many as fit), on a graph whose receiver segments are shorter than a batch of 32 edges and on one
    whose segments span several batches (the ring's slots and barrier phases run on across them). The
    weights come in as a view that starts 4 bytes into its storage (the launch copies it to an aligned
    buffer). Large layer 1 float64 splits into output parts, which the ring refuses: the tables' staged rows
    take over there."""
    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    kinds = (codegen.KIND_FORWARD, codegen.KIND_BACKWARD, codegen.KIND_DOUBLE)
    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=deterministic)
    tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
    dt = str(dtype)[6:]
    for nodes, ahead in ((50, 3), (6, 1), (6, 7)):  # ~14 edges per receiver, then ~117 (four batches)
        monkeypatch.setattr(codegen, "ROW_RING", _every(kinds, ahead, (False, True)))
        monkeypatch.setattr(B, "_SPECS", {})
        spec = B._spec(conv.plan, codegen.KIND_FORWARD, dt, True)
        refused = codegen.ring_refusal(conv.plan, spec, spec.num_parts)
        assert (spec.stage == "r") == (not refused)
        if spec.stage == "r":
            assert "ring_issue<" in codegen.render(conv.plan, spec)["source"] and spec.prefetch == 0
        x, y, w, s, r = _inputs(conv, nodes, 700, dtype, seed=23 + nodes + ahead)
        _check(conv, tp64, x, y, w, s, r, dtype)
        _check_misaligned_weights(conv, tp64, x, y, w, s, r, dtype)


@pytest.mark.parametrize("ring", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", ["layer0", "medium1"])
def test_run_items_longer_than_a_batch_cuda_vs_e3nn(layer, dtype, ring, monkeypatch):
    """The runs kernels (atomic backward, fused double backward) with work items of 64 and 80 edges
    (codegen.RUN_EDGES; an item is walked in batches of 32 and flushes at every batch end) match e3nn to every
    derivative order, with the whole-row ring (its slots run on across the batches) and without it (the
    tables' staged rows / L2 prefetch), on graphs whose receiver runs are shorter and longer than an item. The
    fused double backward with d/dgout (gg flushed with atomics at run ends) gives the same four gradients
    as with 32-edge items."""
    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    kinds = (codegen.KIND_BACKWARD, codegen.KIND_DOUBLE)
    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins)
    tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
    plan, dt = conv.plan, str(dtype)[6:]
    if not ring:
        monkeypatch.setattr(codegen, "ROW_RING", {})
    for nodes in (50, 6):  # ~14 edges per receiver, then ~117
        x, y, w, s, r = _inputs(conv, nodes, 700, dtype, seed=31 + nodes)
        g = torch.randn(nodes, plan.out_dim, dtype=dtype, device=DEV)
        ggx, ggy, ggw = torch.randn_like(x), torch.randn_like(y), torch.randn_like(w)
        with_gg = []
        for edges in (32, 64, 80):
            monkeypatch.setattr(codegen, "RUN_EDGES", _every(kinds, edges, (False, True)))
            monkeypatch.setattr(B, "_SPECS", {})
            spec = B._spec(plan, codegen.KIND_BACKWARD, dt, False, codegen.DX_ATOMIC, True, True)
            assert spec.edges_per_warp == edges and (spec.stage == "r") == ring
            if edges != 32:
                _check(conv, tp64, x, y, w, s, r, dtype)
            with_gg.append(B.double_backward(plan, x, y, w, g, ggx, ggy, ggw, s, r, need_gg=True))
        for other in with_gg[1:]:
            _assert_close(("gx", "gy", "gw", "gg"), other, with_gg[0], dtype, "with d/dgout")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segmented_atomic_kernels_match_runs(dtype):
    """The atomic backward and the fused double backward without d/dgout, walked one receiver segment per
    work item (scripts/segment_sweep.py; off in the backend), give the runs variant's dx, dy and dw."""
    from dataclasses import replace

    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen

    node, sh, mid, ins = mace_conv_args("medium1", mul=32)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins)
    plan, dt = conv.plan, str(dtype)[6:]
    x, y, w, s, r = _inputs(conv, 60, 900, dtype, seed=19)
    g, ggx = torch.randn(x.shape[0], plan.out_dim, dtype=dtype, device=DEV), torch.randn_like(x)
    ggy, ggw = torch.randn_like(y), torch.randn_like(w)
    for kind, need_gg in ((codegen.KIND_BACKWARD, True), (codegen.KIND_DOUBLE, False)):
        runs = B._spec(plan, kind, dt, False, codegen.DX_ATOMIC, True, True, need_gg=need_gg)
        extra = dict(ggx=ggx, ggy=ggy, ggw=ggw) if kind == codegen.KIND_DOUBLE else {}
        outs = [launch_edge_kernel(plan, spec, x, y, w, g, s, r, dw_fill=float("nan"), **extra)  # dW poisoned
                for spec in (runs, replace(runs, segmented=True))]
        for name, a, b in zip(("dx", "dy", "dw"), *outs):
            assert torch.isfinite(b).all() and rel(b.double(), a.double()) < TOL[dtype][1], f"{kind} {name}"
    with pytest.raises(ValueError, match="d/dgout"):
        codegen.render(plan, replace(B._spec(plan, codegen.KIND_DOUBLE, dt, False, codegen.DX_ATOMIC, True, True),
                                     segmented=True))


def _check_grad_of_gout(conv, tp64, x, y, w, s, r, dtype):
    """The second-order gradients with gout requiring grad too (the fused double backward's d/dgout) match
    e3nn's."""
    n = x.shape[0]
    go = torch.randn(n, conv.plan.out_dim, dtype=torch.float64, device=DEV)
    vs = [torch.randn(t.shape, dtype=torch.float64, device=DEV) for t in (x, y, w)]
    ref = _second_order(lambda a, b, c: e3nn_conv(tp64, a, b, c, s, r, n), [t.double() for t in (x, y, w)], go,
                        vs, True)
    out = _second_order(lambda a, b, c: conv(a, b, c, s, r), [x, y, w], go.to(dtype), vs, True)
    for name, a, b in zip("xywg", out, ref):
        assert rel(a.double(), b) < TOL[dtype][1], f"with d/dgout: d/d{name}"


#: Which weight-row stages the older-GPU test puts the kernels on: the tables' own choices for such a target
#: (codegen.PRE_SM90_STAGED_ROWS), the sm_90 tables (the whole-row ring in the runs kernels, whose fallback
#: reads the weights from global memory, the L2 prefetch compiled out; output parts with staged rows in large
#: float64), every kind on per-lane staged rows (cp.async from sm_80, plain copies before), or on bulk-staged
#: rows (sm_90 bulk copies and mbarriers; before sm_90 one lane copies and a warp barrier stands in) with the
#: prefetch asked for.
OLDER_GPU_STAGES = {"tables": None, "ring": None, "staged": "wx", "bulk": "bx"}


@pytest.mark.parametrize("stages", list(OLDER_GPU_STAGES))
@pytest.mark.parametrize("arch", ["compute_80", "compute_75"])
def test_older_gpu_code_paths_vs_e3nn(arch, stages, monkeypatch):
    """The kernels as an A100 (compute_80: every sm_90 branch off, so no bulk copies, mbarriers, L2 prefetch,
    evict-first policies or vector atomics; the whole-row ring reads its weights from global memory) and a T4
    (compute_75: no cp.async either) run them, compiled as PTX for that architecture and JIT-compiled by the
    driver for this GPU (backends.cuda.target_arch_override): every kernel kind of both variants, the
    receiver grouping and the plain tensor product match e3nn to every derivative order, d/dgout included,
    in float32 and float64, on each of OLDER_GPU_STAGES' row stages. Afterwards the kernels are this GPU's
    own again."""
    from mace_accel.backends import cuda as B
    from mace_accel.backends.cuda import codegen, compiler

    kinds = (codegen.KIND_FORWARD, codegen.KIND_BACKWARD, codegen.KIND_DOUBLE)
    layers = ("layer0", "medium1", "large1")
    if stages != "tables":  # the sm_90 tables, as they are or with every kind on the staged rows
        monkeypatch.setattr(codegen, "PRE_SM90_TABLES", False)
    if OLDER_GPU_STAGES[stages]:
        monkeypatch.setattr(codegen, "STAGED_ROWS", _every(kinds, OLDER_GPU_STAGES[stages]))
        monkeypatch.setattr(codegen, "ROW_RING", {})
        monkeypatch.setattr(codegen, "PREFETCH_EDGES", _every(kinds, 1))
        layers = ("layer0", "medium1")
    monkeypatch.setattr(B, "_SPECS", {})
    dev = torch.cuda.current_device()
    own = compiler.target_arch(dev)
    with B.target_arch_override(arch):
        assert compiler.target_arch(dev) == arch and not B.target_is_sm90(dev)
        plan = mace_accel.TensorProductConv(*mace_conv_args("medium1", mul=128)).plan
        spec = B._spec(plan, codegen.KIND_BACKWARD, "float32", False, codegen.DX_ATOMIC, True, True, sm90=False)
        assert spec.stage == {"tables": "w", "ring": "r"}.get(stages, OLDER_GPU_STAGES[stages]), spec.stage
        for layer in layers:
            node, sh, mid, ins = mace_conv_args(layer, mul=128)
            tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
            for dtype in (torch.float32, torch.float64):
                for deterministic in (False, True):
                    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=deterministic)
                    x, y, w, s, r = _inputs(conv, 50, 700, dtype, seed=41)
                    _check(conv, tp64, x, y, w, s, r, dtype)
                    if stages == "bulk":
                        _check_misaligned_weights(conv, tp64, x, y, w, s, r, dtype)
                    if not deterministic:
                        _check_grad_of_gout(conv, tp64, x, y, w, s, r, dtype)
        if stages == "tables":
            node, sh, mid, ins = mace_conv_args("medium1", mul=32)
            m = mace_accel.TensorProduct(node, sh, mid, ins)
            tp64 = e3nn_tp(node, sh, mid, ins, device=DEV)
            for dtype in (torch.float32, torch.float64):
                _check_plain_tp(m, tp64, dtype)
    assert compiler.target_arch(dev) == own and B.target_is_sm90(dev) == (compiler.parse_arch(own)[1] >= 90)
