"""Problem builders and e3nn oracles shared by the tensor-product tests (test code, not library code)."""
import os

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import mace  # noqa: E402,F401  (sets up e3nn's torch.load flag)
import torch  # noqa: E402
from e3nn import o3  # noqa: E402
from mace.modules.irreps_tools import tp_out_irreps_with_instructions  # noqa: E402

SH3 = "1x0e+1x1o+1x2e+1x3o"
TARGET = "{m}x0e+{m}x1o+{m}x2e+{m}x3o"

# MACE-MP-0 conv layers: (name, node irreps); sh up to l=3, targets 128x(0e+1o+2e+3o)
MACE_MP0_LAYERS = {
    "layer0": "{m}x0e",  # every model's first layer (and small's second)
    "medium1": "{m}x0e+{m}x1o",
    "large1": "{m}x0e+{m}x1o+{m}x2e",
}


def mace_conv_args(layer: str, mul: int = 128, lmax_sh: int = 3):
    node = o3.Irreps(MACE_MP0_LAYERS[layer].format(m=mul))
    sh = o3.Irreps.spherical_harmonics(lmax_sh)
    target = o3.Irreps(TARGET.format(m=mul))
    mid, ins = tp_out_irreps_with_instructions(node, sh, target)
    return node, sh, mid, ins


def e3nn_tp(node, sh, mid, ins, shared_weights=False, irrep_normalization="component",
            path_normalization="element", dtype=torch.float64, device="cpu"):
    # e3nn builds its Wigner 3j buffers in the default dtype: build in float64 so the oracle is exact
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tp = o3.TensorProduct(node, sh, mid, ins, shared_weights=shared_weights, internal_weights=False,
                              irrep_normalization=irrep_normalization, path_normalization=path_normalization)
    finally:
        torch.set_default_dtype(old)
    return tp.to(dtype=dtype, device=device)


def e3nn_conv(tp, x, y, w, sender, receiver, num_nodes):
    msg = tp(x[sender], y, w)
    return torch.zeros(num_nodes, msg.shape[1], dtype=msg.dtype, device=msg.device).index_add(0, receiver, msg)


def random_graph(num_nodes, num_edges, generator=None, device="cpu", sort_receiver=False):
    s = torch.randint(0, num_nodes, (num_edges,), generator=generator)
    r = torch.randint(0, num_nodes, (num_edges,), generator=generator)
    if sort_receiver:
        r, order = torch.sort(r)
        s = s[order]
    return s.to(device), r.to(device)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def launched_specs(plan, dtype: str, sm90: bool = True):
    """{label: spec} of every kernel the CUDA backend launches for ``plan`` in ``dtype`` (backends.cuda._spec:
    parts, prefetch, dy atomics, staged rows as the tables pick them now), for a compile target of sm_90 or
    newer or (``sm90=False``) an older one. For tests and sweeps."""
    from mace_accel.backends.cuda import _spec
    from mace_accel.backends.cuda.codegen import (DX_ATOMIC, DX_NONE, DX_STORE, KIND_BACKWARD, KIND_DOUBLE,
                                                  KIND_FORWARD, KIND_GRAD_X)

    def spec(*args, **kw):
        return _spec(plan, *args, sm90=sm90, **kw)

    return {"fwd": spec(KIND_FORWARD, dtype, True),                           # conv / plain forward
            "bwd": spec(KIND_BACKWARD, dtype, False, DX_ATOMIC, True, True),  # atomic backward
            "bwd_det": spec(KIND_BACKWARD, dtype, True, DX_NONE, True, True),  # deterministic backward
            "tp_bwd": spec(KIND_BACKWARD, dtype, True, DX_STORE, True, True),  # plain backward
            "grad_x": spec(KIND_GRAD_X, dtype, True),                         # deterministic dx
            "double": spec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True),  # fused double backward
            "double_nogg": spec(KIND_DOUBLE, dtype, False, DX_ATOMIC, True, True, need_gg=False)}


def launch_edge_kernel(plan, spec, x, y, w, g, sender, receiver, ggx=None, ggy=None, ggw=None, dw_fill=None):
    """One launch of an atomic backward or fused double-backward kernel ``spec`` (GPU), walking runs of
    ``spec.edges_per_warp`` edges or, with ``spec.segmented``, one receiver segment per work item; the outputs
    are allocated here (dy added with atomics into one zeroed row per edge; dW filled with ``dw_fill`` first,
    e.g. NaN to poison it). Returns (dx, dy [1, E, D2], dW). For specs the backend does not pick itself (tests,
    sweeps)."""
    from mace_accel.backends import cuda as B

    n, e = x.shape[0], y.shape[0]
    perm, seg = B.graph_csr(receiver, n, stable=False)
    dx = torch.zeros_like(x)
    dy = torch.zeros((1, e, plan.in2_dim), dtype=x.dtype, device=x.device)
    dw = torch.empty(e, plan.weight_numel, dtype=x.dtype, device=x.device)
    if dw_fill is not None:
        dw.fill_(dw_fill)
    items = n if spec.segmented else -(-e // spec.edges_per_warp)
    B._launch(plan, spec, x.device, items, e, plan.weight_numel, X=x, Y=y, W=w, G=g, sender=sender,
              receiver=receiver, perm=perm, seg_ptr=seg if spec.segmented else None, OUT=dx, DY=dy, DW=dw,
              X2=ggx, Y2=ggy, W2=ggw)
    return dx, dy, dw
