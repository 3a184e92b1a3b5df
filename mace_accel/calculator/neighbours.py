"""Neighbour list on any device (torch ops; on CUDA, generated kernels), with periodic, open and mixed boundary
conditions.

Convention (the same as ``matscipy.neighbours.neighbour_list("ijS")`` and mace's ``get_neighborhood``)::

    edge_index = [sender i, receiver j]            # [2, E]
    vector_ij  = positions[j] - positions[i] + unit_shifts @ cell   # |vector_ij| < cutoff

Every pair (i, j, S) with distance strictly below ``cutoff`` is returned once, including an atom with its own
periodic images (i == j, S != 0); only the zero-shift self pair is excluded. Edges are sorted by receiver.

Algorithm: cell list. Atoms are wrapped into the cell along periodic directions and binned on a grid whose
bins are about ``cutoff / bins_per_cutoff`` wide (measured perpendicular to the bin faces, so triclinic cells are
fine).
Along open directions the grid is spanned by unit vectors orthogonal to the periodic cell vectors and
covers the atoms' extent. For every receiver the candidate senders are the atoms in the surrounding
``(2k+1)^3`` bins of the (periodically repeated) grid; ``k > 1`` only when the cutoff exceeds the cell
height, in which case several periodic images are visited. Occupied bins are looked up with a sorted
search, so sparse (e.g. molecular) systems cost no memory for empty bins. The torch path processes receivers
in chunks so that at most ``max_candidates`` candidate pairs are held at a time.

Sizes (number of edges, chunk boundaries) need a few device->host synchronisations of scalars; positions
never leave the device.

On CUDA the candidate pairs are not materialised: generated kernels (``kernels/neighbours.cu``) bin the atoms
(one thread per atom), then count and write each receiver's senders (one thread per receiver and neighbouring
bin), with the same operations, roundings and edge order as the torch path. That is three launches, a sort and
one device->host read of the edge count (per chunk of ``NL_MAX_SLOTS`` receiver-bin slots) instead of ~40 torch
ops (2048 Cu atoms at 6 A: 2.9 ms wall on the
H100 through torch, nearly all host time). The 3x3 cell algebra runs on the host.
``backend="torch"`` runs the torch path on any device (the GPU kernels' test oracle).
"""
from __future__ import annotations

import importlib.util
import math
from typing import Sequence, Tuple

import numpy as np
import torch

__all__ = ["neighbour_list", "check_cell"]

_SLACK = 1e-5  # relative margin on bin widths: bins are >= cutoff * (1 + _SLACK) wide
_MAX_BINS_PER_DIM = 1 << 16
#: Threads per block of the neighbour-list kernels (one thread per receiver and neighbouring bin).
NL_THREADS = 128
#: The most (receiver, neighbouring bin) slots one pair of kernel launches handles: their int32 counts and int64
#: prefix sums take 12 bytes each (192 MB here); larger systems run in chunks of receivers.
NL_MAX_SLOTS = 1 << 24
_BACKENDS = ("auto", "torch", "cuda")


