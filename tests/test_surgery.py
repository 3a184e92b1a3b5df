"""Model surgery: accelerate / to_e3nn / check_parity on random-weight mace-torch models.

CPU tests use float64 and small (8-16 channel) models with MACE-MP-0's architecture; GPU tests
(``-m gpu``) repeat the parity checks on CUDA in float32 and float64, plus Hessians and a training step.
"""
from __future__ import annotations

import copy
import functools
import io
import pickletools
import sys
import zipfile

import numpy as np
import pytest
import torch

import mace_accel  # noqa: F401  (sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD before e3nn loads)
from e3nn import o3
from mace.modules import blocks as mb
from mace.tools.scatter import scatter_sum

from mace_accel.surgery import (
    MARKER,
    BackendConversionError,
    ParityError,
    SurgeryError,
    UnsupportedModuleError,
    accelerate,
    check_parity,
    is_accelerated,
    probe_atoms,
    to_e3nn,
)
from mace_accel.surgery.blocks import ACCELERATED, AcceleratedBlockMixin
from mace_accel.surgery.conv import FusedConvTP
from mace_accel.surgery.parity import atoms_to_batch, evaluate
from mace_accel.surgery.random_models import build_random_mace
from mace_accel.surgery.skip import ElementSkipTP

F64 = torch.float64
REL64 = 1e-10

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@functools.lru_cache(maxsize=None)
def _model(arch="mp-medium", channels=8, interaction="RealAgnosticResidualInteractionBlock", first=None):
    return build_random_mace(arch, channels=channels, interaction=interaction, interaction_first=first)


def model(*args, **kwargs):
    """A fresh copy of a cached random model (tests may not see each other's changes)."""
    return copy.deepcopy(_model(*args, **kwargs))


def rel_dev(a, b):
    scale = float(a.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)


def assert_same_outputs(ref, new, tol=REL64, keys=("energy", "interaction_energy", "forces", "stress")):
    for k in keys:
        if ref.get(k) is None:
            continue
        assert rel_dev(ref[k], new[k]) <= tol, (k, rel_dev(ref[k], new[k]))


def class_names(m):
    # by name: deep copies of torch.fx GraphModules get fresh per-instance classes
    return {n: f"{type(x).__module__}.{type(x).__qualname__}" for n, x in m.named_modules()}


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- parity on the MACE-MP-0 architectures and the other interaction blocks ---------------------------
@pytest.mark.parametrize("arch", ["mp-small", "mp-medium", "mp-large"])
def test_mp0_architectures_match_e3nn(arch):
    m = model(arch, channels=16)
    acc, rep = accelerate(m, report=True)
    res = check_parity(m, acc, F64)
    assert res.passed and max(res.rel.values()) <= REL64, str(res)
    assert set(res.rel) == {"energy", "forces", "stress"}
    atoms = probe_atoms(m)
    # the interaction energy alone (the total is dominated by the atomic reference energies)
    assert_same_outputs(evaluate(m, atoms, F64), evaluate(acc, atoms, F64))
    assert [type(b) for b in acc.interactions] == [ACCELERATED[type(b)] for b in m.interactions]
    assert all(isinstance(b.conv_tp, FusedConvTP) and isinstance(b.skip_tp, ElementSkipTP) for b in acc.interactions)
    assert {e.path for e in rep.replaced} >= {"interactions.0.conv_tp", "interactions.1.conv_tp",
                                             "interactions.0.skip_tp", "interactions.1.skip_tp"}


@pytest.mark.parametrize("interaction,first", [
    ("RealAgnosticInteractionBlock", None),
    ("RealAgnosticResidualInteractionBlock", "RealAgnosticInteractionBlock"),
    ("RealAgnosticDensityInteractionBlock", None),
    ("RealAgnosticDensityResidualInteractionBlock", None),
    ("RealAgnosticAttResidualInteractionBlock", None),
    ("RealAgnosticResidualNonLinearInteractionBlock", None),
])
def test_interaction_block_variants_match_e3nn(interaction, first):
    m = model("mp-medium", 8, interaction, first)
    acc = accelerate(m)
    assert all(isinstance(b, AcceleratedBlockMixin) for b in acc.interactions)
    res = check_parity(m, acc, F64)
    assert res.passed, str(res)
    atoms = probe_atoms(m, n_atoms=5, seed=3)
    assert_same_outputs(evaluate(m, atoms, F64), evaluate(acc, atoms, F64))


