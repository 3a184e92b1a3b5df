"""Quick GPU timing of our conv kernels alone (the side-by-side peer benchmark is benchmarks/bench_conv.py).

    python scripts/quick_timing.py [--edges 160000] [--nodes 2048] [--json OUT.json]

Random graph with the given size, receivers sorted (as the calculator's neighbour list gives them) and
shuffled; CUDA events, warm-up, median. Prints ms and the fraction of measured copy bandwidth reached for the
forward pass (bytes: W, Y, X, indices read once, output written once).
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import torch  # noqa: E402

import _common as C  # noqa: E402
import mace_accel  # noqa: E402
from tp_cases import mace_conv_args  # noqa: E402


def timeit(fn, reps=30, warmup=5):
    return C.time_fn(fn, torch.device("cuda"), warmup, reps)["median_ms"]


def copy_bandwidth():
    a = torch.empty(2**28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = timeit(lambda: b.copy_(a), reps=20)
    return 2 * a.numel() * 4 / (ms * 1e-3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edges", type=int, default=160_000)
    ap.add_argument("--nodes", type=int, default=2048)
    ap.add_argument("--json", default=None)
    ap.add_argument("--unroll-sweep", action="store_true",
                    help="time the segmented forward with 1, 2, 4, 8 edges per loop iteration instead")
    args = ap.parse_args()
    if args.unroll_sweep:
        return unroll_sweep(args)
    bw = copy_bandwidth()
    from mace_accel.backends import cuda as cuda_backend

    keys = torch.randint(0, args.nodes, (args.edges,), device="cuda")
    print(f"sort of {args.edges} int64 keys: {timeit(lambda: torch.sort(keys)):.3f} ms, as int32: "
          f"{timeit(lambda: torch.sort(keys.int())):.3f} ms; csr(): "
          f"{timeit(lambda: cuda_backend.csr(keys, args.nodes)):.3f} ms", flush=True)
    rows = []
    for layer in ("layer0", "medium1", "large1"):
        node, sh, mid, ins = mace_conv_args(layer)
        for dtype in (torch.float32, torch.float64):
            for order in ("shuffled",):
                for det in (False, True):
                    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=det, check_inputs=False)
                    E, N = args.edges, args.nodes
                    r = torch.sort(torch.randint(0, N, (E,), device="cuda"))[0]
                    if order == "shuffled":
                        r = r[torch.randperm(E, device="cuda")]
                    s = torch.randint(0, N, (E,), device="cuda")
                    x = torch.randn(N, node.dim, device="cuda", dtype=dtype, requires_grad=True)
                    y = torch.randn(E, sh.dim, device="cuda", dtype=dtype, requires_grad=True)
                    w = torch.randn(E, conv.weight_numel, device="cuda", dtype=dtype, requires_grad=True)
                    fwd = timeit(lambda: conv(x, y, w, s, r))
                    go = torch.randn(N, mid.dim, device="cuda", dtype=dtype)

                    def fb():
                        out = conv(x, y, w, s, r)
                        torch.autograd.grad(out, (x, y, w), go)

                    fwdbwd = timeit(fb)
                    es = torch.finfo(dtype).bits // 8
                    nbytes = es * (E * conv.weight_numel + E * sh.dim + N * node.dim + N * mid.dim) + 16 * E
                    rows.append(dict(layer=layer, dtype=str(dtype)[6:], order=order, variant=str(det),
                                     fwd_ms=fwd, fwdbwd_ms=fwdbwd, fwd_bytes=nbytes,
                                     fwd_frac_copy_bw=nbytes / (fwd * 1e-3) / bw))
                    print(f"{layer:8s} {rows[-1]['dtype']:8s} {order:8s} {str(det):5s} fwd {fwd:7.3f} ms "
                          f"fwd+bwd {fwdbwd:7.3f} ms  fwd at {100 * rows[-1]['fwd_frac_copy_bw']:5.1f}% of copy bw",
                          flush=True)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s on {torch.cuda.get_device_name(0)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), copy_bw=bw, edges=args.edges, nodes=args.nodes,
                           rows=rows), f, indent=1)


def unroll_sweep(args):
    """Forward time against the edge-loop unroll factor (every part unrolled; the factor is part of the kernel
    spec, so each one compiles its own kernel)."""
    from mace_accel.backends import cuda as cuda_backend
    from mace_accel.backends.cuda import codegen

    saved = dict(codegen.SMALL_FORWARD_UNROLL), codegen.UNROLL_MAX_ACC_WORDS
    codegen.UNROLL_MAX_ACC_WORDS = 1 << 30  # read at render time: forget kernels rendered with the default
    cuda_backend._FUNCS.clear()
    E, N = args.edges, args.nodes
    r = torch.sort(torch.randint(0, N, (E,), device="cuda"))[0]
    s = torch.randint(0, N, (E,), device="cuda")
    for layer in ("layer0", "medium1", "large1"):
        node, sh, mid, ins = mace_conv_args(layer)
        for dtype in (torch.float32, torch.float64):
            conv = mace_accel.TensorProductConv(node, sh, mid, ins, check_inputs=False)
            x = torch.randn(N, node.dim, device="cuda", dtype=dtype)
            y = torch.randn(E, sh.dim, device="cuda", dtype=dtype)
            w = torch.randn(E, conv.weight_numel, device="cuda", dtype=dtype)
            times, ref = [], None
            for unroll in (1, 2, 4, 8):
                codegen.SMALL_FORWARD_UNROLL = {"float32": unroll, "float64": unroll}
                out = conv(x, y, w, s, r)
                ref = out if ref is None else ref
                assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
                times.append(timeit(lambda: conv(x, y, w, s, r)))
            print(f"{layer:8s} {str(dtype)[6:]:8s} fwd ms by unroll 1/2/4/8: "
                  + " ".join(f"{t:.3f}" for t in times) + f" (default {saved[0][str(dtype)[6:]]} where the "
                  f"accumulators fit {saved[1]} words)", flush=True)
    codegen.SMALL_FORWARD_UNROLL, codegen.UNROLL_MAX_ACC_WORDS = saved
    cuda_backend._FUNCS.clear()


if __name__ == "__main__":
    main()