def _use_kernels(device: torch.device, backend: str) -> bool:
    """Whether the candidate pairs run in the generated CUDA kernels: ``backend="cuda"`` (CUDA positions and
    CuPy required), or ``"auto"`` on a CUDA device when CuPy is installed."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    usable = device.type == "cuda" and importlib.util.find_spec("cupy") is not None
    if backend == "cuda" and not usable:
        raise ValueError("backend='cuda' needs positions on a CUDA device and CuPy installed "
                         f"(positions are on {device})")
    return usable


def _as_pbc(pbc) -> Tuple[bool, bool, bool]:
    if isinstance(pbc, torch.Tensor):
        pbc = pbc.detach().cpu().tolist()
    if isinstance(pbc, (bool, int)) or (hasattr(pbc, "dtype") and getattr(pbc, "ndim", 1) == 0):
        pbc = [bool(pbc)] * 3
    pbc = tuple(bool(p) for p in pbc)
    if len(pbc) != 3:
        raise ValueError(f"pbc must have 3 entries, got {pbc!r}")
    return pbc  # type: ignore[return-value]


def check_cell(cell: torch.Tensor, pbc: Sequence[bool]) -> None:
    """Raise ValueError if the cell vectors of the periodic directions are degenerate or not finite."""
    periodic = [d for d in range(3) if pbc[d]]
    if not periodic:
        return
    rows = cell.detach()[periodic].to(torch.float64).cpu()
    if not torch.isfinite(rows).all():
        raise ValueError(f"cell contains NaN or inf in periodic direction(s) {periodic}")
    lengths = rows.norm(dim=1)
    scale = float(lengths.max())
    for d, length in zip(periodic, lengths.tolist()):
        if length <= 1e-12 * max(scale, 1.0) or length == 0.0:
            raise ValueError(
                f"cell vector {d} has zero length but pbc[{d}] is True: a periodic direction needs a "
                f"cell vector of nonzero length (cell volume would be zero)"
            )
    # the periodic vectors must be linearly independent
    s = torch.linalg.svdvals(rows / lengths[:, None])
    if float(s.min()) < 1e-8:
        raise ValueError(
            f"cell vectors of the periodic directions {periodic} are linearly dependent (zero cell volume)"
        )


def _basis(cell: np.ndarray, pbc: Tuple[bool, bool, bool]) -> np.ndarray:
    """Cell with the rows of open directions replaced by orthonormal vectors orthogonal to the periodic rows
    (host arithmetic: a 3x3 problem costs more as device ops than it computes)."""
    periodic = [d for d in range(3) if pbc[d]]
    open_ = [d for d in range(3) if not pbc[d]]
    basis = np.array(cell, dtype=np.float64)
    if len(periodic) == 3:
        return basis
    if len(periodic) == 0:
        return np.eye(3)
    if len(periodic) == 2:
        n = np.cross(cell[periodic[0]], cell[periodic[1]])
        basis[open_[0]] = n / np.linalg.norm(n)
        return basis
    v = cell[periodic[0]] / np.linalg.norm(cell[periodic[0]])
    e = np.zeros(3)
    e[int(np.argmin(np.abs(v)))] = 1.0
    u1 = np.cross(v, e)
    u1 = u1 / np.linalg.norm(u1)
    u2 = np.cross(v, u1)
    basis[open_[0]] = u1
    basis[open_[1]] = u2 / np.linalg.norm(u2)
    return basis


def _grid(pbc, inv_col_norm, fmin, fmax, cutoff: float, bins_per_cutoff: int):
    """(n_bins, width, origin, reach) per direction: bins about ``cutoff / bins_per_cutoff`` wide, width and
    origin in fractional units, reach = how many bins apart a pair closer than the cutoff can be."""
    n_bins, width, origin, reach = [], [], [], []
    target = cutoff * (1.0 + _SLACK) / bins_per_cutoff  # bin width (distance units) we aim for
    for d in range(3):
        if pbc[d]:
            height = 1.0 / inv_col_norm[d]
            nb = max(1, min(_MAX_BINS_PER_DIM, int(math.floor(height / target))))
            w = 1.0 / nb
            o = 0.0
        else:
            extent = fmax[d] - fmin[d]
            w = max(target * inv_col_norm[d], extent / _MAX_BINS_PER_DIM)
            nb = max(1, int(math.floor(extent / w)) + 1)
            o = fmin[d]
        # pairs closer than cutoff are at most ceil(cutoff / bin width) bins apart
        k = max(1, int(math.ceil(cutoff * inv_col_norm[d] / w * (1.0 + 1e-9))))
        n_bins.append(nb)
        width.append(w)
        origin.append(o)
        reach.append(k)
    return n_bins, width, origin, reach


def _grid_rows(grid) -> np.ndarray:
    """origin, width, last bin index and bin-id strides as a [4, 3] float64 array (uploaded with inv and cell)."""
    n_bins, width, origin, _ = grid
    return np.array([origin, width, [nb - 1 for nb in n_bins], [n_bins[1] * n_bins[2], n_bins[2], 1]],
                    dtype=np.float64)


def neighbour_list(
    positions: torch.Tensor,
    cell: torch.Tensor | None,
    pbc,
    cutoff: float,
    *,
    max_candidates: int = 1 << 21,
    bins_per_cutoff: int = 2,
    check: bool = True,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """All pairs closer than ``cutoff``.

    Args:
        positions: ``[N, 3]`` Cartesian positions (float32 or float64; float64 recommended), any device.
        cell: ``[3, 3]`` cell, rows are the cell vectors (rows of open directions are ignored). May be None
            for fully open boundary conditions.
        pbc: three booleans.
        cutoff: cutoff radius, > 0.
        max_candidates: upper bound on the number of candidate pairs held in memory at once.
        bins_per_cutoff: bins are about ``cutoff / bins_per_cutoff`` wide; 2 checks ~2.5x fewer candidate
            pairs than 1 for dense systems.
        check: validate the cell and positions (finite, non-degenerate periodic cell vectors). Callers that
            validated on the host already may pass False to save device->host synchronisations.
        backend: ``"auto"`` (the CUDA kernels for CUDA positions when CuPy is installed, else torch ops),
            ``"torch"`` or ``"cuda"``. ``max_candidates`` bounds the torch path only.

    Returns:
        ``edge_index`` (int64, ``[2, E]``, ``[sender, receiver]``, sorted by receiver) and ``unit_shifts``
        (int64, ``[E, 3]``) with ``positions[receiver] - positions[sender] + unit_shifts @ cell`` the edge
        vector.
    """
    pbc = _as_pbc(pbc)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {tuple(positions.shape)}")
    if not (cutoff > 0 and math.isfinite(cutoff)):
        raise ValueError(f"cutoff must be a positive finite number, got {cutoff}")
    dev = positions.device
    kernels = _use_kernels(dev, backend)
    dt = torch.float64  # binning and distances in float64 whatever the input dtype
    pos = positions.detach().to(dt)
    n_atoms = pos.shape[0]
    if cell is None:
        if any(pbc):
            raise ValueError("a cell is required for periodic boundary conditions")
        cell = torch.zeros(3, 3, dtype=dt)
    # the 3x3 algebra runs on the host (a CUDA cell costs one device->host copy: pass it on the CPU)
    cell_h = cell.detach().to(device="cpu", dtype=dt)
    if n_atoms == 0:
        return _no_edges(dev)
    if check:
        check_cell(cell_h, pbc)
        if not bool(torch.isfinite(pos).all()):
            raise ValueError("positions contain NaN or inf")

    cell_np = cell_h.numpy()
    inv_np = np.linalg.inv(_basis(cell_np, pbc))  # frac = pos @ inv
    inv_col_norm = np.linalg.norm(inv_np, axis=0).tolist()  # 1 / height of the cell (1 for open directions)
    # grid: bins along each direction; along open directions it spans the atoms' fractional extent (one
    # device->host read), so a fully periodic system uploads its table at once and reads nothing back
    if all(pbc):
        grid = _grid(pbc, inv_col_norm, [0.0] * 3, [0.0] * 3, cutoff, bins_per_cutoff)
    else:
        frac = _rows_times(pos, _to_device(torch.from_numpy(inv_np), dev))
        stats = torch.cat([frac.min(dim=0).values, frac.max(dim=0).values]).cpu().tolist()
        grid = _grid(pbc, inv_col_norm, stats[0:3], stats[3:6], cutoff, bins_per_cutoff)
    n_bins, _, _, reach = grid
    table = _to_device(torch.from_numpy(np.concatenate([inv_np, cell_np, _grid_rows(grid)])), dev)
    if kernels:
        return _neighbours_cuda(pos, table, pbc, n_bins, reach, cutoff)
    cell = table[3:6]
    pos_w, offs_l, b, bin_id = _bin_torch(pos, table, pbc)
    order = torch.argsort(bin_id, stable=True)
    sorted_id = bin_id[order]
    pbc_t = torch.tensor(pbc, device=dev)
    nb_t = torch.tensor(n_bins, dtype=torch.long, device=dev)
    strides = torch.tensor([n_bins[1] * n_bins[2], n_bins[2], 1], dtype=torch.long, device=dev)
    uniq, counts = torch.unique_consecutive(sorted_id, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts

    # neighbouring bin offsets
    rng = [torch.arange(-k, k + 1, device=dev) for k in reach]
    delta = torch.stack(torch.meshgrid(*rng, indexing="ij"), dim=-1).reshape(-1, 3)  # [n_off, 3]

    # for every receiver and offset: the sender bin, its image shift, start and count
    def lookup(recv: torch.Tensor):
        gb = b[recv][:, None, :] + delta[None, :, :]  # [R, n_off, 3] global bin
        img = torch.div(gb, nb_t, rounding_mode="floor")
        cb = gb - img * nb_t
        valid = (pbc_t | (img == 0)).all(dim=-1)
        img = torch.where(pbc_t, img, torch.zeros_like(img))
        q = (cb * strides).sum(-1)
        p = torch.searchsorted(uniq, q).clamp(max=uniq.numel() - 1)
        found = valid & (uniq[p] == q)
        cnt = torch.where(found, counts[p], torch.zeros_like(p))
        return img, starts[p], cnt

    # chunk the receivers so that at most max_candidates candidate pairs exist at a time
    per_recv_rows = max(1, int(max_candidates) // (4 * delta.shape[0]))  # lookups hold ~12 ints per entry
    cand_per_atom = []
    cached = None
    for s0 in range(0, n_atoms, per_recv_rows):
        recv = torch.arange(s0, min(n_atoms, s0 + per_recv_rows), device=dev)
        res = lookup(recv)
        if s0 == 0 and recv.numel() == n_atoms:
            cached = res
        cand_per_atom.append(res[2].sum(dim=1))
    cand_per_atom = torch.cat(cand_per_atom)
    csum = torch.cumsum(cand_per_atom, 0)
    total = int(csum[-1])
    bounds = [0]
    if total > max_candidates:
        # greedy: every chunk holds <= max_candidates candidates (or a single receiver)
        csum_h = csum.cpu()
        while bounds[-1] < n_atoms:
            lo = bounds[-1]
            base = int(csum_h[lo - 1]) if lo > 0 else 0
            hi = int(torch.searchsorted(csum_h, torch.tensor(base + max_candidates), right=True))
            bounds.append(min(n_atoms, max(hi, lo + 1)))
    else:
        bounds.append(n_atoms)

    rc2 = cutoff * cutoff
    n_off = delta.shape[0]
    pos_sorted = pos_w[order]
    senders, receivers, shifts = [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        recv = torch.arange(lo, hi, device=dev)
        img, st, cnt = cached if (cached is not None and lo == 0 and hi == n_atoms) else lookup(recv)
        img = img.reshape(-1, 3)
        cnt_f = cnt.reshape(-1)
        m = int(cnt_f.sum())
        if m == 0:
            continue
        # per (receiver, offset) group: receiver position minus the sender image translation
        base = (pos_w[recv][:, None, :] - (img.to(dt) @ cell).reshape(-1, n_off, 3)).reshape(-1, 3)
        grp = torch.repeat_interleave(torch.arange(cnt_f.numel(), device=dev), cnt_f, output_size=m)
        # index into the bin-sorted atoms: start of the group's bin + rank inside the group
        first = st.reshape(-1) - (torch.cumsum(cnt_f, 0) - cnt_f)
        idx = torch.arange(m, device=dev) + first[grp]
        vec = base[grp] - pos_sorted[idx]
        keep = (vec * vec).sum(-1) < rc2
        grp, idx = grp[keep], idx[keep]
        snd = order[idx]
        rcv = recv[torch.div(grp, n_off, rounding_mode="floor")]
        t = img[grp]
        notself = (snd != rcv) | (t != 0).any(-1)
        snd, rcv, t = snd[notself], rcv[notself], t[notself]
        senders.append(snd)
        receivers.append(rcv)
        shifts.append(-t - offs_l[rcv] + offs_l[snd])
    if not senders:
        return _no_edges(dev)
    edge_index = torch.stack([torch.cat(senders), torch.cat(receivers)])
    return edge_index, torch.cat(shifts)


def _no_edges(dev: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(2, 0, dtype=torch.long, device=dev), torch.zeros(0, 3, dtype=torch.long, device=dev)


def _rows_times(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``a @ m`` for ``[N, 3] @ [3, 3]``, spelt ``(a0 * m0 + a1 * m1) + a2 * m2`` with each operation rounded on its
    own: the order and roundings of the CUDA path's binning kernel."""
    return (a[:, 0:1] * m[0] + a[:, 1:2] * m[1]) + a[:, 2:3] * m[2]


