// mace_accel: receiver-grouped edge order (CSR) without a sort, for the kernels whose summation order within a
// row may vary from run to run (the atomic variant). Rendered by mace_accel/backends/cuda/__init__.py.
//   csr_count: counts[k + 1] += 1 for every key k (counts zeroed; counts[0] stays 0, so an inclusive prefix
//              sum of counts is the row pointer seg_ptr[0..rows])
//   csr_place: perm[seg_ptr[k] + (arrival order within row k)] = edge
// Keys outside [0, rows) are skipped (the modules validate indices first unless check_inputs=False; skipping
// keeps an unchecked bad index from writing out of bounds).
typedef long long index_t;

extern "C" __global__ void $$NAME$$_count(const index_t* __restrict__ keys, int* __restrict__ counts,
                                            const index_t n, const index_t rows)
{
    const index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const index_t k = keys[i];
    if (k >= 0 && k < rows) atomicAdd(&counts[k + 1], 1);
}

extern "C" __global__ void $$NAME$$_place(const index_t* __restrict__ keys, const index_t* __restrict__ seg_ptr,
                                            int* __restrict__ cursor, index_t* __restrict__ perm,
                                            const index_t n, const index_t rows)
{
    const index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const index_t k = keys[i];
    if (k >= 0 && k < rows) perm[seg_ptr[k] + atomicAdd(&cursor[k], 1)] = i;
}
