// mace_accel: MACE's symmetric contraction (product basis) for one (node, channel) per thread.
// Template rendered by mace_accel/backends/cuda/sc_codegen.py; every $$NAME$$ is replaced there.
//
//   out[o] = sum over the plan's terms (o, p, k, u) of u * w[k] * monomial_p(x)
// with x = X[node, channel, 0..L) and w = WN[node, 0..K, channel] (per-node weights: the element weights
// already contracted with the node attributes). The terms are unrolled straight-line code, one block per
// monomial; the monomial's value is built from products the compiler shares between blocks.
// KIND 0: forward -> OUT[node, col(o, channel)]
// KIND 1: grad-x from G = d loss / d OUT: DX[node, channel, i]
// KIND 2: grad-w from G: DW[node, k, channel] for one chunk of weights [k_lo, k_hi) (GRAD_W_CHUNK in
//         sc_codegen.py; one launch per chunk)
// Every output element is written by exactly one thread with a plain store: deterministic.

typedef $$SCALAR$$ scalar_t;
typedef long long index_t;

#define KIND $$KIND$$
#define NUM_ELL $$NUM_ELL$$
#define NUM_W $$NUM_W$$
#define NUM_CH $$NUM_CH$$
#define OUT_DIM $$OUT_DIM$$
#define THREADS $$THREADS$$
#define C(v) ((scalar_t)(v))

extern "C" __global__ void __launch_bounds__(THREADS) $$NAME$$(
    const scalar_t* __restrict__ X,    // [N, NUM_CH, NUM_ELL]
    const scalar_t* __restrict__ WN,   // [N, NUM_W, NUM_CH]
    const scalar_t* __restrict__ G,    // [N, OUT_DIM] (KIND 1, 2)
    scalar_t* __restrict__ OUT,        // [N, OUT_DIM] (KIND 0)
    scalar_t* __restrict__ DX,         // [N, NUM_CH, NUM_ELL] (KIND 1)
    scalar_t* __restrict__ DW,         // [N, NUM_W, NUM_CH] (KIND 2)
    const index_t num_nodes)
{
    const index_t t = (index_t)blockIdx.x * THREADS + threadIdx.x;
    if (t >= num_nodes * NUM_CH) return;
    const index_t node = t / NUM_CH;
#if KIND == 2
    // grad-w: a 64-bit channel. With `const int ch` the H100 builds of some grad-w kernels came out wrong
    // (sc_codegen.py's module docstring); the forward and grad-x kernels keep the int channel they were
    // checked and timed with.
    const index_t ch = t - node * NUM_CH;
#else
    const int ch = (int)(t - node * NUM_CH);
#endif
    const scalar_t* __restrict__ xp = X + t * NUM_ELL;
$$LOAD_X$$
    const scalar_t* __restrict__ wp = WN + node * (index_t)(NUM_W * NUM_CH) + ch;
$$LOAD_W$$
#if KIND == 0
$$DECL_OUT$$
$$FORWARD$$
    scalar_t* __restrict__ op = OUT + node * (index_t)OUT_DIM;
$$STORE_OUT$$
#else
    const scalar_t* __restrict__ gp = G + node * (index_t)OUT_DIM;
$$LOAD_G$$
#if KIND == 1
$$DECL_DX$$
$$GRAD_X$$
    scalar_t* __restrict__ dxp = DX + t * NUM_ELL;
$$STORE_DX$$
#else
    scalar_t* __restrict__ dwp = DW + node * (index_t)(NUM_W * NUM_CH) + ch;
$$GRAD_W$$
#endif
#endif
}
