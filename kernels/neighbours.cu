// mace_accel: the cell-list neighbour list (mace_accel/calculator/neighbours.py) on CUDA in three kernels, so a
// neighbour list costs three launches, a sort and one device->host read of the edge count instead of ~40 torch
// ops with their host time and synchronisations. The grid's parameters come from the host and the bin-sorted
// order from torch.argsort; nl_bin (below the pair kernels) wraps and bins the atoms.
//
// One thread per slot (receiver j, neighbouring-bin offset o), o in the order of torch.meshgrid(indexing="ij") over
// [-reach_x, reach_x] x [-reach_y, reach_y] x [-reach_z, reach_z]. The thread finds the sender bin (with its
// periodic image), looks the bin up in the bin-sorted atoms by a binary search, and visits its atoms:
//   nl_count: counts[slot] = number of senders i closer than the cutoff (the zero-shift self pair excluded);
//   nl_fill:  writes them, in bin-sorted order, from ends[slot] - counts[slot] (ends: inclusive prefix sum of the
//             counts over the slots), so the edges come out ordered by receiver, then offset, then rank in the
//             bin: the order of the torch path.
// nl_bin (one thread per atom) wraps and bins the atoms first, with the torch path's operations in its order
// (neighbours._bin_torch): frac = (p0 * inv0 + p1 * inv1) + p2 * inv2, offs = floor(frac) along periodic
// directions, pos_w = pos - ((o0 * cell0 + o1 * cell1) + o2 * cell2), bin = min(max(floor((frac - offs - origin) /
// width), 0), last), bin id = bin . strides; every operation rounded on its own (no fused multiply-add), so both
// paths bin every atom identically.
// Distances use the torch path's arithmetic: base = pos_w[j] - img @ cell, v = base - pos_sorted[i], and
// |v|^2 = (vx*vx + vy*vy) + vz*vz with rounded (not fused) operations, compared with cutoff^2.
typedef long long index_t;

