"""Stage 4: ``torch.library`` custom ops with registered autograd.

Two ops cover the fused conv and the plain tensor product (``sender``/``receiver`` = None):

* ``mace_accel::tp_fwd(x, y, w, sender, receiver, num_rows, plan_key, deterministic) -> out``
* ``mace_accel::tp_bwd(x, y, w, gout, sender, receiver, plan_key, deterministic, need_x, need_y, need_w)
  -> (dx, dy, dw)``

The product is trilinear in (x, y, w), so the derivative of ``tp_bwd`` is itself made of ``tp_fwd`` and
``tp_bwd`` calls with one operand replaced by an incoming gradient (see :func:`_bwd_backward`). Both ops
therefore have registered autograd, and any order of derivative works (forces, force training, Hessians).

CPU tensors run the reference executor, CUDA tensors the generated kernels. Fake implementations make the
ops traceable by ``torch.compile``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..plan import get_plan

_EMPTY = (0,)


_BACKENDS = {}


def backend_for(t: torch.Tensor, family: str = ""):
    """The executor module for ``t``'s device: ``backends.cuda[.family]`` or ``backends.reference[.family]``."""
    key = (t.is_cuda, family)
    mod = _BACKENDS.get(key)
    if mod is None:
        import importlib

        name = "cuda" if t.is_cuda else "reference"
        mod = _BACKENDS[key] = importlib.import_module(f"..backends.{name}{'.' + family if family else ''}",
                                                       __name__)
    return mod


def _backend(t: torch.Tensor):
    return backend_for(t)


def engine_needs(ctx, index: int) -> bool:
    """Whether this backward pass will use the gradient of input ``index``. ``ctx.needs_input_grad`` only says
    that the input requires grad; ``torch.autograd.grad(energy, positions)`` on a model with trainable weights
    does not need the weights' gradients (e.g. the product basis's per-node weights do not depend on
    positions), and the engine knows which nodes it will run."""
    return engine_needs_all(ctx, (index,))[0]


def engine_needs_all(ctx, indices) -> Tuple[bool, ...]:
    """:func:`engine_needs` for several inputs (``ctx.next_functions`` builds a tuple per access: read once)."""
    needs = ctx.needs_input_grad
    if not any(needs[i] for i in indices):
        return (False,) * len(indices)
    try:
        nodes = ctx.next_functions
    except (AttributeError, RuntimeError):  # older torch
        return tuple(bool(needs[i]) for i in indices)
    return tuple(bool(needs[i]) and _will_run(nodes[i][0]) for i in indices)


def _will_run(node) -> bool:
    # A leaf's AccumulateGrad node: .backward() always runs it, and torch.autograd.grad() cannot be asked
    # (it raises, and the raise costs ~30 us of host time per call): assume the gradient is used.
    if node is None or type(node).__name__ == "AccumulateGrad":
        return True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # older torch, or not inside an engine pass
        return True


def _fwd_impl(x, y, w, sender, receiver, num_rows, plan_key, deterministic):
    return _backend(x).forward(get_plan(plan_key), x, y, w, sender, receiver, num_rows, deterministic=deterministic)


def _bwd_impl(x, y, w, gout, sender, receiver, plan_key, deterministic, need_x, need_y, need_w):
    dx, dy, dw = _backend(x).backward(get_plan(plan_key), x, y, w, gout, sender, receiver, need_x, need_y, need_w,
                                      deterministic=deterministic)
    # Custom ops return tensors: a gradient not asked for comes back as an empty tensor (made only when needed:
    # each costs host time).
    return (dx if dx is not None else x.new_empty(_EMPTY), dy if dy is not None else x.new_empty(_EMPTY),
            dw if dw is not None else x.new_empty(_EMPTY))


@torch.library.custom_op("mace_accel::tp_fwd", mutates_args=())
def tp_fwd(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, sender: Optional[torch.Tensor],
           receiver: Optional[torch.Tensor], num_rows: int, plan_key: str, deterministic: bool) -> torch.Tensor:
    return _fwd_impl(x, y, w, sender, receiver, num_rows, plan_key, deterministic)


@tp_fwd.register_fake
def _(x, y, w, sender, receiver, num_rows, plan_key, deterministic):
    plan = get_plan(plan_key)
    return x.new_empty(num_rows, plan.out_dim)


