// mace_accel: fused gather -> channelwise ("uvu") tensor product -> scatter.
// Template rendered by mace_accel/backends/cuda/codegen.py; every $$NAME$$ is replaced there.
//
// Work decomposition (docs/design.md, "kernel plan"):
//   * one warp owns one (work item, output part, channel chunk); lane = channel u within the chunk;
//     a part is a set of whole output blocks (one part unless the lane state would not fit in registers);
//   * a work item is a run of edges [p0, p1) in processing order (edge e = perm[p], or p);
//       SEGMENTED = 1: item = one output row's CSR segment (deterministic: plain stores, fixed order);
//       SEGMENTED = 0: item = EDGES_PER_WARP consecutive edges in processing order (receiver-sorted by the
//                      host, or the caller's order), walked in batches of WARP_SIZE; accumulators are
//                      flushed with atomics whenever the segment key changes and at every batch end, so a
//                      sorted order costs about two flushes per batch;
//   * the CG contraction is unrolled straight-line code, generated from the plan's nonzeros;
//   * dx rows of senders (KIND 1 atomic, KIND 3) are added with atomics staged through shared memory, so
//     consecutive lanes add consecutive elements (codegen.COALESCED_DX_ATOMICS).
// Kernel kinds (KIND):
//   0 forward : acc(out row = receiver) += w * CG(x[sender], y)
//   1 backward: per edge: dw = CG(x, y, g), dy += w * CG(x, ., g), dx = w * CG(., y, g); g = gout[receiver]
//   2 grad-x  : acc(dx row = sender) += w * CG(., y, gout[receiver])   (deterministic dx)
//   3 double backward, fused: given the incoming (ggx, ggy, ggw) = (X2, Y2, W2) of a backward pass,
//     acc(gg row = receiver) += w CG(ggx, y) + w CG(x, ggy) + ggw CG(x, y)   -> OUT2
//     gx[sender] += w CG(., ggy, g) + ggw CG(., y, g)                          -> OUT (atomic)
//     gy[e]       = sum_u w CG(ggx, ., g) + ggw CG(x, ., g)                    -> DY (see DY_ATOMIC)
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

#define NPART $$NPART$$
// 1: every (part, chunk) warp adds its dy into the edge's one row of DY with atomics (runs variant);
// 0: it writes its own partial row DY[part * NCHUNK + chunk, e] (summed by the caller in a fixed order)
#define DY_ATOMIC $$DY_ATOMIC$$
#if DY_ATOMIC
#define DY_SLICE(part, chunk) ((index_t)0)
#define DY_PUT(p, v) atomicAdd((p), (v))
#else
#define DY_SLICE(part, chunk) ((index_t)((part) * NCHUNK + (chunk)))
#define DY_PUT(p, v) (*(p) = (v))
#endif
// Edges ahead whose weight rows (W, and W2 in KIND 3) are prefetched into L2 while the current edge is
// contracted (0: off). One warp per item issues them (part 0, chunk 0): the rows are shared by all its warps.
#define PREFETCH_EDGES $$PREFETCH_EDGES$$
#define ROW_BYTES (WN * (int)sizeof(scalar_t))
// 1: per-edge weight rows are streamed (read once): loads and the bulk prefetch carry an L2 evict-first
// policy and dW is written with streaming stores, so the reused x / gradient rows stay in L2.
#define STREAM_W $$STREAM_W$$
#if STREAM_W
#define LOAD_W(p) __ldcs(p)
#define STORE_DW(p, v) __stcs((p), (v))
#else
#define LOAD_W(p) (*(p))
#define STORE_DW(p, v) (*(p) = (v))
#endif

