"""Symmetric contraction (product basis): plan + reference executor vs mace, the torch op's autograd, the
surgery swap, the generated CUDA source (compiles) and, on a GPU, the kernels vs the reference."""
import copy
import io
import shutil
import subprocess

import pytest
import torch

import mace  # noqa: F401  (sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD before e3nn loads)
from mace.modules.symmetric_contraction import SymmetricContraction

import host_kernels
from ptx_checks import int_index_widenings, nvrtc_or_skip
from mace_accel.backends.cuda.sc_codegen import (KIND_SC_FORWARD, KIND_SC_GRAD_W, KIND_SC_GRAD_X,
                                                 SC_THREADS_PER_BLOCK, SCKernelSpec, grad_w_chunks, render_sc)
from mace_accel.backends.reference import sc as ref_sc
from mace_accel.ops.sc import sc_fwd
from mace_accel.problem.sc import SCProblem
from mace_accel.surgery.symcon import (AcceleratedSymmetricContraction, accelerate_symmetric_contraction,
                                       restore_symmetric_contraction)

# (irreps_in, irreps_out, correlation): MACE-MP-0 small/medium/large product bases and smaller variants
CASES = {
    "mp-small": ("{c}x0e+{c}x1o+{c}x2e+{c}x3o", "{c}x0e", 3),
    "mp-medium": ("{c}x0e+{c}x1o+{c}x2e+{c}x3o", "{c}x0e+{c}x1o", 3),
    "mp-large": ("{c}x0e+{c}x1o+{c}x2e+{c}x3o", "{c}x0e+{c}x1o+{c}x2e", 3),
    "lmax2-corr2": ("{c}x0e+{c}x1o+{c}x2e", "{c}x0e+{c}x1o", 2),
    "lmax1-corr4": ("{c}x0e+{c}x1o", "{c}x0e+{c}x1o", 4),
}


def make_pair(case, channels, num_elements=3, dtype=torch.float64, seed=0):
    """(mace SymmetricContraction, accelerated deep copy), random weights."""
    irreps_in, irreps_out, corr = CASES[case]
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        ref = SymmetricContraction(irreps_in.format(c=channels), irreps_out.format(c=channels), correlation=corr,
                                   num_elements=num_elements)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
    acc = copy.deepcopy(ref)
    accelerate_symmetric_contraction(acc)
    return ref, acc


