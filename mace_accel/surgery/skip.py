"""The per-element linear map that replaces MACE's ``skip_tp``.

mace-torch builds ``skip_tp = o3.FullyConnectedTensorProduct(irreps_in, Nx0e, irreps_out)`` whose second
input is the one-hot element encoding ``node_attrs``. Every path is "uvw" between ``irreps_in1[i]`` and an
output block of the same irrep, so for an atom of element ``e`` the map is a plain linear map, one matrix
per path:

    out[n, w, :] += c_path * sum_u x[n, u, :] * W_path[u, e, w]

with ``c_path = path_weight / sqrt(2l+1)``: e3nn 0.4.4 stores ``path_weight`` = sqrt(alpha) (its
irrep/path normalisation) on the instruction and its specialised code for a scalar second operand divides by
sqrt(dim of the output irrep) (the (l, 0, l) Wigner 3j block is identity / sqrt(2l+1), used by the generic
code). The weight is e3nn's own flat parameter, same object, same layout ([u, element, w] per path): training
and ``state_dict`` are unchanged.

Three exact evaluation strategies (chosen per call by ``strategy``):

* ``"segment"``: sort atoms by element, one matmul per element present per path (one host sync);
* ``"gather"``: gather a [u, w] matrix per atom and batch-matmul (no sync; memory N*u*w per path);
* ``"dense"``: contract with ``node_attrs`` itself like e3nn (any node_attrs, differentiable in them).

``"auto"`` uses ``dense`` when ``node_attrs`` requires grad, ``gather`` while compiling, while a CUDA graph is
captured or when the gathered matrices are small, else ``segment``. The first two need one-hot ``node_attrs`` (checked).
"""
from __future__ import annotations

import copy
import math
from typing import List, Tuple

import torch

from .errors import UnsupportedModuleError

STRATEGIES = ("auto", "segment", "gather", "dense")
#: ``auto`` gathers per-atom matrices while N * (sum over paths of u*w) stays below this many elements.
GATHER_LIMIT = 1 << 21


def skip_paths(fctp) -> List[Tuple[int, int, int, int, int, int, int, float]]:
    """Validate an e3nn FullyConnectedTensorProduct with one-hot second input; return its paths as
    (in1_offset, out_offset, mul_in, mul_out, ir_dim, weight_offset, num_elements, coefficient)."""
    from e3nn import o3

    from .conv import find_normalization

    if not isinstance(fctp, o3.TensorProduct):
        raise UnsupportedModuleError("", f"skip_tp is a {type(fctp).__module__}.{type(fctp).__qualname__}, "
                                         "not an e3nn tensor product")
    in1, in2, out = fctp.irreps_in1, fctp.irreps_in2, fctp.irreps_out
    if len(in2) != 1 or in2[0].ir != o3.Irrep("0e"):
        raise UnsupportedModuleError("", f"skip_tp's second operand is {in2}, not one block of element scalars "
                                         "'Nx0e'")
    if not (fctp.shared_weights and fctp.internal_weights):
        raise UnsupportedModuleError("", "skip_tp has per-sample or external weights")
    if not all(ins.connection_mode == "uvw" and ins.has_weight for ins in fctp.instructions):
        raise UnsupportedModuleError("", "skip_tp has paths other than weighted 'uvw'")
    find_normalization(in1, in2, out, fctp.instructions, "uvw")  # refuses custom variances / path weights
    num_el = in2[0].mul
    in1_off = [0]
    for mi in in1:
        in1_off.append(in1_off[-1] + mi.dim)
    out_off = [0]
    for mi in out:
        out_off.append(out_off[-1] + mi.dim)
    paths = []
    w_off = 0
    for ins in fctp.instructions:
        a, c = in1[ins.i_in1], out[ins.i_out]
        if a.ir != c.ir:  # pragma: no cover - impossible with a 0e second operand
            raise UnsupportedModuleError("", f"skip_tp path {a.ir} x 0e -> {c.ir}")
        numel = a.mul * num_el * c.mul
        coeff = float(ins.path_weight) / math.sqrt(c.ir.dim)
        paths.append((in1_off[ins.i_in1], out_off[ins.i_out], a.mul, c.mul, c.ir.dim, w_off, num_el, coeff))
        w_off += numel
    if w_off != fctp.weight_numel:  # pragma: no cover
        raise UnsupportedModuleError("", "skip_tp weight layout not understood")
    return paths