#define CONV_PARAMS \
    const scalar_t* __restrict__ X,          /* [rows_x, D1]   node features (KIND 0, 1) */ \
    const scalar_t* __restrict__ Y,          /* [E, D2]        edge attributes (spherical harmonics) */ \
    const scalar_t* __restrict__ W,          /* [E, WN] or [WN] (w_stride = 0: shared weights) */ \
    const scalar_t* __restrict__ G,          /* [rows_out, DO] gradient of the output (KIND 1, 2) */ \
    const index_t* __restrict__ sender,      /* [E] or null (edge e reads row e) */ \
    const index_t* __restrict__ receiver,    /* [E] or null */ \
    const index_t* __restrict__ perm,        /* [E] processing order or null (identity) */ \
    const index_t* __restrict__ seg_ptr,     /* [items + 1] CSR offsets (SEGMENTED) or null (one edge per item) */ \
    scalar_t* __restrict__ OUT,              /* KIND 0: out [rows, DO]; KIND 1: dx [rows_x, D1]; KIND 2: dx */ \
    scalar_t* __restrict__ DY,               /* KIND 1, 3: [NPART * NCHUNK, E, D2] partial sums per (part, chunk), or [E, D2] (DY_ATOMIC) */ \
    scalar_t* __restrict__ DW,               /* KIND 1, 3: [E, WN] */ \
    const scalar_t* __restrict__ X2,         /* KIND 3: ggx [rows_x, D1] */ \
    const scalar_t* __restrict__ Y2,         /* KIND 3: ggy [E, D2] */ \
    const scalar_t* __restrict__ W2,         /* KIND 3: ggw, same layout as W */ \
    scalar_t* __restrict__ OUT2,             /* KIND 3: gradient w.r.t. gout [rows_out, DO] */ \
    const index_t num_edges, const index_t num_items, const index_t w_stride
#define CONV_ARGS X, Y, W, G, sender, receiver, perm, seg_ptr, OUT, DY, DW, X2, Y2, W2, OUT2, num_edges, num_items, w_stride

static_assert(EDGES_PER_WARP >= 1, "a work item of the runs variant holds at least one edge");
static_assert(PREFETCH_EDGES < WARP_SIZE, "prefetch distance must stay inside one batch of edges");

// sm_90: an L2 cache policy that evicts what it reads first (rows used once, STREAM_W); 0 before sm_90.
__device__ __forceinline__ unsigned long long l2_evict_first_policy()
{
    unsigned long long policy = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
#endif
    return policy;
}

// Hint: bring the weight row(s) of edge e into L2 (no registers held, no effect on results): on sm_90+ one
// bulk prefetch per row (16-byte aligned start, size rounded down to 16 bytes); older GPUs skip it.
__device__ __forceinline__ void prefetch_weight_rows(const scalar_t* __restrict__ W, const scalar_t* __restrict__ W2,
                                                     const index_t e, const index_t w_stride, const bool by_this_lane)
{
#if PREFETCH_EDGES > 0 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (w_stride == 0 || !by_this_lane) return;  // shared weights: one row, cached anyway
    const scalar_t* rows[2] = {W + e * w_stride, (KIND == 3) ? W2 + e * w_stride : nullptr};
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        if (rows[k] == nullptr) continue;
        const unsigned long long a = (unsigned long long)__cvta_generic_to_global(rows[k]);
        const unsigned long long start = (a + 15ull) & ~15ull;
        const unsigned long long end = (a + (unsigned long long)ROW_BYTES) & ~15ull;
        if (end > start) {
#if STREAM_W
            asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;"
                         :: "l"(start), "r"((unsigned)(end - start)), "l"(l2_evict_first_policy()));
#else
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;"
                         :: "l"(start), "r"((unsigned)(end - start)));
#endif
        }
    }
#else  // off, or before sm_90: no prefetch
    (void)W; (void)W2; (void)e; (void)w_stride; (void)by_this_lane;
#endif
}

// Rows copied one edge ahead into shared memory (codegen.STAGED_ROWS): each lane copies, and later reads,
// only its own values, so a wait on its own copies is all the ordering needed (no barrier). sm_80+ copies
// asynchronously (cp.async); older GPUs copy synchronously.
__device__ __forceinline__ void stage_copy(scalar_t* dst, const scalar_t* src)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;"
                 :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(__cvta_generic_to_global(src)),
                    "n"((int)sizeof(scalar_t)) : "memory");
#else
    *dst = *src;
#endif
}

__device__ __forceinline__ void stage_commit()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// every copy group but the latest AHEAD is complete (the current edge's; the next ones may still be in flight)
template <int AHEAD>
__device__ __forceinline__ void stage_wait_prev()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" :: "n"(AHEAD) : "memory");
#endif
}

