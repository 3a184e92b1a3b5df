// mace_accel: fused gather -> channelwise ("uvu") tensor product -> scatter.
// Template rendered by mace_accel/backends/cuda/codegen.py; every $$NAME$$ is replaced there.
//
// Work decomposition (docs/design.md, "kernel plan"):
//   * one warp owns one (work item, channel chunk) pair; lane = channel u within the chunk;
//   * a work item is a run of edges [p0, p1) in processing order (edge e = perm[p], or p);
//       SEGMENTED = 1: item = one output row's CSR segment (deterministic: plain stores, fixed order);
//       SEGMENTED = 0: item = EDGES_PER_WARP consecutive edges in the caller's order; accumulators are
//                      flushed with atomics whenever the segment key changes (no sorting needed);
//   * the CG contraction is unrolled straight-line code, generated from the plan's nonzeros.
// Kernel kinds (KIND):
//   0 forward : acc(out row = receiver) += w * CG(x[sender], y)
//   1 backward: per edge: dw = CG(x, y, g), dy += w * CG(x, ., g), dx = w * CG(., y, g); g = gout[receiver]
//   2 grad-x  : acc(dx row = sender) += w * CG(., y, gout[receiver])   (deterministic dx)

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
    scalar_t* __restrict__ DW,           // KIND 1: [E, WN]
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
$$SEGMENT_BEGIN$$
#endif

    for (index_t p = p0; p < p1; ++p) {
        const index_t e = perm ? perm[p] : p;
#if KIND == 2
        const index_t key = sender ? sender[e] : e;
#else
        const index_t key = receiver ? receiver[e] : e;
#endif
#if !SEGMENTED
        if (key != row) {
            if (row >= 0) {
$$SEGMENT_END_ATOMIC$$
            }
            row = key;
$$SEGMENT_BEGIN$$
        }
#endif
        const scalar_t* __restrict__ y_row = Y + e * D2;
        const scalar_t* __restrict__ w_row = W + e * w_stride;
$$EDGE_BODY$$
    }

#if SEGMENTED
$$SEGMENT_END_STORE$$
#else
    if (row >= 0) {
$$SEGMENT_END_ATOMIC$$
    }
#endif
}