@torch.library.custom_op("mace_accel::tp_bwd", mutates_args=())
def tp_bwd(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, gout: torch.Tensor, sender: Optional[torch.Tensor],
           receiver: Optional[torch.Tensor], plan_key: str, deterministic: bool, need_x: bool, need_y: bool,
           need_w: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(x, y, w, gout, sender, receiver, plan_key, deterministic, need_x, need_y, need_w)


@tp_bwd.register_fake
def _(x, y, w, gout, sender, receiver, plan_key, deterministic, need_x, need_y, need_w):
    return (x.new_empty(x.shape) if need_x else x.new_empty(_EMPTY),
            y.new_empty(y.shape) if need_y else x.new_empty(_EMPTY),
            w.new_empty(w.shape) if need_w else x.new_empty(_EMPTY))


# ---- autograd ------------------------------------------------------------------------------------------
def _fwd_setup(ctx, inputs, output):
    x, y, w, sender, receiver, num_rows, plan_key, deterministic = inputs
    ctx.save_for_backward(x, y, w, sender, receiver)
    ctx.plan_key, ctx.deterministic = plan_key, deterministic


def _eager_backward():
    """The eager path's backward: under create_graph the autograd.Function (its gradients get a grad_fn: double
    backward), else the implementation itself (no autograd node to build, saves an autograd.Function call)."""
    return _TPBackward.apply if torch.is_grad_enabled() else _bwd_impl


def _fwd_backward(ctx, gout):
    x, y, w, sender, receiver = ctx.saved_tensors
    nx, ny, nw = engine_needs_all(ctx, (0, 1, 2))
    if not (nx or ny or nw):
        return (None,) * 8
    bwd = _eager_backward() if getattr(ctx, "eager", False) else tp_bwd
    dx, dy, dw = bwd(x, y, w, gout.contiguous(), sender, receiver, ctx.plan_key, ctx.deterministic, nx, ny, nw)
    return (dx if nx else None, dy if ny else None, dw if nw else None) + (None,) * 5


tp_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _bwd_setup(ctx, inputs, output):
    x, y, w, gout, sender, receiver, plan_key, deterministic, need_x, need_y, need_w = inputs
    ctx.save_for_backward(x, y, w, gout, sender, receiver)
    ctx.plan_key, ctx.deterministic = plan_key, deterministic
    ctx.needs = (need_x, need_y, need_w)


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _bwd_backward(ctx, ggx, ggy, ggw):
    """Derivative of (dx, dy, dw) = B(x, y, w, gout), from forward and backward calls.

    With F trilinear: dx = F_x(gout, y, w), dy = F_y(x, gout, w), dw = F_w(x, y, gout). Then
      d/dgout = F(ggx, y, w) + F(x, ggy, w) + F(x, y, ggw)
      d/dx    = F_x(gout, ggy, w) + F_x(gout, y, ggw)
      d/dy    = F_y(ggx, gout, w) + F_y(x, gout, ggw)
      d/dw    = F_w(ggx, y, gout) + F_w(x, ggy, gout)
    """
    x, y, w, gout, sender, receiver = ctx.saved_tensors
    key, det = ctx.plan_key, ctx.deterministic
    need_x, need_y, need_w = ctx.needs
    ggx = ggx if (need_x and ggx is not None and ggx.numel()) else None
    ggy = ggy if (need_y and ggy is not None and ggy.numel()) else None
    ggw = ggw if (need_w and ggw is not None and ggw.numel()) else None
    rx, ry, rw = ctx.needs_input_grad[:3]
    rg = engine_needs(ctx, 3)  # False when the first pass started from a constant upstream gradient
    num_rows = gout.shape[0]
    # Not differentiated further (no create_graph): one fused kernel instead of 3 forward + 3 backward,
    # where its per-lane state fits in registers.
    fused = (x.is_cuda and not det and receiver is not None and not torch.is_grad_enabled()
             and ggx is not None and ggy is not None and ggw is not None)
    if fused:
        from ..backends import cuda

        fused = cuda.fused_double_fits(get_plan(key), x.dtype, need_gg=rg)
    if fused:
        gx, gy, gw, gg = cuda.double_backward(get_plan(key), x, y, w, gout, ggx.contiguous(), ggy.contiguous(),
                                              ggw.contiguous(), sender, receiver, need_gg=rg)
        return ((gx if rx else None), (gy if ry else None), (gw if rw else None), (gg if rg else None)) \
            + (None,) * 7
    # the custom ops' autograd calls the custom ops (traceable); the eager Functions call the Functions
    fwd, bwd = (_TPForward.apply, _TPBackward.apply) if getattr(ctx, "eager", False) else (tp_fwd, tp_bwd)
    gx = gy = gw = gg = None
    if rg:
        for a, b, c in ((ggx, y, w), (x, ggy, w), (x, y, ggw)):
            if a is not None and b is not None and c is not None:
                gg = _add(gg, fwd(a.contiguous(), b.contiguous(), c.contiguous(), sender, receiver, num_rows,
                                  key, det))
    if ggx is not None and (ry or rw):
        _, t_y, t_w = bwd(ggx.contiguous(), y, w, gout, sender, receiver, key, det, False, ry, rw)
        gy, gw = (t_y if ry else None), (t_w if rw else None)
    if ggy is not None and (rx or rw):
        t_x, _, t_w = bwd(x, ggy.contiguous(), w, gout, sender, receiver, key, det, rx, False, rw)
        gx = _add(gx, t_x if rx else None)
        gw = _add(gw, t_w if rw else None)
    if ggw is not None and (rx or ry):
        t_x, t_y, _ = bwd(x, y, ggw.contiguous(), gout, sender, receiver, key, det, rx, ry, False)
        gx = _add(gx, t_x if rx else None)
        gy = _add(gy, t_y if ry else None)
    if rg and gg is None:
        gg = torch.zeros_like(gout)
    return (gx, gy, gw, gg) + (None,) * 7


tp_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


# ---- eager entry points --------------------------------------------------------------------------------
# The custom ops' Python autograd layer costs ~100-300 us of host time per forward + backward (measured on the
# CPU with an empty backend), which the short layer-0 kernels cannot hide. Outside torch.compile the modules
# therefore call the same implementations through plain autograd.Functions with the same derivative formulas;
# under torch.compile they call the custom ops (traceable, with fake implementations).
class _TPForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, w, sender, receiver, num_rows, plan_key, deterministic):
        ctx.set_materialize_grads(False)
        _fwd_setup(ctx, (x, y, w, sender, receiver, num_rows, plan_key, deterministic), None)
        ctx.eager = True
        return _fwd_impl(x, y, w, sender, receiver, num_rows, plan_key, deterministic)

    @staticmethod
    def backward(ctx, gout):
        if gout is None:
            return (None,) * 8
        return _fwd_backward(ctx, gout)


