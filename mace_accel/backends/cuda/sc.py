"""Launch the generated symmetric-contraction kernels on PyTorch's current CUDA stream.

Same functions and layouts as :mod:`mace_accel.backends.reference.sc`. Forward and grad-x are generated
kernels; grad-w (training only) runs the reference formula on the GPU (see ``backward``). Every output element is written by
one thread with a plain store, so outputs are allocated uninitialised and the result is deterministic.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...plan.sc import SCPlan
from . import _DTYPES, _ptr, compiled, device_index, run_on_torch_stream
from .sc_codegen import KIND_SC_FORWARD, KIND_SC_GRAD_X, SC_THREADS_PER_BLOCK, SCKernelSpec, render_sc

def _function(plan: SCPlan, spec: SCKernelSpec, device_index: int):
    return compiled(plan.key, spec, device_index, lambda: render_sc(plan, spec))


def _launch(plan: SCPlan, spec: SCKernelSpec, x: torch.Tensor, X, WN, G, OUT, DX, DW) -> None:
    n = x.shape[0]
    items = n * plan.num_channels
    if items == 0:
        return
    args = tuple(_ptr(t) for t in (X, WN, G, OUT, DX, DW)) + (int(n),)
    fn = _function(plan, spec, device_index(x.device))
    run_on_torch_stream(fn, x.device, -(-items // SC_THREADS_PER_BLOCK), SC_THREADS_PER_BLOCK, args)


def forward(plan: SCPlan, x: torch.Tensor, wn: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], plan.out_dim)
    _launch(plan, SCKernelSpec(KIND_SC_FORWARD, _DTYPES[x.dtype]), x, x, wn, None, out, None, None)
    return out


def backward(plan: SCPlan, x: torch.Tensor, wn: torch.Tensor, gout: torch.Tensor, need_x: bool,
             need_w: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    dx = dw = None
    if need_x:
        dx = torch.empty_like(x)
        _launch(plan, SCKernelSpec(KIND_SC_GRAD_X, _DTYPES[x.dtype]), x, x, wn, gout, None, dx, None)
    if need_w:
        # The weight gradient (training only) runs the reference formula: the generated grad-w kernels gave
        # wrong results on the H100 for some plans (mp-medium / mp-large float64, deterministic, while the same
        # source built for the host is right: benchmarks/results/sc_diag_h100.txt), cause not found yet.
        from ..reference import sc as ref

        _, dw = ref.backward(plan, x, wn, gout, False, True)
    return dx, dw