def test_every_mace_interaction_class_is_covered():
    from mace import modules

    assert set(modules.interaction_classes.values()) <= set(ACCELERATED)


# ---- the input is untouched, weights are preserved, the marker, the round trip --------------------------
def test_input_unchanged_and_weights_identical():
    m = model("mp-large", 8)
    before = copy.deepcopy(m.state_dict())
    classes = {n: type(x) for n, x in m.named_modules()}
    acc = accelerate(m)
    assert m.state_dict().keys() == before.keys() and all(torch.equal(m.state_dict()[k], before[k]) for k in before)
    assert {n: type(x) for n, x in m.named_modules()} == classes
    assert not hasattr(m, MARKER) and not is_accelerated(m)
    assert getattr(acc, MARKER) == mace_accel.__version__ and is_accelerated(acc)
    p_orig, p_acc = dict(m.named_parameters()), dict(acc.named_parameters())
    assert list(p_orig) == list(p_acc)
    for k in p_orig:
        assert p_acc[k].dtype == p_orig[k].dtype and torch.equal(p_acc[k], p_orig[k]), k
        assert p_acc[k].data_ptr() != p_orig[k].data_ptr()  # a copy, not shared storage
    # every non-e3nn-constant buffer is kept too
    b_acc = dict(acc.named_buffers())
    for k, v in m.named_buffers():
        if "conv_tp" in k or "skip_tp" in k:
            continue  # e3nn's constants (output masks, Wigner blocks) of the replaced modules
        assert torch.equal(b_acc[k], v), k


def test_to_e3nn_round_trip_is_exact():
    m = model("mp-large", 8)
    acc = accelerate(m)
    back = to_e3nn(acc)
    assert class_names(back) == class_names(m)
    assert state_equal(back, m)
    assert not hasattr(back, MARKER) and not is_accelerated(back)
    assert is_accelerated(acc)  # to_e3nn copies
    atoms = probe_atoms(m)
    r0, r1 = evaluate(m, atoms, F64), evaluate(back, atoms, F64)
    for k in ("energy", "forces", "stress"):
        assert torch.equal(r0[k], r1[k]), k
    # training changes made on the accelerated model carry over
    with torch.no_grad():
        acc.interactions[0].skip_tp.weight.mul_(1.5)
        acc.interactions[1].conv_tp_weights.layer0.weight.add_(0.01)
    back2 = to_e3nn(acc)
    assert torch.equal(back2.interactions[0].skip_tp.weight, acc.interactions[0].skip_tp.weight)
    assert_same_outputs(evaluate(acc, atoms, F64), evaluate(back2, atoms, F64))


def test_dtype_and_accelerate_twice():
    m = model("mp-medium", 8)
    acc32 = accelerate(m, dtype="float32")
    assert all(p.dtype == torch.float32 for p in acc32.parameters())
    assert all(p.dtype == F64 for p in m.parameters())
    res = check_parity(m, acc32, torch.float32)
    assert res.passed and res.rel["energy"] <= 1e-5 and res.rel["forces"] <= 1e-4, str(res)
    again = accelerate(acc32, dtype=torch.float64)  # already accelerated: recast, still exact
    assert all(p.dtype == F64 for p in again.parameters())
    assert check_parity(copy.deepcopy(m).float().double(), again, F64).passed  # float32-rounded weights
    assert torch.equal(to_e3nn(again).interactions[1].skip_tp.weight, m.interactions[1].skip_tp.weight.float().double())