__device__ __forceinline__ index_t nl_floor_div(index_t a, index_t b)
{
    const index_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// Visits the senders of one slot; count-only when out_s is null.
__device__ __forceinline__ int nl_visit(
    const index_t slot, const double* __restrict__ pos_w, const index_t* __restrict__ bins,
    const double* __restrict__ pos_sorted, const index_t* __restrict__ sorted_id, const index_t* __restrict__ order,
    const index_t* __restrict__ offs, const double* __restrict__ cell, index_t r0, index_t n_atoms,
    index_t nbx, index_t nby, index_t nbz, index_t kx, index_t ky, index_t kz, index_t pbc_mask, double rc2,
    index_t* __restrict__ out_s, index_t* __restrict__ out_r, index_t* __restrict__ out_t, index_t at)
{
    const index_t wx = 2 * kx + 1, wy = 2 * ky + 1, wz = 2 * kz + 1;
    const index_t n_off = wx * wy * wz;
    const index_t j = r0 + slot / n_off;
    const index_t o = slot % n_off;
    const index_t delta[3] = {o / (wy * wz) - kx, (o / wz) % wy - ky, o % wz - kz};
    const index_t nb[3] = {nbx, nby, nbz};
    index_t img[3], c[3];
#pragma unroll
    for (int d = 0; d < 3; ++d) {
        const index_t g = bins[3 * j + d] + delta[d];
        img[d] = nl_floor_div(g, nb[d]);
        c[d] = g - img[d] * nb[d];
        if (!((pbc_mask >> d) & 1) && img[d] != 0) return 0;  // no images along an open direction
    }
    const index_t q = (c[0] * nby + c[1]) * nbz + c[2];
    index_t lo = 0, hi = n_atoms;  // first bin-sorted atom with bin id >= q
    while (lo < hi) {
        const index_t mid = (lo + hi) >> 1;
        if (sorted_id[mid] < q) lo = mid + 1; else hi = mid;
    }
    double base[3];
#pragma unroll
    for (int k = 0; k < 3; ++k) {
        const double t0 = __dmul_rn((double)img[0], cell[k]), t1 = __dmul_rn((double)img[1], cell[3 + k]);
        const double t = __dadd_rn(__dadd_rn(t0, t1), __dmul_rn((double)img[2], cell[6 + k]));
        base[k] = __dsub_rn(pos_w[3 * j + k], t);
    }
    const bool zero_shift = img[0] == 0 && img[1] == 0 && img[2] == 0;
    int found = 0;
    for (index_t i = lo; i < n_atoms && sorted_id[i] == q; ++i) {
        const double vx = __dsub_rn(base[0], pos_sorted[3 * i]);
        const double vy = __dsub_rn(base[1], pos_sorted[3 * i + 1]);
        const double vz = __dsub_rn(base[2], pos_sorted[3 * i + 2]);
        const double d2 = __dadd_rn(__dadd_rn(__dmul_rn(vx, vx), __dmul_rn(vy, vy)), __dmul_rn(vz, vz));
        if (!(d2 < rc2)) continue;
        const index_t s = order[i];
        if (s == j && zero_shift) continue;
        if (out_s != nullptr) {
            const index_t e = at + found;
            out_s[e] = s;
            out_r[e] = j;
#pragma unroll
            for (int d = 0; d < 3; ++d) out_t[3 * e + d] = -img[d] - offs[3 * j + d] + offs[3 * s + d];
        }
        ++found;
    }
    return found;
}

// Both kernels take the same arguments (one argument tuple on the host side).
#define NL_KERNEL_PARAMS \
    const double* __restrict__ pos_w, const index_t* __restrict__ bins, const double* __restrict__ pos_sorted, \
    const index_t* __restrict__ sorted_id, const index_t* __restrict__ order, const index_t* __restrict__ offs, \
    const double* __restrict__ cell, int* __restrict__ counts, const index_t* __restrict__ ends, \
    index_t* __restrict__ out_s, index_t* __restrict__ out_r, index_t* __restrict__ out_t, index_t r0, \
    index_t slots, index_t n_atoms, index_t nbx, index_t nby, index_t nbz, index_t kx, index_t ky, index_t kz, \
    index_t pbc_mask, double rc2

extern "C" __global__ void mace_accel_nl_count(NL_KERNEL_PARAMS)
{
    const index_t slot = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (slot >= slots) return;
    counts[slot] = nl_visit(slot, pos_w, bins, pos_sorted, sorted_id, order, offs, cell, r0, n_atoms, nbx, nby, nbz,
                            kx, ky, kz, pbc_mask, rc2, nullptr, nullptr, nullptr, 0);
}

extern "C" __global__ void mace_accel_nl_fill(NL_KERNEL_PARAMS)
{
    const index_t slot = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (slot >= slots || counts[slot] == 0) return;
    nl_visit(slot, pos_w, bins, pos_sorted, sorted_id, order, offs, cell, r0, n_atoms, nbx, nby, nbz, kx, ky, kz,
             pbc_mask, rc2, out_s, out_r, out_t, ends[slot] - counts[slot]);
}

// table: [10][3] float64 rows inv (3), cell (3), origin, width, last bin index, bin-id strides.
extern "C" __global__ void mace_accel_nl_bin(
    const double* __restrict__ pos, const double* __restrict__ table, double* __restrict__ pos_w,
    index_t* __restrict__ offs, index_t* __restrict__ bins, index_t* __restrict__ bin_id, index_t n_atoms,
    index_t pbc_mask)
{
    const index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_atoms) return;
    const double* inv = table;
    const double* cell = table + 9;
    const double p[3] = {pos[3 * i], pos[3 * i + 1], pos[3 * i + 2]};
    double frac[3], o[3];
#pragma unroll
    for (int k = 0; k < 3; ++k) {
        frac[k] = __dadd_rn(__dadd_rn(__dmul_rn(p[0], inv[k]), __dmul_rn(p[1], inv[3 + k])),
                            __dmul_rn(p[2], inv[6 + k]));
        o[k] = ((pbc_mask >> k) & 1) ? floor(frac[k]) : 0.0;
    }
    index_t id = 0;
#pragma unroll
    for (int k = 0; k < 3; ++k) {
        const double shift = __dadd_rn(__dadd_rn(__dmul_rn(o[0], cell[k]), __dmul_rn(o[1], cell[3 + k])),
                                       __dmul_rn(o[2], cell[6 + k]));
        pos_w[3 * i + k] = __dsub_rn(p[k], shift);
        offs[3 * i + k] = (index_t)o[k];
        double v = floor(__ddiv_rn(__dsub_rn(__dsub_rn(frac[k], o[k]), table[18 + k]), table[21 + k]));
        v = v < 0.0 ? 0.0 : v;
        v = v > table[24 + k] ? table[24 + k] : v;
        bins[3 * i + k] = (index_t)v;
        id += (index_t)v * (index_t)table[27 + k];
    }
    bin_id[i] = id;
}
