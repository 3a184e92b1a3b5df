// mace_accel: one output part of the fused conv kernel (rendered once per part by codegen.py, then
// included in tp_conv.cu). A part owns whole output blocks (all paths into them): its lane state is
// only those blocks' accumulators / gradient rows, so a large problem splits into several light warps
// instead of one warp whose state spills.
__device__ __forceinline__ void $$NAME$$_part$$PART$$(CONV_PARAMS, const index_t item, const int chunk,
                                                   const int lane, scalar_t* __restrict__ dx_stage,
                                                   scalar_t* __restrict__ row_stage)
{
    (void)dx_stage;  // this warp's shared-memory stage for the coalesced dx atomics (or null)
    (void)row_stage;  // this warp's STAGE_BUFFERS buffers of rows copied ahead (STAGE_SLOTS values per lane each;
                      // the ring: the block's STAGE_BUFFERS slots, then their mbarriers)
    constexpr int STAGE_SLOTS = $$STAGE_SLOTS$$;
    constexpr int STAGE_AHEAD = $$STAGE_AHEAD$$;  // edges copied ahead of the one being contracted
    constexpr int STAGE_BUFFERS = STAGE_AHEAD + 1;
    constexpr int PART_ID = $$PART$$;  // this part's slice of DY
    (void)PART_ID;
    const int u = chunk * WARP_SIZE + lane;
$$STAGE_INIT$$

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
    // runs variant: a run ends at the latest with its batch of WARP_SIZE edges (last_of_run below)
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
#if PREFETCH_EDGES > 0
        // the first PREFETCH_EDGES edges of the batch (lane q holds edge q); later ones inside the loop
        const bool prefetcher = (PART_ID == 0 && chunk == 0);
        if (prefetcher) prefetch_weight_rows(W, W2, my_e, w_stride, lane < PREFETCH_EDGES && lane < batch);
#endif
        if (STAGE_SLOTS > 0) {  // the batch's first STAGE_AHEAD edges into buffers 0.. (later ones in the loop)
$$STAGE_FIRST$$
        }
#pragma unroll $$EDGE_UNROLL$$
        for (int q = 0; q < batch; ++q) {
            const index_t e = __shfl_sync(0xffffffffu, my_e, q);
            const index_t key = __shfl_sync(0xffffffffu, my_key, q);
            const index_t other = __shfl_sync(0xffffffffu, my_other, q);
            const scalar_t* __restrict__ stg = row_stage + (q % STAGE_BUFFERS) * STAGE_SLOTS * WARP_SIZE;
            (void)stg;
            if (STAGE_SLOTS > 0) {  // copy edge q + STAGE_AHEAD's rows into its buffer, then wait for edge q's
                const index_t e_next = __shfl_sync(0xffffffffu, my_e, (q + STAGE_AHEAD) & (WARP_SIZE - 1));
                const index_t s_next = __shfl_sync(0xffffffffu, my_other, (q + STAGE_AHEAD) & (WARP_SIZE - 1));
                if (q + STAGE_AHEAD < batch) {
$$STAGE_NEXT$$
                }
$$STAGE_WAIT$$
            }
#if PREFETCH_EDGES > 0
            if (prefetcher) {  // warp-uniform
                const index_t ahead = __shfl_sync(0xffffffffu, my_e, (q + PREFETCH_EDGES) & (WARP_SIZE - 1));
                prefetch_weight_rows(W, W2, ahead, w_stride, lane == 0 && q + PREFETCH_EDGES < batch);
            }
#endif
#if !SEGMENTED
            // a run ends where the next key differs or the batch ends (the next batch reloads nothing when it
            // continues the key: only the accumulators are flushed and zeroed)
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
$$STAGE_RELEASE$$
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
