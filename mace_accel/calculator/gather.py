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
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


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
                    return src.expand(index.shape[0], *src.shape[1:])
                # edge and batch indices are never negative, where index_select and [] would differ
                return torch.index_select(src, 0, index)
        return func(*args, **kwargs)