class ElementSkipTP(torch.nn.Module):
    """Exact per-element linear replacement of an e3nn ``FullyConnectedTensorProduct(x, one_hot)``.

    ``forward(x, node_attrs)`` has the e3nn module's signature. ``weight`` is the e3nn module's parameter.
    """

    def __init__(self, fctp, strategy: str = "auto", check_one_hot: bool = True):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.paths = skip_paths(fctp)
        self.irreps_in1 = fctp.irreps_in1
        self.irreps_in2 = fctp.irreps_in2
        self.irreps_out = fctp.irreps_out
        self.num_elements = fctp.irreps_in2[0].mul
        self.in_dim = fctp.irreps_in1.dim
        self.out_dim = fctp.irreps_out.dim
        self.out_blocks = [(o, mi.mul, mi.ir.dim) for o, mi in zip(_offsets(fctp.irreps_out), fctp.irreps_out)]
        self.strategy = strategy
        self.check_one_hot = check_one_hot
        self.weight = fctp.weight  # the same Parameter object
        # A copy of the original module without its weight, for to_e3nn (unregistered: not moved, not in
        # state_dict); the caller's module is left untouched.
        original = copy.deepcopy(fctp)
        del original.weight
        original = original.to("cpu")
        object.__setattr__(self, "_e3nn_original", original)

    @property
    def per_atom_numel(self) -> int:
        return sum(p[2] * p[3] for p in self.paths)

    def extra_repr(self) -> str:
        return (f"{self.irreps_in1} x {self.num_elements} elements -> {self.irreps_out}, "
                f"{len(self.paths)} per-element matrices, strategy={self.strategy!r}")

    def to_e3nn(self):
        """The original e3nn module holding this module's current weight (same Parameter)."""
        fctp = self._e3nn_original
        fctp = fctp.to(device=self.weight.device, dtype=self.weight.dtype)
        fctp.weight = self.weight
        return fctp

    # ---- evaluation ------------------------------------------------------------------------------------
    def _weights(self, p) -> torch.Tensor:
        _, _, mul_in, mul_out, _, w_off, num_el, _ = p
        return self.weight[w_off:w_off + mul_in * num_el * mul_out].view(mul_in, num_el, mul_out)

    def _choose(self, x: torch.Tensor, node_attrs: torch.Tensor) -> str:
        if self.strategy != "auto":
            return self.strategy
        if node_attrs.requires_grad:
            return "dense"
        if torch.compiler.is_compiling() or x.shape[0] * self.per_atom_numel <= GATHER_LIMIT:
            return "gather"
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return "gather"  # segment reads element counts on the host: not allowed in a CUDA graph
        return "segment"

    def _check(self, node_attrs: torch.Tensor):
        if not self.check_one_hot or torch.compiler.is_compiling() or node_attrs.numel() == 0:
            return
        ok = ((node_attrs == 0) | (node_attrs == 1)).all() & (node_attrs.sum(dim=1) == 1).all()
        if node_attrs.is_cuda:
            torch._assert_async(ok, "mace_accel ElementSkipTP: node_attrs must be one-hot")
        elif not bool(ok):
            raise ValueError("mace_accel ElementSkipTP: node_attrs must be one-hot element encodings "
                             "(use strategy='dense' for general node attributes)")

    def _assemble(self, blocks, n: int, like: torch.Tensor) -> torch.Tensor:
        parts = []
        for (off, mul, dim), b in zip(self.out_blocks, blocks):
            parts.append(b.reshape(n, mul * dim) if b is not None else like.new_zeros(n, mul * dim))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(self, x: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [N, {self.in_dim}]")
        if node_attrs.shape != (x.shape[0], self.num_elements):
            raise ValueError(f"node_attrs has shape {tuple(node_attrs.shape)}, expected "
                             f"[{x.shape[0]}, {self.num_elements}]")
        n = x.shape[0]
        strategy = self._choose(x, node_attrs)
        if strategy != "dense":
            self._check(node_attrs)
        blocks = [None] * len(self.out_blocks)
        index_of_offset = {o: k for k, (o, _, _) in enumerate(self.out_blocks)}

        def add(k, t):
            blocks[k] = t if blocks[k] is None else blocks[k] + t

        if strategy == "dense":
            for p in self.paths:
                i_off, o_off, mul_in, mul_out, d, _, _, c = p
                xb = x[:, i_off:i_off + mul_in * d].reshape(n, mul_in, d)
                add(index_of_offset[o_off], torch.einsum("nui,nv,uvw->nwi", xb, node_attrs, self._weights(p)) * c)
            return self._assemble(blocks, n, x)

        elem = node_attrs.argmax(dim=1)
        if strategy == "gather":
            for p in self.paths:
                i_off, o_off, mul_in, mul_out, d, _, _, c = p
                xb = x[:, i_off:i_off + mul_in * d].reshape(n, mul_in, d)
                wg = self._weights(p).transpose(0, 1).index_select(0, elem)  # [n, u, w]
                r = torch.bmm(xb.transpose(1, 2), wg).transpose(1, 2)  # [n, w, d]
                add(index_of_offset[o_off], r * c)
            return self._assemble(blocks, n, x)

        if strategy != "segment":  # pragma: no cover
            raise ValueError(f"unknown strategy {strategy!r}")
        order = torch.argsort(elem, stable=True)
        counts = torch.bincount(elem, minlength=self.num_elements).tolist()  # the one host sync
        xs = x.index_select(0, order)
        seg_blocks = [[] for _ in self.out_blocks]
        start = 0
        for e, cnt in enumerate(counts):
            if cnt == 0:
                continue
            xe = xs[start:start + cnt]
            per_block = [None] * len(self.out_blocks)
            for p in self.paths:
                i_off, o_off, mul_in, mul_out, d, _, _, c = p
                xb = xe[:, i_off:i_off + mul_in * d].reshape(cnt, mul_in, d)
                r = torch.einsum("nui,uw->nwi", xb, self._weights(p)[:, e, :]) * c
                k = index_of_offset[o_off]
                per_block[k] = r if per_block[k] is None else per_block[k] + r
            for k, (off, mul, dim) in enumerate(self.out_blocks):
                seg_blocks[k].append(per_block[k].reshape(cnt, mul * dim) if per_block[k] is not None
                                     else x.new_zeros(cnt, mul * dim))
            start += cnt
        sorted_out = torch.cat([torch.cat(b, dim=0) for b in seg_blocks], dim=1) if n else x.new_zeros(0, self.out_dim)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=order.device)
        return sorted_out.index_select(0, inverse)


def _offsets(irreps) -> List[int]:
    out, o = [], 0
    for mi in irreps:
        out.append(o)
        o += mi.dim
    return out
