"""CPU: the reference backend through the torch ops, against e3nn (TP + scatter), to every order."""
import math

import pytest
import torch
from e3nn import o3

import mace_accel
from mace_accel.problem import TPProblem
from tp_cases import e3nn_conv, e3nn_tp, mace_conv_args, random_graph, rel

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}  # (forward, gradients)


def _inputs(conv, num_nodes, num_edges, dtype, seed, shared=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_nodes, conv.plan.in1_dim, generator=g, dtype=dtype)
    y = torch.randn(num_edges, conv.plan.in2_dim, generator=g, dtype=dtype)
    w = torch.randn(*(() if shared else (num_edges,)), conv.weight_numel, generator=g, dtype=dtype)
    s, r = random_graph(num_nodes, num_edges, generator=g)
    return x, y, w, s, r


def _compare_all_orders(conv, tp, x, y, w, s, r, dtype):
    ftol, gtol = TOL[dtype]
    xs = [t.clone().requires_grad_(True) for t in (x, y, w)]
    xr = [t.clone().double().requires_grad_(True) for t in (x, y, w)]
    tp64 = tp.double()
    out = conv(*xs, s, r)
    ref = e3nn_conv(tp64, *xr, s, r, x.shape[0])
    assert rel(out.double(), ref) < ftol
    go = torch.randn_like(ref)
    g1 = torch.autograd.grad(out, xs, go.to(dtype), create_graph=True)
    r1 = torch.autograd.grad(ref, xr, go, create_graph=True)
    for a, b in zip(g1, r1):
        assert rel(a.double(), b) < gtol
    vs = [torch.randn_like(b) for b in r1]
    g2 = torch.autograd.grad(sum((a * v.to(dtype)).sum() for a, v in zip(g1, vs)), xs)
    r2 = torch.autograd.grad(sum((b * v).sum() for b, v in zip(r1, vs)), xr)
    for a, b in zip(g2, r2):
        assert rel(a.double(), b) < gtol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer", ["layer0", "medium1", "large1"])
def test_mace_mp0_layers_match_e3nn(layer, dtype):
    node, sh, mid, ins = mace_conv_args(layer, mul=128)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins)
    tp = e3nn_tp(node, sh, mid, ins, dtype=torch.float64)
    x, y, w, s, r = _inputs(conv, 6, 20, dtype, seed=hash((layer, str(dtype))) % 1000)
    _compare_all_orders(conv, tp, x, y, w, s, r, dtype)


RANDOM_PROBLEMS = [
    # (irreps_in1, lmax of in2, target, irrep_norm, path_norm, shared)
    ("8x0e+8x1o", 2, "8x0e+8x1o+8x1e+8x2e", "component", "element", False),
    ("16x1o+16x2e", 3, "16x0e+16x1o+16x2e+16x3o+16x2o", "norm", "path", False),
    ("5x0e+3x2e+2x4e", 4, "5x0e+3x2e+3x4e+2x3e+2x1e+5x4e", "component", "path", True),
    ("96x0e", 1, "96x0e+96x1o", "none", "none", False),
    ("33x1e+33x3o", 2, "33x2o+33x1e+33x4o", "norm", "element", True),
]


@pytest.mark.parametrize("case", range(len(RANDOM_PROBLEMS)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_problems_match_e3nn(case, dtype):
    from mace.modules.irreps_tools import tp_out_irreps_with_instructions

    node, lmax, target, inorm, pnorm, shared = RANDOM_PROBLEMS[case]
    node, sh = o3.Irreps(node), o3.Irreps.spherical_harmonics(lmax)
    mid, ins = tp_out_irreps_with_instructions(node, sh, o3.Irreps(target))
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, irrep_normalization=inorm, path_normalization=pnorm,
                                        shared_weights=shared)
    tp = e3nn_tp(node, sh, mid, ins, shared_weights=shared, irrep_normalization=inorm, path_normalization=pnorm)
    x, y, w, s, r = _inputs(conv, 5, 13, dtype, seed=case, shared=shared)
    _compare_all_orders(conv, tp, x, y, w, s, r, dtype)


def test_several_paths_into_one_output_block():
    # e3nn allows several instructions to share an output block (normalisation counts the fan-in)
    node, sh, out = o3.Irreps("4x0e+4x1o"), o3.Irreps("1x0e+1x1o"), o3.Irreps("4x0e+4x1o")
    ins = [(0, 0, 0, "uvu", True), (1, 1, 0, "uvu", True), (0, 1, 1, "uvu", True), (1, 0, 1, "uvu", True)]
    for pnorm in ("element", "path"):
        conv = mace_accel.TensorProductConv(node, sh, out, ins, path_normalization=pnorm)
        tp = e3nn_tp(node, sh, out, ins, path_normalization=pnorm)
        x, y, w, s, r = _inputs(conv, 4, 9, torch.float64, seed=3)
        _compare_all_orders(conv, tp, x, y, w, s, r, torch.float64)


def test_plain_tensor_product_matches_e3nn():
    node, sh, mid, ins = mace_conv_args("medium1", mul=8)
    for shared in (False, True):
        m = mace_accel.TensorProduct(node, sh, mid, ins, shared_weights=shared)
        tp = e3nn_tp(node, sh, mid, ins, shared_weights=shared)
        x = torch.randn(7, node.dim, dtype=torch.float64)
        y = torch.randn(7, sh.dim, dtype=torch.float64)
        w = torch.randn(*(() if shared else (7,)), m.weight_numel, dtype=torch.float64)
        assert rel(m(x, y, w), tp(x, y, w)) < 1e-12


def test_gradcheck_and_gradgradcheck_float64():
    node, sh, mid, ins = mace_conv_args("large1", mul=2, lmax_sh=2)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins)
    x, y, w, s, r = _inputs(conv, 3, 5, torch.float64, seed=11)
    args = tuple(t.requires_grad_(True) for t in (x, y, w))
    f = lambda a, b, c: conv(a, b, c, s, r)  # noqa: E731
    # fast mode checks random projections of the Jacobians; the full Jacobian check follows on a tiny case
    assert torch.autograd.gradcheck(f, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, args, fast_mode=True)
    node2, sh2, mid2, ins2 = mace_conv_args("medium1", mul=1, lmax_sh=1)
    conv2 = mace_accel.TensorProductConv(node2, sh2, mid2, ins2)
    x2, y2, w2, s2, r2 = _inputs(conv2, 2, 3, torch.float64, seed=12)
    args2 = tuple(t.requires_grad_(True) for t in (x2, y2, w2))
    f2 = lambda a, b, c: conv2(a, b, c, s2, r2)  # noqa: E731
    assert torch.autograd.gradcheck(f2, args2)
    assert torch.autograd.gradgradcheck(f2, args2)
    tpm = mace_accel.TensorProduct(node, sh, mid, ins, shared_weights=True)
    xe = torch.randn(4, node.dim, dtype=torch.float64, requires_grad=True)
    ye = torch.randn(4, sh.dim, dtype=torch.float64, requires_grad=True)
    we = torch.randn(tpm.weight_numel, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tpm, (xe, ye, we), fast_mode=True)
    assert torch.autograd.gradgradcheck(tpm, (xe, ye, we), fast_mode=True)