def test_report_lists_replaced_and_kept_modules():
    m = model("mp-medium", 8)
    _, rep = accelerate(m, report=True)
    kept = {e.path: e for e in rep.kept}
    replaced = {e.path: e for e in rep.replaced}
    assert "interactions.0.linear_up" in replaced and "o3.Linear" in replaced["interactions.0.linear_up"].detail
    assert "products.0.linear" in replaced and "interactions.1.conv_tp_weights" in replaced
    assert "products.0.symmetric_contractions" not in kept
    assert "products.0.symmetric_contractions" in replaced
    _, rep = accelerate(m, report=True, symmetric_contraction=False, linear=False, radial=False)
    kept = {e.path: e for e in rep.kept}
    assert "radial=False" in kept["interactions.1.conv_tp_weights"].detail
    assert "products.0.symmetric_contractions" in kept and "products.0.linear" in kept
    assert "linear=False" in kept["interactions.0.linear_up"].detail
    text = str(rep)
    assert "o3.Linear" in text and "interactions.1.conv_tp" in text and "TensorProductConv" in text
    assert rep.dtype == "float64" and rep.device == "cpu"
    assert rep.as_dict()["entries"]


# ---- strictness ----------------------------------------------------------------------------------------
class UnknownBlock(mb.RealAgnosticResidualInteractionBlock):
    """A block class mace_accel does not know (its forward could differ from mace's)."""


def _with_unknown_block(m):
    m.interactions[1].__class__ = UnknownBlock
    return m


def test_strict_unsupported_block_names_module_path():
    m = _with_unknown_block(model("mp-medium", 8))
    with pytest.raises(UnsupportedModuleError) as ei:
        accelerate(m)
    assert ei.value.path == "interactions.1"
    assert "interactions.1" in str(ei.value) and "UnknownBlock" in str(ei.value)
    assert type(m.interactions[0]) is mb.RealAgnosticResidualInteractionBlock  # input untouched


def test_non_strict_leaves_unsupported_block_and_reports_it():
    m = _with_unknown_block(model("mp-medium", 8))
    acc, rep = accelerate(m, strict=False, report=True)
    assert type(acc.interactions[1]) is UnknownBlock
    assert not isinstance(acc.interactions[1].conv_tp, FusedConvTP)
    assert isinstance(acc.interactions[0], AcceleratedBlockMixin)
    entry = [e for e in rep.kept if e.path == "interactions.1"]
    assert entry and "unsupported" in entry[0].detail and "UnknownBlock" in entry[0].detail
    assert check_parity(m, acc, F64).passed


def test_unsupported_conv_normalisation_is_refused_with_sub_path():
    m = model("mp-small", 8)
    tp = m.interactions[0].conv_tp
    tp.instructions = [tp.instructions[0]._replace(path_weight=tp.instructions[0].path_weight * 2)] + \
        list(tp.instructions[1:])
    with pytest.raises(UnsupportedModuleError) as ei:
        accelerate(m)
    assert ei.value.path == "interactions.0.conv_tp" and "normalisation" in ei.value.reason
    acc, rep = accelerate(m, strict=False, report=True)
    assert not isinstance(acc.interactions[0], AcceleratedBlockMixin)
    assert isinstance(acc.interactions[1], AcceleratedBlockMixin)
    assert any(e.path == "interactions.0" and "unsupported" in e.detail for e in rep.kept)


def test_unsupported_skip_tp_strict_and_non_strict():
    m = model("mp-small", 8)
    fctp = m.interactions[1].skip_tp
    fctp.instructions = [i._replace(path_weight=i.path_weight * 3) for i in fctp.instructions]  # metadata only
    with pytest.raises(UnsupportedModuleError) as ei:
        accelerate(m)
    assert ei.value.path == "interactions.1.skip_tp"
    acc, rep = accelerate(m, strict=False, report=True)
    block = acc.interactions[1]
    assert isinstance(block, AcceleratedBlockMixin) and isinstance(block.conv_tp, FusedConvTP)
    assert type(block.skip_tp) is type(fctp)
    assert any(e.path == "interactions.1.skip_tp" and e.action == "kept" for e in rep.entries)
    assert check_parity(m, acc, F64).passed
    assert class_names(to_e3nn(acc)) == class_names(m)


