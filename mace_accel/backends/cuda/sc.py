"""Launch the generated symmetric-contraction kernels on PyTorch's current CUDA stream.

Same functions and layouts as :mod:`mace_accel.backends.reference.sc`. Forward, grad-x and grad-w (training
only; one launch per chunk of ``GRAD_W_CHUNK`` weights) are generated kernels. Every output element is written by
one thread with a plain store, so outputs are allocated uninitialised and the result is deterministic.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...plan.sc import SCPlan
from . import _DTYPES, _ptr, compiled, device_index, run_on_torch_stream
from .sc_codegen import (KIND_SC_FORWARD, KIND_SC_GRAD_W, KIND_SC_GRAD_X, SC_THREADS_PER_BLOCK, SCKernelSpec,
                         grad_w_chunks, render_sc)


def _function(plan: SCPlan, spec: SCKernelSpec, device_index: int):
    return compiled(plan.key, spec, device_index, lambda: render_sc(plan, spec))


def _launch(plan: SCPlan, spec: SCKernelSpec, x: torch.Tensor, X, WN, G, OUT, DX, DW) -> None:
    if x.shape[0] * plan.num_channels:
        _launch_function(_function(plan, spec, device_index(x.device)), plan, x, X, WN, G, OUT, DX, DW)


def _launch_function(fn, plan: SCPlan, x: torch.Tensor, X, WN, G, OUT, DX, DW) -> None:
    """Launch a compiled symmetric-contraction kernel (the backend's, or a diagnostic build of the same source)
    over x's nodes on PyTorch's current stream: one thread per (node, channel)."""
    n = x.shape[0]
    items = n * plan.num_channels
    args = tuple(_ptr(t) for t in (X, WN, G, OUT, DX, DW)) + (int(n),)
    run_on_torch_stream(fn, x.device, -(-items // SC_THREADS_PER_BLOCK), SC_THREADS_PER_BLOCK, args)


def forward(plan: SCPlan, x: torch.Tensor, wn: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], plan.out_dim)
    _launch(plan, SCKernelSpec(KIND_SC_FORWARD, _DTYPES[x.dtype]), x, x, wn, None, out, None, None)
    return out


def backward(plan: SCPlan, x: torch.Tensor, wn: torch.Tensor, gout: torch.Tensor, need_x: bool,
             need_w: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    dx = dw = None
    dt = _DTYPES[x.dtype]
    if need_x:
        dx = torch.empty_like(x)
        _launch(plan, SCKernelSpec(KIND_SC_GRAD_X, dt), x, x, wn, gout, None, dx, None)
    if need_w:
        dw = torch.empty_like(wn)  # every chunk writes all of its weights for every (node, channel)
        for lo, hi in grad_w_chunks(plan):
            _launch(plan, SCKernelSpec(KIND_SC_GRAD_W, dt, lo, hi), x, x, wn, gout, None, None, dw)
    return dx, dw
