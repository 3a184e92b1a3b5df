"""Probe: how fast can the weight-row traffic of our conv kernels go, in our edge order? (GPU machine)

    python scripts/row_order_probe.py

The backward and double backward kernels walk the edges grouped by receiver, so each edge's weight row
(4-5 KB for layer 0 float64 / medium layer 1 float32) is read and written at a scattered address. This probe
times the bare row traffic of those kernels, without any tensor product, in three edge orders (memory order,
the receiver grouping our kernels use, a random permutation):

* ``read1``  read W[e]                         (the forward's weight bytes)
* ``rw``     read W[e], write D[e]             (the backward: W in, dW out)
* ``r2w``    read W[e] and V[e], write D[e]     (the double backward: W and ggW in, ddW out)
* ``rwp``    read W[e], write D[p]              (rw with the writes in processing order: which half is slow)
* ``rwb``    read W[e], write D[e] through shared memory with one sm_90 bulk store per row (double-buffered)

Each block of 128 threads takes 32 consecutive positions of the order (as a run of our kernels does) and the
threads stride over the row. Next to them: torch's own ``copy_`` and ``add`` on the same tensors (memory
order), and our real kernels alone (forward, atomic backward, no-gg double backward; part_sweep's calls) on
the same graph. CUDA events, median of 20 after 3 warm-ups.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import part_sweep as P  # noqa: E402
import torch  # noqa: E402

import cupy  # noqa: E402

from mace_accel.backends import cuda as B  # noqa: E402

SRC = r"""
typedef SCALAR scalar_t;
extern "C" __global__ void __launch_bounds__(128) rows(const scalar_t* __restrict__ W, const scalar_t* __restrict__ V,
        scalar_t* __restrict__ D, const long long* __restrict__ perm, const long long num_edges, const long long mode)
{
    const long long p0 = (long long)blockIdx.x * 32;
    const long long p1 = p0 + 32 < num_edges ? p0 + 32 : num_edges;
    scalar_t acc = 0;
    for (long long p = p0; p < p1; ++p) {
        const long long e = perm ? perm[p] : p;
        const scalar_t* w = W + e * WN;
        const scalar_t* v = V + e * WN;
        scalar_t* d = D + e * WN;
        if (mode == 3) d = D + p * WN;
        for (int i = threadIdx.x; i < WN; i += 128) {
            if (mode == 0) acc += w[i];
            else if (mode == 1 || mode == 3) d[i] = w[i] * (scalar_t)1.5;
            else d[i] = w[i] * (scalar_t)1.5 + v[i];
        }
    }
    if (mode == 0 && acc == (scalar_t)12345.678) D[0] = acc;  // keeps the loads; practically never taken
}

extern "C" __global__ void __launch_bounds__(128) rows_bulk(const scalar_t* __restrict__ W,
        const scalar_t* __restrict__ V, scalar_t* __restrict__ D, const long long* __restrict__ perm,
        const long long num_edges, const long long mode)
{
    __shared__ __align__(128) scalar_t buf[2][WN];
    const long long p0 = (long long)blockIdx.x * 32;
    const long long p1 = p0 + 32 < num_edges ? p0 + 32 : num_edges;
    int k = 0;
    for (long long p = p0; p < p1; ++p, ++k) {
        const long long e = perm ? perm[p] : p;
        scalar_t* b = buf[k & 1];
        if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
        __syncthreads();  // the store that last read this buffer is done with it
        for (int i = threadIdx.x; i < WN; i += 128) b[i] = W[e * WN + i] * (scalar_t)1.5;
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        if (threadIdx.x == 0) {
            asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                         :: "l"(__cvta_generic_to_global(D + e * WN)), "r"((unsigned)__cvta_generic_to_shared(b)),
                            "r"((unsigned)(WN * sizeof(scalar_t))) : "memory");
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        }
    }
    if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
"""
#: probe -> (kernel, its mode argument (rows_bulk takes none it reads), row tensors of E x WN it moves)
PROBES = {"read1": ("rows", 0, 1), "rw": ("rows", 1, 2), "r2w": ("rows", 2, 3), "rwp": ("rows", 3, 2),
          "rwb": ("rows_bulk", 0, 2)}
CELLS = (("layer0", "float64"), ("medium1", "float32"), ("large1", "float32"))


def main():
    dev = torch.device("cuda")
    s, r, n, e = P.C.cu_graph_on(dev)
    plans = P.mp0_plans(sorted({c for c, _ in CELLS}))
    orders = {"memory": None, "receiver": torch.sort(r, stable=True).indices.contiguous(),
              "random": torch.randperm(e, device=dev)}
    P.C.gpu_warmup(dev)
    for cfg, dname in CELLS:
        plan = plans[cfg]
        dtype = getattr(torch, dname)
        wn = plan.weight_numel
        mod = cupy.RawModule(code=SRC.replace("SCALAR", "float" if dname == "float32" else "double")
                             .replace("WN", str(wn)), backend="nvrtc")
        kernels = {name: mod.get_function(name) for name in ("rows", "rows_bulk")}
        W, V, D = (torch.randn(e, wn, device=dev, dtype=dtype) for _ in range(3))
        row_mb = e * wn * W.element_size() / 1e6
        print(f"\n{cfg} {dname}: {e} edges x {wn} weights = {row_mb:.0f} MB per row tensor", flush=True)
        for oname, perm in orders.items():
            for mname, (kname, mode, tensors) in PROBES.items():
                args = (B._ptr(W), B._ptr(V), B._ptr(D), 0 if perm is None else B._ptr(perm), e, mode)
                fn = kernels[kname]
                t = P.C.time_fn(lambda: B.run_on_torch_stream(fn, dev, (e + 31) // 32, 128, args), dev, 3, 20)
                ms = t["median_ms"]
                mb = row_mb * tensors
                print(f"  {oname:8s} {mname:5s} {ms:7.3f} ms  {mb / ms / 1e3:6.2f} TB/s", flush=True)
        for tname, f in (("torch copy_", lambda: D.copy_(W)), ("torch add", lambda: torch.add(W, V, out=D))):
            ms = P.C.time_fn(f, dev, 3, 20)["median_ms"]
            mb = row_mb * (2 if tname == "torch copy_" else 3)
            print(f"  {tname:14s} {ms:7.3f} ms  {mb / ms / 1e3:6.2f} TB/s", flush=True)
        W = V = D = None  # free the rows before our kernels allocate theirs
        calls = P.sweep_calls(plan, P.sweep_inputs(plan, dtype, n, e, dev), s, r, n)
        for kname, mult in (("fwd", 1), ("bwd", 2), ("double_nogg", 3)):
            calls[kname]()
            ms = P.C.time_fn(calls[kname], dev, 3, 20)["median_ms"]
            print(f"  ours {kname:11s} {ms:7.3f} ms  weight rows {row_mb * mult / ms / 1e3:6.2f} TB/s", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