def test_not_a_mace_model():
    with pytest.raises(SurgeryError):
        accelerate("model.model")
    with pytest.raises(SurgeryError, match="no MACE interaction blocks"):
        accelerate(torch.nn.Linear(3, 3))


# ---- the two replaced modules against e3nn directly ---------------------------------------------------
def _one_hot(n, e, gen):
    idx = torch.randint(0, e - 1, (n,), generator=gen)  # the last element absent on purpose
    return torch.nn.functional.one_hot(idx, e).to(F64)


@pytest.mark.parametrize("specialized", [True, False])
def test_element_skip_matches_e3nn_fctp(specialized):
    gen = torch.Generator().manual_seed(0)
    # repeated input irreps (two paths into 7x1o), an output block with no path (3x3o), absent element
    from mace.tools.torch_tools import default_dtype

    with default_dtype(F64):  # e3nn's generic code uses Wigner blocks stored in the default dtype
        fctp = o3.FullyConnectedTensorProduct("8x0e+4x1o+8x1o+3x2e", "5x0e", "6x0e+7x1o+2x2e+3x3o",
                                              _specialized_code=specialized)
    x = torch.randn(13, fctp.irreps_in1.dim, dtype=F64, generator=gen, requires_grad=True)
    attrs = _one_hot(13, 5, gen)
    ref = fctp(x, attrs)
    g = torch.randn(ref.shape, dtype=F64, generator=gen)
    (dx_ref, dw_ref) = torch.autograd.grad((ref * g).sum(), (x, fctp.weight), create_graph=True)
    ddx_ref = torch.autograd.grad((dx_ref ** 2).sum(), fctp.weight)[0]
    for strategy in ("gather", "segment", "dense", "auto"):
        skip = ElementSkipTP(fctp, strategy=strategy)
        assert skip.weight is fctp.weight and hasattr(fctp, "weight")  # shares, does not take, the parameter
        out = skip(x, attrs)
        assert rel_dev(ref, out) <= 1e-13, strategy
        dx, dw = torch.autograd.grad((out * g).sum(), (x, skip.weight), create_graph=True)
        assert rel_dev(dx_ref, dx) <= 1e-13 and rel_dev(dw_ref, dw) <= 1e-13, strategy
        ddx = torch.autograd.grad((dx ** 2).sum(), skip.weight)[0]
        assert rel_dev(ddx_ref, ddx) <= 1e-12, strategy
    # general (non one-hot) attributes: the dense strategy is exact, the others refuse
    soft = torch.rand(13, 5, dtype=F64, generator=gen)
    assert rel_dev(fctp(x, soft), ElementSkipTP(fctp, strategy="dense")(x, soft)) <= 1e-13
    with pytest.raises(ValueError, match="one-hot"):
        ElementSkipTP(fctp, strategy="gather")(x, soft)
    back = ElementSkipTP(fctp).to_e3nn()
    assert torch.equal(back(x, attrs), ref)


def test_element_skip_refuses_non_scalar_second_operand():
    fctp = o3.FullyConnectedTensorProduct("4x0e+4x1o", "1x0e+1x1o", "4x0e+4x1o")
    with pytest.raises(UnsupportedModuleError, match="element scalars"):
        ElementSkipTP(fctp)


