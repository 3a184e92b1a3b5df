"""``torch.library`` ops of the symmetric contraction, with registered autograd.

* ``mace_accel::sc_fwd(x, wn, plan_key) -> out``
* ``mace_accel::sc_bwd(x, wn, gout, plan_key, need_x, need_w) -> (dx, dw)``

Autograd of ``sc_fwd``: when no graph is requested (inference forces) the backward is one ``sc_bwd`` call
(on CUDA: the generated grad-x kernel, and the grad-w kernels when this backward pass needs the weight
gradient). When a graph is requested (``create_graph=True``: force training, Hessians) the
backward is the reference executor's formula, made of differentiable torch ops, so every further derivative
is exact. ``sc_bwd`` itself is therefore only ever called without a graph and has no autograd of its own.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..plan.sc import get_sc_plan
from . import backend_for, engine_needs_all

_EMPTY = (0,)


def _backend(t: torch.Tensor):
    return backend_for(t, "sc")


@torch.library.custom_op("mace_accel::sc_fwd", mutates_args=())
def sc_fwd(x: torch.Tensor, wn: torch.Tensor, plan_key: str) -> torch.Tensor:
    return _backend(x).forward(get_sc_plan(plan_key), x, wn)


@sc_fwd.register_fake
def _(x, wn, plan_key):
    return x.new_empty(x.shape[0], get_sc_plan(plan_key).out_dim)


@torch.library.custom_op("mace_accel::sc_bwd", mutates_args=())
def sc_bwd(x: torch.Tensor, wn: torch.Tensor, gout: torch.Tensor, plan_key: str, need_x: bool,
           need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    dx, dw = _backend(x).backward(get_sc_plan(plan_key), x, wn, gout, need_x, need_w)
    empty = x.new_empty(_EMPTY)
    return (dx if dx is not None else empty, dw if dw is not None else empty.clone())


@sc_bwd.register_fake
def _(x, wn, gout, plan_key, need_x, need_w):
    return (x.new_empty(x.shape) if need_x else x.new_empty(_EMPTY),
            wn.new_empty(wn.shape) if need_w else x.new_empty(_EMPTY))


def _setup(ctx, inputs, output):
    x, wn, plan_key = inputs
    ctx.save_for_backward(x, wn)
    ctx.plan_key = plan_key


def _backward(ctx, gout):
    x, wn = ctx.saved_tensors
    nx, nw = engine_needs_all(ctx, (0, 1))
    if not (nx or nw):
        return None, None, None
    if torch.is_grad_enabled():  # a graph is being built: differentiable formula
        from ..backends.reference import sc as ref

        dx, dw = ref.backward(get_sc_plan(ctx.plan_key), x, wn, gout, nx, nw)
    else:
        dx, dw = sc_bwd(x, wn, gout.contiguous(), ctx.plan_key, nx, nw)
    return (dx if nx else None), (dw if nw else None), None


sc_fwd.register_autograd(_backward, setup_context=_setup)
