"""Row gathers that are cheap to differentiate on the GPU.

mace-torch gathers per-edge rows with advanced indexing (``positions[sender]``, ``cell[batch[sender]]``...).
The backward of ``aten::index`` on CUDA is ``index_put_(accumulate=True)``, which sorts the indices and
accumulates duplicates serially: on a 2048-atom, 160k-edge step it took 52% of the GPU time
(benchmarks/results/profile_step_h100.txt). ``index_select`` computes the same rows and its backward is
``index_add_`` (atomics). :class:`FastRowGather` rewrites ``tensor[index]`` into ``index_select`` while it is
active, for CUDA tensors indexed by one 1-D int64 tensor; everything else passes through untouched.

A source of one row (one structure's ``cell``, its strain displacement: ``cell[batch[sender]]``) is expanded
instead: every valid index is then 0, and the backward becomes a sum over the rows, where ``index_add_`` would
send all E rows' atomics to the same few addresses. (An index other than 0 or -1 into a one-row source is out of
range; the calculator that uses this context builds ``batch`` itself, all zeros.)

mace then multiplies each edge's (or atom's) 3-vector by its gathered 3x3 matrix,
``einsum("be,bec->bc", unit_shifts, cell[batch[sender]])``: a batched product of E 1x3 by 3x3 matrices whose
backward forms the [E, 3, 3] outer products. When the matrices are one expanded row, that is one ``[E, 3] @ [3,
3]`` matmul, and the context computes it so (the gradient of the matrix is then one ``[3, E] @ [E, 3]``).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


#: The attribute on an expanded one-row gather that holds its source row (``[1, ...]``).
_ROW_ATTR = "_mace_accel_one_row"
#: mace's per-row vector x matrix products (``mace.modules.utils.get_symmetric_displacement``).
_ROW_TIMES_MATRIX = "be,bec->bc"


def _row_times_matrix(args):
    """``(vectors, source row)`` when ``torch.einsum(*args)`` is ``be,bec->bc`` of a 2-D tensor and a one-row
    source expanded by this context to the same rows; else None."""
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        args = (args[0], *args[1])
    if len(args) != 3 or not isinstance(args[0], str) or args[0].replace(" ", "") != _ROW_TIMES_MATRIX:
        return None
    a, b = args[1], args[2]
    row = getattr(b, _ROW_ATTR, None)
    if (row is None or not isinstance(a, torch.Tensor) or a.dim() != 2 or b.dim() != 3
            or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[1] or a.dtype != b.dtype
            or a.device != b.device):
        return None
    return a, row


class FastRowGather(TorchFunctionMode):
    def __init__(self, device_types=("cuda",)):
        super().__init__()
        self.device_types = tuple(device_types)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and len(args) == 2 and not kwargs:
            src, index = args
            if (isinstance(index, torch.Tensor) and index.dtype == torch.int64 and index.dim() == 1
                    and isinstance(src, torch.Tensor) and src.dim() >= 1
                    and src.device.type in self.device_types and index.device == src.device):
                if src.shape[0] == 1:
                    rows = src.expand(index.shape[0], *src.shape[1:])
                    setattr(rows, _ROW_ATTR, src)
                    return rows
                # edge and batch indices are never negative, where index_select and [] would differ
                return torch.index_select(src, 0, index)
        if func is torch.einsum and not kwargs:
            found = _row_times_matrix(args)
            if found is not None:
                a, row = found
                return torch.matmul(a, row[0])
        return func(*args, **kwargs)