// sm_90 mbarrier steps shared by the bulk-staged rows and the whole-row ring (no-ops before sm_90, where
// neither issues bulk copies).
__device__ __forceinline__ void mbar_init(unsigned long long* bar, const unsigned count)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;"
                 :: "r"((unsigned)__cvta_generic_to_shared(bar)), "r"(count) : "memory");
#else
    (void)bar; (void)count;
#endif
}

// After the calling thread's mbar_init calls: make the initialised barriers visible to the other threads and
// to the bulk-copy unit before any of them uses one.
__device__ __forceinline__ void mbar_init_fence()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// The calling thread arrives on the barrier and announces `bytes` that bulk copies will count in.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned long long* bar, const unsigned bytes)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                 :: "r"((unsigned)__cvta_generic_to_shared(bar)), "r"(bytes) : "memory");
#else
    (void)bar; (void)bytes;
#endif
}

// The calling thread waits until the barrier's phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait_parity(unsigned long long* bar, const unsigned parity)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned addr = (unsigned)__cvta_generic_to_shared(bar);
    unsigned done = 0;
    while (!done) {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(addr), "r"(parity) : "memory");
    }
#else
    (void)bar; (void)parity;
#endif
}

// sm_90: one bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared
// memory, counted in by the mbarrier `bar`; with EVICT_FIRST, read under the L2 cache policy `policy`.
template <bool EVICT_FIRST>
__device__ __forceinline__ void bulk_copy_sm90(scalar_t* dst, const scalar_t* src, const unsigned bytes,
                                               unsigned long long* bar, const unsigned long long policy)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst), b = (unsigned)__cvta_generic_to_shared(bar);
    if (EVICT_FIRST)
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
                     " [%0], [%1], %2, [%3], %4;"
                     :: "r"(d), "l"(__cvta_generic_to_global(src)), "r"(bytes), "r"(b), "l"(policy) : "memory");
    else
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(d), "l"(__cvta_generic_to_global(src)), "r"(bytes), "r"(b) : "memory");
#else
    (void)dst; (void)src; (void)bytes; (void)bar; (void)policy;
#endif
}

// Bulk-staged weight rows (codegen.STAGED_ROWS "b"): the weights of one edge that a warp uses are, per path,
// 32 consecutive values of the row (the chunk's channels), so one lane per path copies them with a single
// sm_90 bulk copy (the copy engine reads each L2 sector once and holds no registers) into the warp's
// buffer; an mbarrier per buffer counts the bytes in. Before sm_90 the lane copies them itself and a warp
// barrier stands in for the mbarrier.
template <int BUFFERS>
__device__ __forceinline__ void bulk_init(unsigned long long* bars)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if ((threadIdx.x & (WARP_SIZE - 1)) == 0) {
        for (int b = 0; b < BUFFERS; ++b) mbar_init(bars + b, 1);
        mbar_init_fence();
    }
#else
    (void)bars;
#endif
    __syncwarp();
}

// Called by the whole warp (warp-uniform): lane 0 announces the bytes the buffer's copies will bring; the
// warp barrier first makes sure every lane has finished reading the buffer's previous edge.
__device__ __forceinline__ void bulk_expect(unsigned long long* bar, const unsigned bytes)
{
    __syncwarp();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if ((threadIdx.x & (WARP_SIZE - 1)) == 0) mbar_arrive_expect_tx(bar, bytes);
    __syncwarp();
#else
    (void)bar; (void)bytes;
#endif
}

// One lane: copy `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared memory.
__device__ __forceinline__ void bulk_copy(scalar_t* dst, const scalar_t* src, const unsigned bytes,
                                          unsigned long long* bar)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    bulk_copy_sm90<false>(dst, src, bytes, bar, 0ull);
#else
    (void)bar;
    for (unsigned k = 0; k < bytes / 16; ++k)
        reinterpret_cast<float4*>(dst)[k] = reinterpret_cast<const float4*>(src)[k];
#endif
}

// The whole warp waits until the buffer's copies have landed; `phase` holds one parity bit per buffer.
__device__ __forceinline__ void bulk_wait(unsigned long long* bar, const int buffer, unsigned& phase)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    mbar_wait_parity(bar, (phase >> buffer) & 1u);
#else
    (void)bar;
    __syncwarp();
