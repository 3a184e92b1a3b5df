"""CPU: bad inputs get a clear error before anything runs; unsupported problems say what is unsupported."""
import pytest
import torch

import mace_accel
from mace_accel.problem import TPProblem
from tp_cases import mace_conv_args


@pytest.fixture(scope="module")
def conv():
    node, sh, mid, ins = mace_conv_args("medium1", mul=4)
    return mace_accel.TensorProductConv(node, sh, mid, ins)


def _ok(conv, n=5, e=7, dtype=torch.float64):
    x = torch.randn(n, conv.plan.in1_dim, dtype=dtype)
    y = torch.randn(e, conv.plan.in2_dim, dtype=dtype)
    w = torch.randn(e, conv.weight_numel, dtype=dtype)
    s = torch.randint(0, n, (e,))
    r = torch.randint(0, n, (e,))
    return x, y, w, s, r


def test_valid_call_works(conv):
    assert conv(*_ok(conv)).shape == (5, conv.plan.out_dim)


@pytest.mark.parametrize("case, match", [
    ("x_shape", "x has shape"), ("y_shape", "y has shape"), ("w_shape", "w has shape"),
    ("dtype_mix", "dtype"), ("int_x", "dtype"), ("half", "dtype"), ("sender_oob", "outside"),
    ("receiver_neg", "outside"), ("sender_float", "int64"), ("sender_len", "shape"), ("x_1d", "x has shape"),
    ("num_nodes_small", "outside"),
])
def test_bad_inputs_raise_value_error(conv, case, match):
    x, y, w, s, r = _ok(conv)
    kw = {}
    if case == "x_shape":
        x = torch.randn(5, conv.plan.in1_dim + 1, dtype=torch.float64)
    elif case == "y_shape":
        y = y[:, :-1]
    elif case == "w_shape":
        w = w[:, :-1]
    elif case == "dtype_mix":
        y = y.float()
    elif case == "int_x":
        x = x.long()
    elif case == "half":
        x, y, w = x.half(), y.half(), w.half()
    elif case == "sender_oob":
        s = s.clone()
        s[3] = 5
    elif case == "receiver_neg":
        r = r.clone()
        r[0] = -1
    elif case == "sender_float":
        s = s.double()
    elif case == "sender_len":
        s = s[:-1]
    elif case == "x_1d":
        x = x.flatten()
    elif case == "num_nodes_small":
        r = torch.full_like(r, 4)
        kw["num_nodes"] = 3
    with pytest.raises(ValueError, match=match):
        conv(x, y, w, s, r, **kw)


def test_plain_tp_row_mismatch():
    node, sh, mid, ins = mace_conv_args("medium1", mul=4)
    tp = mace_accel.TensorProduct(node, sh, mid, ins)
    with pytest.raises(ValueError, match="rows"):
        tp(torch.randn(3, node.dim), torch.randn(4, sh.dim), torch.randn(4, tp.weight_numel))


@pytest.mark.parametrize("args, match", [
    (("4x0e", "1x0e", "4x0e", [(0, 0, 0, "uvw", True)]), "connection mode"),
    (("4x0e", "2x0e", "4x0e", [(0, 0, 0, "uvu", True)]), "multiplicity"),
    (("4x7e", "1x0e", "4x7e", [(0, 0, 0, "uvu", True)]), "l=7"),
    (("4x0e", "1x0e", "4x0e", [(0, 0, 0, "uvu", False)]), "without weights"),
    (("4x0e", "1x0e", "4x0e", []), "no instructions"),
])
def test_unsupported_problems_raise_not_implemented(args, match):
    with pytest.raises(NotImplementedError, match=match):
        TPProblem.from_e3nn_args(*args)


def test_unknown_normalisation_and_bad_selection_rule():
    with pytest.raises(NotImplementedError, match="irrep_normalization"):
        TPProblem.from_e3nn_args("4x0e", "1x0e", "4x0e", [(0, 0, 0, "uvu", True)], irrep_normalization="foo")
    with pytest.raises(ValueError, match="selection rule"):
        TPProblem.from_e3nn_args("4x0e", "1x1o", "4x0e", [(0, 0, 0, "uvu", True)])


def test_cuda_tensors_without_gpu_are_rejected_clearly(conv):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises((RuntimeError, AssertionError), match="CUDA|cuda|Torch not compiled"):
        torch.randn(2, device="cuda")


def test_torch_library_opcheck_and_compile():
    node, sh, mid, ins = mace_conv_args("medium1", mul=2, lmax_sh=1)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, check_inputs=False)
    x = torch.randn(4, node.dim, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, sh.dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, conv.weight_numel, dtype=torch.float64, requires_grad=True)
    s, r = torch.randint(0, 4, (6,)), torch.randint(0, 4, (6,))
    from mace_accel.ops import tp_bwd, tp_fwd

    torch.library.opcheck(tp_fwd, (x, y, w, s, r, 4, conv.plan.key, False))
    g = torch.randn(4, conv.plan.out_dim, dtype=torch.float64)
    torch.library.opcheck(tp_bwd, (x, y, w, g, s, r, conv.plan.key, False, True, True, True))
    f = torch.compile(lambda a, b, c: conv(a, b, c, s, r).square().sum(), backend="aot_eager", fullgraph=True)
    val = f(x, y, w)
    assert torch.allclose(val, conv(x, y, w, s, r).square().sum())


def test_eager_autograd_path_matches_the_custom_ops():
    """Outside torch.compile the modules call autograd.Functions (less host time) with the same derivative
    formulas as the custom ops' registered autograd: values, gradients and second derivatives agree."""
    from mace_accel.ops import tp_fwd, tp_forward

    node, sh, mid, ins = mace_conv_args("medium1", mul=3, lmax_sh=2)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, check_inputs=False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, node.dim, dtype=torch.float64, generator=g)
    y = torch.randn(9, sh.dim, dtype=torch.float64, generator=g)
    w = torch.randn(9, conv.weight_numel, dtype=torch.float64, generator=g)
    s, r = torch.randint(0, 5, (9,), generator=g), torch.randint(0, 5, (9,), generator=g)
    go = torch.randn(5, conv.plan.out_dim, dtype=torch.float64, generator=g)
    vs = [torch.randn(t.shape, dtype=torch.float64, generator=g) for t in (x, y, w)]

    def orders(fn):
        a = [t.clone().requires_grad_(True) for t in (x, y, w)]
        out = fn(*a, s, r, 5, conv.plan.key, False)
        g1 = torch.autograd.grad(out, a, go, create_graph=True)
        g2 = torch.autograd.grad(sum((u * v).sum() for u, v in zip(g1, vs)), a)
        return [out, *g1, *g2]

    for a, b in zip(orders(tp_forward), orders(tp_fwd)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_index_check_is_redone_after_in_place_change(conv):
    x, y, w, s, r = _ok(conv)
    conv(x, y, w, s, r)  # valid: checked once and remembered
    conv(x, y, w, s, r)
    s[0] = 99  # in place: bumps the version counter, so the memo no longer applies
    with pytest.raises(ValueError, match="outside"):
        conv(x, y, w, s, r)