def test_fused_conv_matches_e3nn_tp_and_scatter():
    m = model("mp-large", 8)
    tp = m.interactions[1].conv_tp
    gen = torch.Generator().manual_seed(1)
    n_nodes, n_edges = 6, 40
    x = torch.randn(n_nodes, tp.irreps_in1.dim, dtype=F64, generator=gen, requires_grad=True)
    y = torch.randn(n_edges, tp.irreps_in2.dim, dtype=F64, generator=gen, requires_grad=True)
    w = torch.randn(n_edges, tp.weight_numel, dtype=F64, generator=gen, requires_grad=True)
    edge_index = torch.randint(0, n_nodes, (2, n_edges), generator=gen)
    ref = scatter_sum(tp(x[edge_index[0]], y, w), edge_index[1], dim=0, dim_size=n_nodes)
    fused = FusedConvTP(tp)
    out = fused(x, y, w, edge_index)
    assert rel_dev(ref, out) <= 1e-13
    g = torch.randn(ref.shape, dtype=F64, generator=gen)
    grads_ref = torch.autograd.grad((ref * g).sum(), (x, y, w), create_graph=True)
    grads = torch.autograd.grad((out * g).sum(), (x, y, w), create_graph=True)
    for a, b in zip(grads_ref, grads):
        assert rel_dev(a, b) <= 1e-13
    gg_ref = torch.autograd.grad(sum((t ** 2).sum() for t in grads_ref), (x, y, w))
    gg = torch.autograd.grad(sum((t ** 2).sum() for t in grads), (x, y, w))
    for a, b in zip(gg_ref, gg):
        assert rel_dev(a, b) <= 1e-12


# ---- physics: equivariance, training gradients, Hessian ---------------------------------------------
def test_rotation_equivariance_of_accelerated_model():
    from scipy.spatial.transform import Rotation

    acc = accelerate(model("mp-large", 8))
    atoms = probe_atoms(acc, seed=5)
    R = Rotation.random(random_state=7).as_matrix()
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell[:] @ R.T, scale_atoms=True)
    r0, r1 = evaluate(acc, atoms, F64), evaluate(acc, rotated, F64)
    Rt = torch.tensor(R)
    assert abs(float(r0["energy"] - r1["energy"])) <= 1e-10 * abs(float(r0["energy"]))
    assert rel_dev(r0["forces"] @ Rt.T, r1["forces"]) <= 1e-10
    assert rel_dev(Rt @ r0["stress"][0] @ Rt.T, r1["stress"][0]) <= 1e-10


def _force_loss_grads(m, atoms, device="cpu", dtype=F64):
    m = copy.deepcopy(m).to(device=device, dtype=dtype).train()
    batch = atoms_to_batch(m, atoms, dtype, device)
    out = m(batch, training=True, compute_force=True, compute_stress=True)
    loss = (out["forces"] ** 2).mean() + 0.1 * out["energy"].pow(2).sum() + out["stress"].pow(2).sum()
    loss.backward()
    return {n: p.grad.detach().to("cpu", F64) for n, p in m.named_parameters() if p.grad is not None}


def test_training_step_gradients_match_e3nn():
    m = model("mp-medium", 8)
    acc = accelerate(m)
    atoms = probe_atoms(m, n_atoms=6)
    g_ref, g_acc = _force_loss_grads(m, atoms), _force_loss_grads(acc, atoms)
    assert g_ref.keys() == g_acc.keys() and len(g_ref) > 10
    assert "interactions.0.skip_tp.weight" in g_acc and "interactions.1.conv_tp_weights.layer3.weight" in g_acc
    for k in g_ref:
        assert rel_dev(g_ref[k], g_acc[k]) <= REL64, k


def test_hessian_matches_e3nn():
    m = model("mp-small", 8)
    acc = accelerate(m)
    atoms = probe_atoms(m, n_atoms=3, seed=2)
    h_ref = evaluate(m, atoms, F64, compute_hessian=True)["hessian"]
    h_acc = evaluate(acc, atoms, F64, compute_hessian=True)["hessian"]
    assert h_ref is not None and rel_dev(h_ref, h_acc) <= REL64


# ---- parity check itself ---------------------------------------------------------------------------
def test_parity_check_detects_deviation():
    m = model("mp-small", 8)
    acc = accelerate(m)
    with torch.no_grad():
        acc.interactions[1].skip_tp.weight.add_(1e-6)
    with pytest.raises(ParityError) as ei:
        check_parity(m, acc, F64)
    assert not ei.value.result.passed and "deviates" in str(ei.value)
    res = check_parity(m, acc, F64, raise_on_failure=False)
    assert not res.passed and res.rel["forces"] > REL64