def inputs(acc, n, dtype, device="cpu", one_hot=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    plan = acc._sc_plan
    e = acc.contractions[0].weights_max.shape[0]
    x = torch.randn(n, plan.num_channels, plan.num_ell, generator=g, dtype=dtype)
    if one_hot:
        y = torch.nn.functional.one_hot(torch.randint(0, e, (n,), generator=g), e).to(dtype)
    else:
        y = torch.rand(n, e, generator=g, dtype=dtype)
    return x.to(device), y.to(device)


def rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("one_hot", [True, False])
def test_reference_matches_mace_float64(case, one_hot):
    ref, acc = make_pair(case, channels=5)
    x, y = inputs(acc, 11, torch.float64, one_hot=one_hot)
    x.requires_grad_(True)
    want, got = ref(x, y), acc(x, y)
    assert got.shape == want.shape
    assert rel(got, want) <= 1e-12
    g = torch.randn_like(want)
    params_r = [p for p in ref.parameters() if p.requires_grad]
    params_a = [p for p in acc.parameters() if p.requires_grad]
    gw = torch.autograd.grad(want, [x] + params_r, g)
    ga = torch.autograd.grad(got, [x] + params_a, g)
    for a, b in zip(ga, gw):
        assert rel(a, b) <= 1e-12


def test_float32_reference_matches_mace():
    ref, acc = make_pair("mp-medium", channels=8, dtype=torch.float32)
    x, y = inputs(acc, 9, torch.float32)
    assert rel(acc(x, y), ref(x, y)) <= 1e-5


def test_gradcheck_gradgradcheck_float64():
    _, acc = make_pair("lmax1-corr4", channels=2, num_elements=2)
    x, _ = inputs(acc, 3, torch.float64, one_hot=False)
    wn = torch.randn(3, acc._sc_plan.weight_numel, 2, dtype=torch.float64)
    f = lambda a, b: sc_fwd(a, b, acc._sc_plan.key)  # noqa: E731
    args = (x.requires_grad_(True), wn.requires_grad_(True))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_plan_counts_and_symmetrisation():
    _, acc = make_pair("mp-medium", channels=4)
    plan = acc._sc_plan
    assert plan.weight_numel == sum(p.shape[1] for p in acc.parameters())
    assert all(list(m) == sorted(m) for m in plan.monos)
    assert len(set(plan.monos)) == len(plan.monos)
    assert plan.num_outputs == 1 + 3 and plan.out_dim == 4 * 4
    # one coefficient by hand: output 1o (o = 1 + m), correlation 3, from U summed over the tuple's permutations
    import itertools
    import math

    u3 = acc.contractions[1].U_tensors(3).double()  # [3, 16, 16, 16, K3]
    k0 = 1 + 4 + 23 + 1 + 6  # weight offset of (1o, nu=3): 0e takes K 1 + 4 + 23, then 1o's nu=1, nu=2
    o, p, k, u = next((o, p, k, u) for o, p, k, u in zip(plan.term_o, plan.term_p, plan.term_k, plan.term_u)
                      if o >= 1 and len(plan.monos[p]) == 3 and len(set(plan.monos[p])) == 2)
    t = plan.monos[p]
    want = sum(float(u3[(o - 1,) + perm + (k - k0,)]) for perm in set(itertools.permutations(t)))
    assert math.isclose(u, want, rel_tol=1e-12, abs_tol=1e-15)


def test_equivariance_under_rotation():
    from e3nn import o3

    ref, acc = make_pair("mp-medium", channels=3)
    x, y = inputs(acc, 4, torch.float64)
    irreps_in = o3.Irreps("0e+1o+2e+3o")
    rot = o3.rand_matrix(dtype=torch.float64)
    d_in = irreps_in.D_from_matrix(rot)
    d_out = o3.Irreps("0e+1o").D_from_matrix(rot)
    out = acc(x, y)                        # [n, 3*1 + 3*3]: 0e block then 1o block, channel-major
    out_rot = acc(x @ d_in.T, y)
    o0, o1 = out[:, :3], out[:, 3:].reshape(4, 3, 3)
    r0, r1 = out_rot[:, :3], out_rot[:, 3:].reshape(4, 3, 3)
    assert rel(r0, o0) <= 1e-12
    assert rel(r1, o1 @ d_out[1:, 1:].T) <= 1e-12


def test_restore_and_pickle_round_trip():
    ref, acc = make_pair("mp-small", channels=4)
    buf = io.BytesIO()
    torch.save(acc, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert isinstance(back, AcceleratedSymmetricContraction)
    x, y = inputs(acc, 5, torch.float64)
    assert torch.equal(back(x, y), acc(x, y))
    restore_symmetric_contraction(back)
    assert type(back) is SymmetricContraction
    assert rel(back(x, y), ref(x, y)) <= 1e-12
    assert {k for k, _ in back.state_dict().items()} == {k for k, _ in ref.state_dict().items()}


def test_plan_follows_loaded_u_buffers():
    """load_state_dict replaces the U buffers (they are in the state dict): the plan must follow. (The problem
    once held views of the float64 buffers, so an in-place load changed it too and went unnoticed.)"""
    ref, acc = make_pair("mp-small", channels=3)
    state = {k: (v * (1.5 + 0.25 * k.count("3")) if "U_matrix" in k else v) for k, v in ref.state_dict().items()}
    acc.load_state_dict(state)
    ref.load_state_dict(state)
    x, y = inputs(acc, 4, torch.float64)
    assert rel(acc(x, y), ref(x, y)) <= 1e-13


def test_bad_inputs():
    _, acc = make_pair("mp-small", channels=4)
    x, y = inputs(acc, 5, torch.float64)
    with pytest.raises(ValueError, match="expected \\[num_nodes, 4, 16\\]"):
        acc(x[:, :3], y)
    with pytest.raises(ValueError, match="node attributes have shape"):
        acc(x, y[:4])
    with pytest.raises(ValueError, match="dtype"):
        acc(x.float(), y)
    with pytest.raises(NotImplementedError, match="correlation 5"):
        SCProblem.from_u(2, 1, [("0e", [torch.ones(1, 1).numpy()] * 5)])
    with pytest.raises(ValueError, match="shape"):
        SCProblem.from_u(2, 4, [("1o", [torch.ones(3, 3, 1).numpy()])])


def test_generated_sources_compile(tmp_path):
    if not shutil.which("nvcc"):
        pytest.skip("nvcc is not available on this machine")
    _, acc = make_pair("mp-large", channels=128, num_elements=2, dtype=torch.float32)
    for dt in ("float32", "float64"):
        lo, hi = grad_w_chunks(acc._sc_plan)[-1]
        for spec in (SCKernelSpec(KIND_SC_FORWARD, dt), SCKernelSpec(KIND_SC_GRAD_X, dt),
                     SCKernelSpec(KIND_SC_GRAD_W, dt, lo, hi)):
            r = render_sc(acc._sc_plan, spec)
            src = tmp_path / f"{r['name']}.cu"
            src.write_text(r["source"])
            p = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-cubin", "-o", str(src.with_suffix(".cubin")),
                                str(src)], capture_output=True, text=True)
            assert p.returncode == 0, f"{spec.tag()}:\n{p.stderr[-2000:]}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grad_w_kernels_index_channels_in_64_bits(dtype):
    """The grad-w kernels compute the channel as a 64-bit index: with an int channel, NVRTC widened each column
    index with a multiply by ``stride << 32`` and a shift right by 32, and the H100 builds of some of those kernels
    were wrong (sc_codegen.py's module docstring). Their PTX has neither; the forward kernel keeps the int channel
    (the build it was checked and timed with) and so still has them."""
    nvrtc_or_skip()
    from mace_accel.backends.cuda.compiler import nvrtc_compile

    def widenings(spec):
        r = render_sc(plan, spec)
        return sum(int_index_widenings(nvrtc_compile(r["source"], r["name"], "compute_90")))

    _, acc = make_pair("mp-large", channels=48, dtype=getattr(torch, dtype))
    plan = acc._sc_plan
    assert widenings(SCKernelSpec(KIND_SC_GRAD_W, dtype, 128, 144)) == 0  # the chunk that was wrong in float64
    assert widenings(SCKernelSpec(KIND_SC_FORWARD, dtype)) > 0