#endif
    phase ^= 1u << buffer;
}

// Whole-row ring (codegen stage "r"): the block's warps are the NCHUNK channel chunks of one work item, so
// they contract the same edges in the same order and together use every value of each edge's weight row(s).
// One lane (chunk 0) copies the whole row (W, and W2 in KIND 3) of an edge STAGE_AHEAD edges ahead into a
// slot of a block-shared ring with one sm_90 bulk copy per row (a few KB each, no registers held); a "full"
// mbarrier per slot counts the bytes in, an "empty" mbarrier per slot counts the threads that have finished
// reading it (each thread arrives for its own reads, so every read is ordered before the slot's next copy
// without relying on a warp barrier), and the copying lane waits on that before it reuses the slot. Slot of
// the edge at running position t (within the item): t % buffers; its use number t / buffers gives the parity
// to wait on.
// Before sm_90 no copies are made and the weights are read from global memory (RING_WEIGHT).
template <int BUFFERS>
__device__ __forceinline__ void ring_init(unsigned long long* bars)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (threadIdx.x == 0) {
        for (int b = 0; b < BUFFERS; ++b) {
            mbar_init(bars + b, 1);                   // full: the copying lane's arrival (and the bytes)
            mbar_init(bars + BUFFERS + b, THREADS);   // empty: every thread of the block
        }
        mbar_init_fence();
    }
#else
    (void)bars;
#endif
    __syncthreads();
}

// One lane: bring edge e's row(s) into slot `buffer` (running position t). Waits until every warp has
// released the slot's previous edge (position t - BUFFERS).
template <int BUFFERS>
__device__ __forceinline__ void ring_issue(scalar_t* slot_rows, unsigned long long* bars, const int buffer,
                                           const index_t t, const scalar_t* __restrict__ W,
                                           const scalar_t* __restrict__ W2, const index_t e, const index_t w_stride)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (t >= BUFFERS) mbar_wait_parity(bars + BUFFERS + buffer, (unsigned)((t / BUFFERS - 1) & 1));
    mbar_arrive_expect_tx(bars + buffer, (unsigned)ROW_BYTES * ((KIND == 3) ? 2u : 1u));
    const scalar_t* rows[2] = {W + e * w_stride, (KIND == 3) ? W2 + e * w_stride : nullptr};
    // STREAM_W: the rows are read once, evict them from L2 first
    const unsigned long long policy = STREAM_W ? l2_evict_first_policy() : 0ull;
#pragma unroll
    for (int k = 0; k < 2; ++k)
        if (rows[k] != nullptr)
            bulk_copy_sm90<STREAM_W != 0>(slot_rows + k * WN, rows[k], (unsigned)ROW_BYTES, bars + buffer, policy);
#else
    (void)slot_rows; (void)bars; (void)buffer; (void)t; (void)W; (void)W2; (void)e; (void)w_stride;
#endif
}

// Every thread: it has finished reading the slot (one arrival per thread on the slot's "empty" barrier).
__device__ __forceinline__ void ring_release(unsigned long long* empty_bar)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];"
                 :: "r"((unsigned)__cvta_generic_to_shared(empty_bar)) : "memory");
#else
    (void)empty_bar;
#endif
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define RING_WEIGHT(ring_expr, global_expr) (ring_expr)
#else
#define RING_WEIGHT(ring_expr, global_expr) (global_expr)
#endif

$$PARTS$$

extern "C" __global__ void __launch_bounds__($$LAUNCH_BOUNDS$$) $$NAME$$(CONV_PARAMS)
{
    const int lane = threadIdx.x & (WARP_SIZE - 1);
    const index_t warp = ((index_t)blockIdx.x * THREADS + threadIdx.x) / WARP_SIZE;
    // warps of one item are adjacent (its x, y and w rows are read by all its parts and chunks at once)
    const index_t item = warp / (NPART * NCHUNK);
    const int sub = (int)(warp % (NPART * NCHUNK));
    if (item >= num_items) return;  // whole warps exit together
    const int part = sub / NCHUNK;
    (void)part;  // one-part kernels do not switch on it
    const int chunk = sub % NCHUNK;
$$PART_DISPATCH$$
}