def test_probe_structure_uses_model_elements():
    m = build_random_mace("mp-small", channels=4, atomic_numbers=list(range(1, 21)), correlation=2, max_ell=2)
    atoms = probe_atoms(m)
    zs = set(atoms.numbers.tolist())
    assert len(atoms) == 8 and {1, 20} <= zs and zs <= set(range(1, 21)) and all(atoms.pbc)
    acc = accelerate(m)
    assert check_parity(m, acc, F64, atoms).passed


# ---- serialisation ---------------------------------------------------------------------------------
def _pickle_globals(path):
    """Every string in the model pickle (module/class names of GLOBAL opcodes among them)."""
    with zipfile.ZipFile(path) as z:
        data = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    return {arg for _, arg, _ in pickletools.genops(io.BytesIO(data)) if isinstance(arg, str)}


def test_accelerated_model_pickles_without_compiled_code(tmp_path):
    acc = accelerate(model("mp-medium", 8))
    path = tmp_path / "acc.model"
    torch.save(acc, path)
    mods = _pickle_globals(path)
    assert not any(s.startswith("cupy") or "backends.cuda" in s for s in mods), sorted(mods)
    locations = []
    loaded = torch.load(path, weights_only=False, map_location=lambda s, loc: locations.append(loc) or s)
    assert set(locations) == {"cpu"}
    assert is_accelerated(loaded) and isinstance(loaded.interactions[0].conv_tp, FusedConvTP)
    atoms = probe_atoms(acc)
    r0, r1 = evaluate(acc, atoms, F64), evaluate(loaded, atoms, F64)
    assert torch.equal(r0["forces"], r1["forces"])
    assert state_equal(to_e3nn(loaded), to_e3nn(acc))


def test_accelerated_block_can_be_built_like_the_mace_block():
    cls = ACCELERATED[mb.RealAgnosticResidualInteractionBlock]
    block = cls(node_attrs_irreps=o3.Irreps("3x0e"), node_feats_irreps=o3.Irreps("4x0e+4x1o"),
                edge_attrs_irreps=o3.Irreps("1x0e+1x1o"), edge_feats_irreps=o3.Irreps("8x0e"),
                target_irreps=o3.Irreps("4x0e+4x1o"), hidden_irreps=o3.Irreps("4x0e+4x1o"), avg_num_neighbors=5.0,
                radial_MLP=[8])
    assert isinstance(block.conv_tp, FusedConvTP) and isinstance(block.skip_tp, ElementSkipTP)


# ---- cuEquivariance / OpenEquivariance models ----------------------------------------------------------
def _fake_cueq_model():
    m = model("mp-small", 8)
    fake_cls = type("Linear", (o3.Linear,), {"__module__": "cuequivariance_torch.operations.linear"})
    original_cls = type(m.products[0].linear)
    m.products[0].linear.__class__ = fake_cls
    return m, original_cls


def test_cueq_model_is_converted_back_with_mace_tooling(monkeypatch):
    import mace.cli.convert_cueq_e3nn as tool

    m, original_cls = _fake_cueq_model()
    calls = []

    def fake_run(model, device="cpu", return_model=True, **kw):  # what mace's converter returns: plain e3nn
        calls.append(device)
        out = copy.deepcopy(model)
        out.products[0].linear.__class__ = original_cls
        return out

    monkeypatch.setattr(tool, "run", fake_run)
    acc, rep = accelerate(m, report=True)
    assert calls == ["cpu"] and rep.converted_from == "cuequivariance"
    assert isinstance(acc.interactions[0], AcceleratedBlockMixin)
    assert type(m.products[0].linear).__module__.startswith("cuequivariance")  # input untouched