def test_equivariance_under_random_rotation():
    node, sh, mid, ins = mace_conv_args("large1", mul=4)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins)
    torch.manual_seed(5)
    R = o3.rand_matrix(dtype=torch.float64)
    vec = torch.randn(12, 3, dtype=torch.float64)
    y = o3.spherical_harmonics(sh, vec, normalize=True)
    yr = o3.spherical_harmonics(sh, vec @ R.T, normalize=True)
    x = torch.randn(5, node.dim, dtype=torch.float64)
    w = torch.randn(12, conv.weight_numel, dtype=torch.float64)
    s, r = random_graph(5, 12)
    out = conv(x @ node.D_from_matrix(R).T, yr, w, s, r)
    ref = conv(x, y, w, s, r) @ mid.D_from_matrix(R).T
    assert rel(out, ref) < 1e-12


def test_empty_graph_and_isolated_nodes():
    node, sh, mid, ins = mace_conv_args("medium1", mul=4)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins)
    x = torch.randn(3, node.dim, dtype=torch.float64, requires_grad=True)
    y = torch.randn(0, sh.dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(0, conv.weight_numel, dtype=torch.float64, requires_grad=True)
    e = torch.zeros(0, dtype=torch.long)
    out = conv(x, y, w, e, e)
    assert out.shape == (3, mid.dim) and torch.all(out == 0)
    (gx,) = torch.autograd.grad(out.sum(), (x,))
    assert torch.all(gx == 0)


def test_normalisation_matches_e3nn_instruction_weights():
    node, sh, mid, ins = mace_conv_args("large1", mul=3)
    for inorm in ("component", "norm", "none"):
        for pnorm in ("element", "path", "none"):
            prob = TPProblem.from_e3nn_args(node, sh, mid, ins, inorm, pnorm)
            tp = e3nn_tp(node, sh, mid, ins, irrep_normalization=inorm, path_normalization=pnorm)
            for a, b in zip(prob.instructions, tp.instructions):
                assert math.isclose(a.norm, b.path_weight, rel_tol=1e-15)


def test_backward_skips_only_gradients_the_engine_will_not_use(monkeypatch):
    """ops.engine_needs: under torch.autograd.grad a leaf input cannot be asked about (torch raises, ~30 us of
    host time), so leaves count as needed without asking; a non-leaf input whose branch the engine will not run
    gets no gradient computed. Checked through the reference backend's backward calls."""
    from mace_accel.backends import reference

    node, sh, mid, ins = mace_conv_args("layer0", mul=4)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins).double()
    n = 5
    s, r = random_graph(n, 12, generator=torch.Generator().manual_seed(3))
    x = torch.randn(n, node.dim, dtype=torch.float64, requires_grad=True)
    y = torch.randn(12, sh.dim, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(12, conv.weight_numel, dtype=torch.float64, requires_grad=True)
    asked, needs = [], []
    real = torch._C._will_engine_execute_node
    monkeypatch.setattr(torch._C, "_will_engine_execute_node", lambda node: asked.append(node) or real(node))
    real_bwd = reference.backward
    monkeypatch.setattr(reference, "backward", lambda *a, **k: needs.append(a[7:10]) or real_bwd(*a, **k))
    w = w0 * 2.0  # non-leaf: the engine is asked whether its branch runs
    gx, = torch.autograd.grad(conv(x, y, w, s, r, n).square().sum(), (x,))
    assert len(asked) == 1  # only w's node; x and y are leaves
    assert needs == [(True, True, False)]  # w's gradient is not computed: grad() only asked for x
    gx_all, _ = torch.autograd.grad(conv(x, y, w, s, r, n).square().sum(), (x, w))
    assert needs[-1] == (True, True, True)
    assert torch.equal(gx, gx_all)