@pytest.mark.parametrize("case", ["mp-medium", "lmax1-corr4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generated_kernels_compute_the_reference_on_host(case, dtype, tmp_path):
    """The generated CUDA source, built for the CPU with g++ and run block by block, against the reference."""
    if not host_kernels.available():
        pytest.skip("g++ is not available on this machine")
    channels, n = 5, 7  # 35 threads: the last block is partial
    _, acc = make_pair(case, channels=channels, dtype=dtype)
    plan = acc._sc_plan
    dt = "float32" if dtype == torch.float32 else "float64"
    x, _ = inputs(acc, n, dtype)
    wn = torch.randn(n, plan.weight_numel, channels, dtype=dtype)
    g = torch.randn(n, plan.out_dim, dtype=dtype)
    out = torch.full((n, plan.out_dim), float("nan"), dtype=dtype)
    dx, dw = torch.full_like(x, float("nan")), torch.full_like(wn, float("nan"))
    blocks = -(-n * channels // SC_THREADS_PER_BLOCK)
    specs = [SCKernelSpec(KIND_SC_FORWARD, dt), SCKernelSpec(KIND_SC_GRAD_X, dt)] + \
        [SCKernelSpec(KIND_SC_GRAD_W, dt, lo, hi) for lo, hi in grad_w_chunks(plan)]
    for spec in specs:
        r = render_sc(plan, spec)
        host_kernels.build(r["source"], r["name"], tmp_path)(x, wn, g, out, dx, dw, num_nodes=n, blocks=blocks)
    want = ref_sc.forward(plan, x.double(), wn.double())
    wdx, wdw = ref_sc.backward(plan, x.double(), wn.double(), g.double(), True, True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel(out.double(), want) <= tol
    assert rel(dx.double(), wdx) <= tol
    assert rel(dw.double(), wdw) <= tol


# ---- GPU -------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["mp-small", "mp-medium", "mp-large", "lmax1-corr4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference_and_mace(case, dtype):
    channels = 48  # not a multiple of 32: a warp spans two nodes
    ref, acc = make_pair(case, channels=channels, dtype=dtype)
    ref, acc = ref.cuda(), acc.cuda()
    x, y = inputs(acc, 301, dtype, device="cuda")
    tol_f, tol_g = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    xs = x.clone().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    ref64 = copy.deepcopy(ref).double()
    want = ref64(x64, y.double())
    got = acc(xs, y)
    assert rel(got.double(), want) <= tol_f
    g = torch.randn_like(want)
    pa = [p for p in acc.parameters() if p.requires_grad]
    pr = [p for p in ref64.parameters() if p.requires_grad]
    ga = torch.autograd.grad(got, [xs] + pa, g.to(dtype))
    gr = torch.autograd.grad(want, [x64] + pr, g)
    for i, (a, b) in enumerate(zip(ga, gr)):
        assert rel(a.double(), b) <= tol_g, f"gradient {i} (shape {tuple(a.shape)}): rel {rel(a.double(), b):.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_poisoned_outputs_are_fully_written(dtype):
    _, acc = make_pair("mp-medium", channels=40, dtype=dtype)
    acc = acc.cuda()
    x, y = inputs(acc, 37, dtype, device="cuda")
    plan = acc._sc_plan
    es = torch.finfo(dtype).bits // 8
    for _ in range(3):
        blocks = [torch.full((nb // 4,), float("nan"), device="cuda") for nb in
                  (37 * plan.out_dim * es, x.numel() * es, 37 * plan.weight_numel * 40 * es)]
        torch.cuda.synchronize()
        del blocks
        xs = x.clone().requires_grad_(True)
        out = acc(xs, y)
        assert torch.isfinite(out).all()
        pa = [p for p in acc.parameters() if p.requires_grad]
        for gr in torch.autograd.grad(out, [xs] + pa, torch.randn_like(out)):
            assert torch.isfinite(gr).all()


@pytest.mark.gpu
def test_cuda_gradcheck_gradgradcheck():
    _, acc = make_pair("lmax1-corr4", channels=3, num_elements=2)
    acc = acc.cuda()
    x, _ = inputs(acc, 4, torch.float64, device="cuda")
    wn = torch.randn(4, acc._sc_plan.weight_numel, 3, dtype=torch.float64, device="cuda")
    f = lambda a, b: sc_fwd(a, b, acc._sc_plan.key)  # noqa: E731
    args = (x.requires_grad_(True), wn.requires_grad_(True))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.gpu
def test_cuda_bitwise_reproducible():
    _, acc = make_pair("mp-medium", channels=128, dtype=torch.float32)
    acc = acc.cuda()
    x, y = inputs(acc, 500, torch.float32, device="cuda")
    runs = []
    for _ in range(5):
        xs = x.clone().requires_grad_(True)
        out = acc(xs, y)
        runs.append([out, torch.autograd.grad(out, xs, torch.ones_like(out))[0]])
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], r))


def test_weight_gradient_only_when_the_backward_pass_uses_it(monkeypatch):
    """Trainable weights, forces only (``autograd.grad(out, x)``): the backward computes no weight gradient;
    asking for the weights too still gives mace's values."""
    from mace_accel.backends.reference import sc as ref_sc

    ref, acc = make_pair("mp-medium", channels=4)
    x, y = inputs(acc, 7, torch.float64)
    x.requires_grad_(True)
    asked = []
    backward = ref_sc.backward

    def spy(plan, x_, wn, gout, need_x, need_w):
        asked.append((need_x, need_w))
        return backward(plan, x_, wn, gout, need_x, need_w)

    monkeypatch.setattr(ref_sc, "backward", spy)
    params_a = [p for p in acc.parameters() if p.requires_grad]
    assert params_a, "the test needs trainable weights"
    g = torch.randn(7, acc(x, y).shape[1], dtype=torch.float64)
    gx = torch.autograd.grad(acc(x, y), x, g)[0]
    assert asked and all(a == (True, False) for a in asked), asked
    assert rel(gx, torch.autograd.grad(ref(x, y), x, g)[0]) <= 1e-12
    asked.clear()
    got = torch.autograd.grad(acc(x, y), [x] + params_a, g)
    want = torch.autograd.grad(ref(x, y), [x] + [p for p in ref.parameters() if p.requires_grad], g)
    assert asked and all(a == (True, True) for a in asked), asked
    for a, b in zip(got, want):
        assert rel(a, b) <= 1e-12