def test_cueq_conversion_failure_is_clear(monkeypatch):
    import mace.cli.convert_cueq_e3nn as tool

    m, _ = _fake_cueq_model()

    def failing_run(*a, **k):
        raise ImportError("No module named 'cuequivariance'")

    monkeypatch.setattr(tool, "run", failing_run)
    with pytest.raises(BackendConversionError) as ei:
        accelerate(m)
    msg = str(ei.value)
    assert "cuequivariance" in msg and "convert_cueq_e3nn" in msg and "products.0.linear" in msg
    if sys.modules.get("cuequivariance") is None:
        assert "not installed" in msg


# ---- GPU (run with -m gpu on a machine with CUDA) ----------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", ["mp-small", "mp-medium", "mp-large"])
def test_gpu_parity(arch, dtype):
    m = model(arch, channels=16)
    acc = accelerate(m, dtype=dtype, device="cuda")
    assert all(p.is_cuda for p in acc.parameters())
    res = check_parity(m, acc, dtype)
    assert res.passed and res.device.startswith("cuda"), str(res)
    # and against the float64 CPU e3nn reference
    atoms = probe_atoms(m)
    ref = evaluate(m, atoms, F64)
    new = evaluate(acc, atoms, dtype)
    tol = {torch.float64: REL64, torch.float32: 1e-4}[dtype]
    assert_same_outputs(ref, new, tol=tol, keys=("energy", "forces", "stress"))


@pytest.mark.gpu
@needs_cuda
def test_gpu_hessian_matches_e3nn():
    m = model("mp-medium", 8)
    acc = accelerate(m, device="cuda")
    atoms = probe_atoms(m, n_atoms=4, seed=2)
    h_ref = evaluate(copy.deepcopy(m).cuda(), atoms, F64, compute_hessian=True)["hessian"]
    h_acc = evaluate(acc, atoms, F64, compute_hessian=True)["hessian"]
    assert rel_dev(h_ref, h_acc) <= REL64


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float64, REL64), (torch.float32, 1e-3)])
def test_gpu_training_step_gradients_match_e3nn(dtype, tol):
    m = model("mp-large", 16)
    acc = accelerate(m, device="cuda")
    atoms = probe_atoms(m)
    g_ref = _force_loss_grads(m, atoms, "cuda", dtype)
    g_acc = _force_loss_grads(acc, atoms, "cuda", dtype)
    assert g_ref.keys() == g_acc.keys()
    for k in g_ref:
        assert rel_dev(g_ref[k], g_acc[k]) <= tol, k


@pytest.mark.gpu
@needs_cuda
def test_gpu_saved_model_holds_no_cuda_code_or_tensors(tmp_path):
    from mace_accel.surgery import convert_file

    m = model("mp-medium", 8)
    src = tmp_path / "in.model"
    torch.save(m, src)
    convert_file(src, tmp_path / "out.model", device="cuda", dtype="float32")
    mods = _pickle_globals(tmp_path / "out.model")
    assert not any(s.startswith("cupy") or "backends.cuda" in s for s in mods)
    locations = []
    torch.load(tmp_path / "out.model", weights_only=False, map_location=lambda s, loc: locations.append(loc) or s)
    assert set(locations) == {"cpu"}


