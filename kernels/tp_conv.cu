// mace_accel: fused gather -> channelwise ("uvu") tensor product -> scatter.
// Template rendered by mace_accel/backends/cuda/codegen.py; every $$NAME$$ is replaced there.
//
// Work decomposition (docs/design.md, "kernel plan"):
//   * one warp owns one (work item, channel chunk) pair; lane = channel u within the chunk;
//   * a work item is a run of edges [p0, p1) in processing order (edge e = perm[p], or p);
//       SEGMENTED = 1: item = one output row's CSR segment (deterministic: plain stores, fixed order);
//       SEGMENTED = 0: item = EDGES_PER_WARP consecutive edges in processing order (receiver-sorted by the
//                      host, or the caller's order); accumulators are flushed with atomics whenever the
//                      segment key changes, so a sorted order costs about two flushes per warp;
//   * the CG contraction is unrolled straight-line code, generated from the plan's nonzeros.
// Kernel kinds (KIND):
//   0 forward : acc(out row = receiver) += w * CG(x[sender], y)
//   1 backward: per edge: dw = CG(x, y, g), dy += w * CG(x, ., g), dx = w * CG(., y, g); g = gout[receiver]
//   2 grad-x  : acc(dx row = sender) += w * CG(., y, gout[receiver])   (deterministic dx)
//   3 double backward, fused: given the incoming (ggx, ggy, ggw) = (X2, Y2, W2) of a backward pass,
//     acc(gg row = receiver) += w CG(ggx, y) + w CG(x, ggy) + ggw CG(x, y)   -> OUT2
//     gx[sender] += w CG(., ggy, g) + ggw CG(., y, g)                          -> OUT (atomic)
//     gy[e]       = sum_u w CG(ggx, ., g) + ggw CG(x, ., g)                    -> DY (per chunk)
//     gw[e]       = CG(ggx, y, g) + CG(x, ggy, g)                               -> DW

typedef $$SCALAR$$ scalar_t;
typedef long long index_t;

#define WARP_SIZE $$WARP_SIZE$$
#define NCHUNK $$NCHUNK$$
#define EDGES_PER_WARP $$EDGES_PER_WARP$$
#define SEGMENTED $$SEGMENTED$$
#define KIND $$KIND$$
#define DX_MODE $$DX_MODE$$  // KIND 1 only: 0 none, 1 atomicAdd into dx[sender], 2 store into dx[edge]
#define NEED_DY $$NEED_DY$$
#define NEED_DW $$NEED_DW$$
#define D1 $$D1$$
#define D2 $$D2$$
#define DO $$DO$$
#define WN $$WN$$
#define THREADS $$THREADS$$
#define C(v) ((scalar_t)(v))

extern "C" __global__ void __launch_bounds__(THREADS) $$NAME$$(
    const scalar_t* __restrict__ X,      // [rows_x, D1]   node features (KIND 0, 1)
    const scalar_t* __restrict__ Y,      // [E, D2]        edge attributes (spherical harmonics)
    const scalar_t* __restrict__ W,      // [E, WN] or [WN] (w_stride = 0: shared weights)
    const scalar_t* __restrict__ G,      // [rows_out, DO] gradient of the output (KIND 1, 2)
    const index_t* __restrict__ sender,  // [E] or null (edge e reads row e)
    const index_t* __restrict__ receiver,// [E] or null
    const index_t* __restrict__ perm,    // [E] processing order or null (identity)
    const index_t* __restrict__ seg_ptr, // [items + 1] CSR offsets (SEGMENTED) or null (one edge per item)
    scalar_t* __restrict__ OUT,          // KIND 0: out [rows, DO]; KIND 1: dx [rows_x, D1]; KIND 2: dx
    scalar_t* __restrict__ DY,           // KIND 1: [NCHUNK, E, D2] per-chunk partial sums
    scalar_t* __restrict__ DW,           // KIND 1, 3: [E, WN]
    const scalar_t* __restrict__ X2,     // KIND 3: ggx [rows_x, D1]
    const scalar_t* __restrict__ Y2,     // KIND 3: ggy [E, D2]
    const scalar_t* __restrict__ W2,     // KIND 3: ggw, same layout as W
    scalar_t* __restrict__ OUT2,         // KIND 3: gradient w.r.t. gout [rows_out, DO]
    const index_t num_edges, const index_t num_items, const index_t w_stride)
{
    const int lane = threadIdx.x & (WARP_SIZE - 1);
    const index_t warp = ((index_t)blockIdx.x * THREADS + threadIdx.x) / WARP_SIZE;
    const index_t item = warp / NCHUNK;
    const int chunk = (int)(warp % NCHUNK);
    if (item >= num_items) return;  // whole warps exit together
    const int u = chunk * WARP_SIZE + lane;

#if SEGMENTED
    const index_t p0 = seg_ptr ? seg_ptr[item] : item;
    const index_t p1 = seg_ptr ? seg_ptr[item + 1] : item + 1;
    index_t row = item;
#else
    const index_t p0 = item * EDGES_PER_WARP;
    const index_t p1 = (p0 + EDGES_PER_WARP < num_edges) ? p0 + EDGES_PER_WARP : num_edges;
    index_t row = -1;
#endif

$$SEGMENT_STATE$$

#if SEGMENTED
$$SEGMENT_LOAD$$
#else
    static_assert(EDGES_PER_WARP <= WARP_SIZE, "a run must fit in one batch of edges");
#endif

    // Edges are walked in batches of WARP_SIZE: lane q first loads the indices of edge base + q (one
    // coalesced load per array instead of a dependent chain per edge), then they are broadcast by shuffle.
    for (index_t base = p0; base < p1; base += WARP_SIZE) {
        index_t my_e = 0, my_key = 0, my_other = 0;
        if (base + lane < p1) {
            my_e = perm ? perm[base + lane] : base + lane;
#if KIND == 2
            my_key = sender ? sender[my_e] : my_e;
            my_other = receiver ? receiver[my_e] : my_e;
#else
            my_key = receiver ? receiver[my_e] : my_e;
            my_other = sender ? sender[my_e] : my_e;
#endif
        }
        const int batch = (p1 - base < WARP_SIZE) ? (int)(p1 - base) : WARP_SIZE;
#pragma unroll $$EDGE_UNROLL$$
        for (int q = 0; q < batch; ++q) {
            const index_t e = __shfl_sync(0xffffffffu, my_e, q);
            const index_t key = __shfl_sync(0xffffffffu, my_key, q);
            const index_t other = __shfl_sync(0xffffffffu, my_other, q);
#if !SEGMENTED
            // a run is one warp's batch (EDGES_PER_WARP <= WARP_SIZE); flush when the next key differs
            const index_t next_key = __shfl_sync(0xffffffffu, my_key, (q + 1) & (WARP_SIZE - 1));
            const bool last_of_run = (q + 1 == batch) || (next_key != key);
            if (key != row) {
                row = key;
$$SEGMENT_LOAD$$
            }
#endif
            const scalar_t* __restrict__ y_row = Y + e * D2;
            const scalar_t* __restrict__ w_row = W + e * w_stride;
#if KIND == 3
            const scalar_t* __restrict__ y2_row = Y2 + e * D2;
            const scalar_t* __restrict__ w2_row = W2 + e * w_stride;
#endif
$$EDGE_BODY$$
#if !SEGMENTED
            if (last_of_run) {
$$SEGMENT_END_ATOMIC$$
$$SEGMENT_ZERO$$
            }
#endif
        }
    }

#if SEGMENTED
$$SEGMENT_END_STORE$$
#endif
}