def _bin_torch(pos: torch.Tensor, table: torch.Tensor, pbc):
    """(pos_w, offs, bins, bin_id): atoms wrapped into the cell along periodic directions (pos = pos_w + offs @
    cell, offs integer) and binned. ``table``: rows inv (3), cell (3), origin, width, last bin, strides."""
    frac = _rows_times(pos, table[0:3])
    offs = torch.floor(frac)
    for d in range(3):
        if not pbc[d]:
            offs[:, d] = 0.0
    pos_w = pos - _rows_times(offs, table[3:6])
    # bins in float64 (integers below 2^53: exact); the minimum: rounding at the upper cell face
    b = torch.minimum(torch.floor((frac - offs - table[6]) / table[7]).clamp(min=0.0), table[8])
    return pos_w, offs.to(torch.long), b.to(torch.long), (b * table[9]).sum(dim=1).to(torch.long)


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A small host tensor on ``dev``: from pinned memory without blocking on CUDA (a pageable copy would wait)."""
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def _nl_function(kind: str, device_index: int):
    from ..backends.cuda import codegen, compiled

    return compiled("neighbours", kind, device_index, lambda: {
        "name": f"mace_accel_nl_{kind}", "source": codegen.template_text("neighbours.cu")})


def _neighbours_cuda(pos, table, pbc, n_bins, reach, cutoff):
    """:func:`neighbour_list`'s CUDA path (kernels/neighbours.cu): bin the atoms (nl_bin: the values of
    :func:`_bin_torch`), sort them by bin, then per chunk of receivers count, prefix-sum, one read of the edge
    count, fill."""
    from ..backends.cuda import device_index, run_on_torch_stream

    dev = pos.device
    n_atoms = pos.shape[0]
    index = device_index(dev)
    pbc_mask = sum(1 << d for d in range(3) if pbc[d])
    pos = pos.contiguous()
    pos_w = torch.empty_like(pos)
    offs_l, b = (torch.empty(n_atoms, 3, dtype=torch.long, device=dev) for _ in range(2))
    bin_id = torch.empty(n_atoms, dtype=torch.long, device=dev)
    run_on_torch_stream(_nl_function("bin", index), dev, -(-n_atoms // NL_THREADS), NL_THREADS,
                        (pos.data_ptr(), table.data_ptr(), pos_w.data_ptr(), offs_l.data_ptr(), b.data_ptr(),
                         bin_id.data_ptr(), n_atoms, pbc_mask))
    order = torch.argsort(bin_id, stable=True)
    sorted_id = bin_id[order]
    pos_sorted = pos_w[order]
    count, fill = _nl_function("count", index), _nl_function("fill", index)
    cell = table[3:6]
    n_off = math.prod(2 * k + 1 for k in reach)
    rows = max(1, NL_MAX_SLOTS // n_off)
    edge_chunks, shifts = [], []  # per chunk of receivers: [2, E_chunk] edge index, [E_chunk, 3] shifts
    for r0 in range(0, n_atoms, rows):
        slots = (min(n_atoms, r0 + rows) - r0) * n_off
        blocks = -(-slots // NL_THREADS)
        counts = torch.empty(slots, dtype=torch.int32, device=dev)

        def launch(fn, ends=None, outs=(None, None, None)):  # the count kernel reads neither (null pointers)
            ptrs = tuple(0 if t is None else t.data_ptr() for t in (ends, *outs))
            run_on_torch_stream(fn, dev, blocks, NL_THREADS, (
                pos_w.data_ptr(), b.data_ptr(), pos_sorted.data_ptr(), sorted_id.data_ptr(), order.data_ptr(),
                offs_l.data_ptr(), cell.data_ptr(), counts.data_ptr(), *ptrs, r0, slots, n_atoms, *n_bins,
                *reach, pbc_mask, float(cutoff) * float(cutoff)))

        launch(count)
        ends = torch.cumsum(counts, 0)
        total = int(ends[-1])  # the one device->host read: the size of the outputs
        if total == 0:
            continue
        edges = torch.empty(2, total, dtype=torch.long, device=dev)  # written in place when there is one chunk
        shifts.append(torch.empty(total, 3, dtype=torch.long, device=dev))
        launch(fill, ends, (edges[0], edges[1], shifts[-1]))
        edge_chunks.append(edges)
    if not edge_chunks:
        return _no_edges(dev)
    if len(edge_chunks) == 1:
        return edge_chunks[0], shifts[0]
    return torch.cat(edge_chunks, dim=1), torch.cat(shifts)