# ---- o3.Linear ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("irreps_in,irreps_out", [
    ("128x0e+128x1o+128x2e+128x3o+128x1o+128x2e", "128x0e+128x1o+128x2e+128x3o"),  # mace's linear after the conv
    ("16x0e+8x1o+0x2e+3x1o", "5x0e+4x1o+2x2e+0x3o+6x1e"),  # mul 0 in and out, outputs no input feeds
    ("10x0e", "7x0e"),
])
def test_split_linear_matches_e3nn(irreps_in, irreps_out):
    """SplitLinear (the class swap) gives e3nn's o3.Linear's values and gradients to every order, float64."""
    from e3nn import o3

    from mace_accel.surgery.linear import SplitLinear, accelerate_linear, restore_linear

    torch.manual_seed(3)
    ref = o3.Linear(irreps_in, irreps_out).double()
    ours = copy.deepcopy(ref)
    accelerate_linear(ours)
    assert type(ours) is SplitLinear and ours.weight is not ref.weight and torch.equal(ours.weight, ref.weight)
    x = torch.randn(3, 5, ref.irreps_in.dim, dtype=F64, requires_grad=True)  # leading dimensions kept
    a, b = ours(x), ref(x)
    assert a.shape == b.shape == (3, 5, ref.irreps_out.dim)
    assert float((a - b).abs().max()) <= 1e-12 * max(1.0, float(b.detach().abs().max()))
    g = torch.randn_like(b)
    for w in (False, True):
        ours.weight.requires_grad_(w)
        ref.weight.requires_grad_(w)
        args = (x, ours.weight) if w else (x,)
        ga = torch.autograd.grad(ours(x), args, g, create_graph=True)
        gb = torch.autograd.grad(ref(x), (x, ref.weight) if w else (x,), g, create_graph=True)
        for u, v in zip(ga, gb):
            assert torch.allclose(u, v, rtol=1e-12, atol=1e-12)
        if w:  # the map is linear in x: second order through the weights (what force training differentiates)
            gga = torch.autograd.grad((ga[0] * ga[0]).sum(), ours.weight)[0]
            ggb = torch.autograd.grad((gb[0] * gb[0]).sum(), ref.weight)[0]
            assert torch.allclose(gga, ggb, rtol=1e-12, atol=1e-12)
    xs = torch.randn(4, ref.irreps_in.dim, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(ours, (xs,), fast_mode=True)
    restore_linear(ours)
    assert type(ours) is o3.Linear


def test_split_linear_leaves_biases_and_external_weights():
    from e3nn import o3

    from mace_accel.surgery.errors import UnsupportedModuleError
    from mace_accel.surgery.linear import accelerate_linear

    with pytest.raises(UnsupportedModuleError, match="biases"):
        accelerate_linear(o3.Linear("4x0e+2x1o", "3x0e", biases=True))
    with pytest.raises(UnsupportedModuleError, match="external weights"):
        accelerate_linear(o3.Linear("4x0e", "3x0e", internal_weights=False, shared_weights=False))


@pytest.mark.parametrize("kw", [dict(hs=[8, 64, 64, 64, 1280], act=torch.nn.functional.silu),  # mace's radial MLP
                                dict(hs=[5, 7, 3], act=torch.tanh, out_act=True, variance_in=2.0, variance_out=3.0),
                                dict(hs=[4, 6], act=None)])
def test_folded_radial_mlp_matches_e3nn(kw):
    """FoldedFullyConnectedNet gives e3nn's FullyConnectedNet's values and gradients (input and weights, second
    order too) in float64, with the same parameter names and objects."""
    from e3nn import nn as e3nn_nn

    from mace_accel.surgery.radial import FoldedFullyConnectedNet, accelerate_radial, restore_radial

    torch.manual_seed(4)
    kw = dict(kw)
    hs = kw.pop("hs")
    ref = e3nn_nn.FullyConnectedNet(hs, **kw).double()
    ours = copy.deepcopy(ref)
    accelerate_radial(ours)
    assert type(ours) is FoldedFullyConnectedNet
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randn(11, hs[0], dtype=F64, requires_grad=True)
    a, b = ours(x), ref(x)
    assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)
    g = torch.randn_like(b)
    ga = torch.autograd.grad(a, [x, *ours.parameters()], g, create_graph=True)
    gb = torch.autograd.grad(b, [x, *ref.parameters()], g, create_graph=True)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-12)
    if kw.get("act") is not None:  # forces are d/dx: force training differentiates them again
        h = torch.autograd.grad((ga[0] ** 2).sum(), [x, *ours.parameters()])
        k = torch.autograd.grad((gb[0] ** 2).sum(), [x, *ref.parameters()])
        for u, v in zip(h, k):
            assert torch.allclose(u, v, rtol=1e-11, atol=1e-11)
    restore_radial(ours)
    assert type(ours) is e3nn_nn.FullyConnectedNet
