// mace_accel: receiver-grouped edge order (CSR) without a sort, for the kernels whose summation order within a
// row may vary from run to run (the atomic variant). Rendered by mace_accel/backends/cuda/__init__.py.
//   csr_count: counts[k + 1] += 1 for every key k (counts[0] stays 0, so an inclusive prefix sum of counts is
//              the row pointer seg_ptr[0..rows]); the block that finishes last writes that prefix sum (one
//              launch instead of a count kernel and a separate scan) and resets the blocks-done ticket
//   csr_place: perm[seg_ptr[k] + atomicSub(&counts[k + 1], 1) - 1] = edge (slots taken from the row's end)
// The counters are a persistent per-stream workspace that these two kernels leave zeroed: every count that
// csr_count adds, csr_place takes away again, and the ticket is reset by the block that read it last. So no
// launch has to clear them first (a torch.zeros is ~10-30 us of host time).
// Keys outside [0, rows) are skipped by both kernels (the modules validate indices first unless
// check_inputs=False; skipping keeps an unchecked bad index from writing out of bounds).
typedef long long index_t;

#define CSR_WARP 32
// Items per thread of one tile of the last block's scan (a tile is blockDim.x * CSR_SCAN_ITEMS rows).
#define CSR_SCAN_ITEMS 8

// Exclusive prefix sum of v over the block (blockDim.x a multiple of CSR_WARP, <= CSR_WARP * CSR_WARP); also
// returns the block total in *total. warp_sums: shared scratch of blockDim.x / CSR_WARP entries.
__device__ __forceinline__ index_t csr_block_exclusive(index_t v, index_t* warp_sums, index_t* total)
{
    const int lane = threadIdx.x % CSR_WARP, warp = threadIdx.x / CSR_WARP, warps = blockDim.x / CSR_WARP;
    index_t inc = v;
#pragma unroll
    for (int d = 1; d < CSR_WARP; d *= 2) {
        const index_t o = __shfl_up_sync(0xffffffffu, inc, d);
        if (lane >= d) inc += o;
    }
    if (lane == CSR_WARP - 1) warp_sums[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        index_t s = lane < warps ? warp_sums[lane] : 0;
#pragma unroll
        for (int d = 1; d < CSR_WARP; d *= 2) {
            const index_t o = __shfl_up_sync(0xffffffffu, s, d);
            if (lane >= d) s += o;
        }
        if (lane < warps) warp_sums[lane] = s;  // inclusive over warps
    }
    __syncthreads();
    const index_t before = (warp ? warp_sums[warp - 1] : 0) + inc - v;
    *total = warp_sums[warps - 1];
    __syncthreads();  // warp_sums is reused by the next call
    return before;
}

// counters: counts[rows + 1] (counts[0] stays 0), then one "blocks done" ticket; zero on entry, and the ticket
// zero again on exit (the counts go back to zero in csr_place).
extern "C" __global__ void $$NAME$$_count(const index_t* __restrict__ keys, int* __restrict__ counters,
                                            index_t* __restrict__ seg_ptr, const index_t n, const index_t rows)
{
    __shared__ index_t warp_sums[CSR_WARP];
    __shared__ bool last;
    const index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const index_t k = keys[i];
        if (k >= 0 && k < rows) atomicAdd(&counters[k + 1], 1);
    }
    // the last block to finish sees every count: publish this block's atomics, then take a ticket
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
        last = atomicAdd(reinterpret_cast<unsigned int*>(&counters[rows + 1]), 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (threadIdx.x == 0) counters[rows + 1] = 0;  // every other block has taken its ticket: ready for reuse
    index_t carry = 0;
    const index_t len = rows + 1, tile = (index_t)blockDim.x * CSR_SCAN_ITEMS;
    for (index_t base = 0; base < len; base += tile) {
        const index_t first = base + (index_t)threadIdx.x * CSR_SCAN_ITEMS;
        index_t v[CSR_SCAN_ITEMS], sum = 0;
#pragma unroll
        for (int j = 0; j < CSR_SCAN_ITEMS; ++j) {
            v[j] = first + j < len ? (index_t)__ldcg(&counters[first + j]) : 0;  // L2: where the atomics landed
            sum += v[j];
        }
        index_t total;
        index_t run = carry + csr_block_exclusive(sum, warp_sums, &total);
#pragma unroll
        for (int j = 0; j < CSR_SCAN_ITEMS; ++j) {
            run += v[j];
            if (first + j < len) seg_ptr[first + j] = run;
        }
        carry += total;
    }
}

extern "C" __global__ void $$NAME$$_place(const index_t* __restrict__ keys, const index_t* __restrict__ seg_ptr,
                                            int* __restrict__ counters, index_t* __restrict__ perm,
                                            const index_t n, const index_t rows)
{
    const index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const index_t k = keys[i];
    if (k >= 0 && k < rows) perm[seg_ptr[k] + atomicSub(&counters[k + 1], 1) - 1] = i;
}