class _TPBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, w, gout, sender, receiver, plan_key, deterministic, need_x, need_y, need_w):
        ctx.set_materialize_grads(False)
        _bwd_setup(ctx, (x, y, w, gout, sender, receiver, plan_key, deterministic, need_x, need_y, need_w), None)
        ctx.eager = True
        return _bwd_impl(x, y, w, gout, sender, receiver, plan_key, deterministic, need_x, need_y, need_w)

    @staticmethod
    def backward(ctx, ggx, ggy, ggw):
        return _bwd_backward(ctx, ggx, ggy, ggw)


def _native_python_backward(x, y, w, gout, sender, receiver, plan_key, need_x, need_y, need_w):
    """The native conv's backward where it calls back into Python (create_graph, or a kernel not compiled yet):
    the eager Functions' backward, differentiable when grad mode is on."""
    return _eager_backward()(x, y, w, gout, sender, receiver, plan_key, False, need_x, need_y, need_w)


_NATIVE = []  # [backends.cuda.native] once imported (a per-call import statement costs host time)


def _native():
    if not _NATIVE:
        from ..backends.cuda import native

        native.set_python_backward(_native_python_backward)
        _NATIVE.append(native)
    return _NATIVE[0]


def tp_forward(x, y, w, sender, receiver, num_rows: int, plan_key: str, deterministic: bool) -> torch.Tensor:
    """``tp_fwd`` with autograd: the custom op under torch.compile; outside it, the atomic conv on CUDA through
    the native extension (backends/cuda/native.py) when it is available, else a plain autograd.Function."""
    if torch.compiler.is_compiling():
        return tp_fwd(x, y, w, sender, receiver, num_rows, plan_key, deterministic)
    if receiver is not None and not deterministic and x.is_cuda:
        native = _native()
        mod = native.module()
        if mod is not None:
            return native.conv(mod, x, y, w, sender, receiver, num_rows, get_plan(plan_key))
    return _TPForward.apply(x, y, w, sender, receiver, num_rows, plan_key, deterministic)

