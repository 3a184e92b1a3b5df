"""Probe: every conv kernel kind on a small graph, for compute-sanitizer (GPU machine).

    compute-sanitizer --tool memcheck --kernel-name kns=mace_accel python scripts/sanitize_conv.py
    (also --tool racecheck / synccheck; initcheck with this filter reports the torch-zeroed buffers our kernels
    read as uninitialised, because the filter leaves torch's fill kernels uninstrumented)
    python scripts/sanitize_conv.py --unroll 3 [--cu-graph] [--no-prefetch] [--bulk]

Runs forward, first-order backward (create_graph) and the double backward (gout with and without grad) of
``TensorProductConv`` (atomic and deterministic variants) and the plain ``TensorProduct`` for the MACE-MP-0
layer configs in float32 and float64, on a random graph with unsorted indices and nodes without edges, so
that the sanitizer sees each kernel the backend launches (staged rows, vector atomics, output parts, unrolled
forwards). Prints each forward's relative error against the reference backend (float64, CPU).
``--unroll N`` sets ``codegen.SMALL_FORWARD_UNROLL`` for both dtypes first (the layer-0 forward walks N edges
per loop iteration; since v15 the kernel spec refuses anything but a power of two, because unroll 3 gave wrong
results: docs/design.md); ``--cu-graph`` uses the benchmark's 160k-edge Cu graph instead (forward only).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # e3nn 0.4.4 on torch >= 2.6
import torch  # noqa: E402

import mace_accel  # noqa: E402
from mace_accel.backends.cuda import codegen  # noqa: E402
from tp_cases import mace_conv_args, random_graph, rel  # noqa: E402


def run_cell(cfg, dtype, deterministic, n, e, sr, forward_only, gen):
    node, sh, mid, ins = mace_conv_args(cfg)
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, deterministic=deterministic).cuda()
    x = torch.randn(n, conv.plan.in1_dim, generator=gen, dtype=dtype).cuda().requires_grad_()
    y = torch.randn(e, conv.plan.in2_dim, generator=gen, dtype=dtype).cuda().requires_grad_()
    w = torch.randn(e, conv.weight_numel, generator=gen, dtype=dtype).cuda().requires_grad_()
    s, r = (t.cuda() for t in sr)
    out = conv(x, y, w, s, r)
    ref = conv(x.detach().double().cpu(), y.detach().double().cpu(), w.detach().double().cpu(), s.cpu(), r.cpu())
    err = rel(out.detach().double().cpu(), ref)
    if not forward_only:
        for gout_grad in (False, True):
            go = torch.randn(out.shape, generator=gen, dtype=dtype).cuda().requires_grad_(gout_grad)
            g = torch.autograd.grad(out, (x, y, w), go, create_graph=True)
            loss = sum((t * torch.randn_like(t)).sum() for t in g)
            torch.autograd.grad(loss, (x, y, w) + ((go,) if gout_grad else ()), retain_graph=True)
    torch.cuda.synchronize()
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["layer0", "medium1", "large1"])
    ap.add_argument("--unroll", type=int, default=0)
    ap.add_argument("--cu-graph", action="store_true")
    ap.add_argument("--no-prefetch", action="store_true", help="codegen.PREFETCH_EDGES off")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--no-stream-weights", action="store_true", help="codegen.STREAM_WEIGHTS off")
    ap.add_argument("--bulk", action="store_true",
                    help='codegen.STAGED_ROWS "bx" two edges ahead for every kind (bulk copies + mbarriers)')
    a = ap.parse_args()
    if a.bulk:
        for kind in (codegen.KIND_FORWARD, codegen.KIND_BACKWARD, codegen.KIND_DOUBLE):
            for dt in ("float32", "float64"):
                codegen.STAGED_ROWS[(kind, dt)] = "bx"
                codegen.STAGE_AHEAD[(kind, dt)] = 2
    if a.unroll:
        codegen.SMALL_FORWARD_UNROLL = {"float32": a.unroll, "float64": a.unroll}
    if a.no_prefetch:
        codegen.PREFETCH_EDGES.clear()
    if a.no_stream_weights:
        codegen.STREAM_WEIGHTS.clear()
    gen = torch.Generator().manual_seed(0)
    if a.cu_graph:
        import _common as C

        s, r, n, e = C.cu_graph_on(torch.device("cuda"))
        sr = (s.cpu(), r.cpu())
    else:
        n, e = 64, 1200
        sr = random_graph(n - 8, e, generator=gen)  # the last 8 nodes have no edges
    for cfg in a.configs:
        for dtype in (getattr(torch, d) for d in a.dtypes):
            for det in (False, True):
                err = run_cell(cfg, dtype, det, n, e, sr, a.cu_graph, gen)
                print(f"{cfg:8s} {str(dtype)[6:]} {'deterministic' if det else 'atomic':13s} forward rel err "
                      f"{err:.1e}", flush=True)
    if not a.cu_graph:  # the plain tensor product (one edge per row, no gather / scatter)
        node, sh, mid, ins = mace_conv_args("medium1")
        for shared in (False, True):
            tp = mace_accel.TensorProduct(node, sh, mid, ins, shared_weights=shared).cuda()
            x = torch.randn(40, tp.plan.in1_dim, device="cuda", requires_grad=True)
            y = torch.randn(40, tp.plan.in2_dim, device="cuda", requires_grad=True)
            w = torch.randn(*(() if shared else (40,)), tp.weight_numel, device="cuda", requires_grad=True)
            g = torch.autograd.grad(tp(x, y, w).square().sum(), (x, y, w), create_graph=True)
            torch.autograd.grad(sum(t.sum() for t in g), (x, y, w))
        torch.cuda.synchronize()
        print("plain tensor product: done", flush=True)


if __name__ == "__main__":
    main()
