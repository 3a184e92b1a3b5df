"""A/B: the symmetric-contraction kernels with and without FMA contraction, and the grad-w kernels against the
reference formula the backend runs instead (GPU machine)

    python scripts/sc_fmad_ab.py [--nodes 2048] [--channels 128]

The grad-w kernels come out wrong for some plans on the H100 (scripts/sc_gradw_probe.py, sc_diag.py); one
trial built them without FMA contraction. This prints, for the MACE-MP-0 product
basis (mp-medium, mp-large) in both dtypes: the forward and grad-x kernels built as the backend builds them and
with -fmad=false (time, and relative error against the float64 reference executor), then the weight gradient
by the grad-w kernels built with -fmad=false (one launch per chunk), by the backend (its grad-w kernels: 64-bit
channel, the common options; the reference formula before v36) and by the reference formula on the GPU.
CUDA events, median of 20 after 3 warm-ups; each call alone.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402
import torch  # noqa: E402
from sc_gradw_probe import build  # noqa: E402
from test_symcon import inputs, make_pair, rel  # noqa: E402

import cupy  # noqa: E402
from mace_accel.backends.cuda import sc as csc  # noqa: E402
from mace_accel.backends.cuda.sc_codegen import (KIND_SC_FORWARD, KIND_SC_GRAD_W, KIND_SC_GRAD_X,  # noqa: E402
                                                 SCKernelSpec, grad_w_chunks, render_sc)
from mace_accel.backends.reference import sc as rsc  # noqa: E402

NO_FMA = ("-fmad=false",)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=2048)
    ap.add_argument("--channels", type=int, default=128)
    a = ap.parse_args()
    dev = torch.device("cuda")
    cap = cupy.cuda.Device(0).compute_capability
    C.gpu_warmup(dev)
    n, ch = a.nodes, a.channels
    for case in ("mp-medium", "mp-large"):
        for dtype in (torch.float32, torch.float64):
            _, acc = make_pair(case, channels=ch, dtype=dtype)
            plan = acc._sc_plan
            dt = csc._DTYPES[dtype]
            x, _ = inputs(acc, n, dtype, device="cuda", seed=5)
            wn = torch.randn(n, plan.weight_numel, ch, dtype=dtype, device="cuda")
            g = torch.randn(n, plan.out_dim, dtype=dtype, device="cuda")
            x64, w64, g64 = x.double(), wn.double(), g.double()
            ro = rsc.forward(plan, x64, w64)
            rdx, rdw = rsc.backward(plan, x64, w64, g64, True, True)
            print(f"{case} {dname(dtype)}: {n} nodes x {ch} channels, K = {plan.weight_numel}", flush=True)

            def launcher(fns, out_slot, out):
                ptrs = [x, wn, g, None, None, None]
                ptrs[out_slot] = out
                return lambda: [csc._launch_function(fn, plan, x, *ptrs) for fn in fns]

            for kind, want, slot in ((KIND_SC_FORWARD, ro, 3), (KIND_SC_GRAD_X, rdx, 4)):
                r = render_sc(plan, SCKernelSpec(kind, dt))
                for label, extra in (("backend", ()), ("-fmad=false", NO_FMA)):
                    out = torch.full(want.shape, float("nan"), dtype=dtype, device="cuda")
                    call = launcher([build(r["source"], r["name"], f"sm_{cap}", extra)], slot, out)
                    call()
                    torch.cuda.synchronize()
                    err = rel(out.double(), want)
                    ms = C.time_fn(call, dev, 3, 20)["median_ms"]
                    print(f"  {'forward' if kind == KIND_SC_FORWARD else 'grad-x':8s} {label:12s} {ms:8.3f} ms  "
                          f"rel {err:.2e}", flush=True)
            fns = []
            for lo, hi in grad_w_chunks(plan):
                r = render_sc(plan, SCKernelSpec(KIND_SC_GRAD_W, dt, lo, hi))
                fns.append(build(r["source"], r["name"], f"sm_{cap}", NO_FMA))
            dw = torch.full_like(wn, float("nan"))
            call = launcher(fns, 5, dw)
            call()
            torch.cuda.synchronize()
            err_k = rel(dw.double(), rdw)
            ms_k = C.time_fn(call, dev, 3, 20)["median_ms"]
            dw_b = csc.backward(plan, x, wn, g, False, True)[1]  # the backend's grad-w (its own build)
            torch.cuda.synchronize()
            err_b = rel(dw_b.double(), rdw)
            ms_b = C.time_fn(lambda: csc.backward(plan, x, wn, g, False, True), dev, 3, 20)["median_ms"]
            dw_r = rsc.backward(plan, x, wn, g, False, True)[1]
            err_r = rel(dw_r.double(), rdw)
            ms_r = C.time_fn(lambda: rsc.backward(plan, x, wn, g, False, True), dev, 3, 20)["median_ms"]
            print(f"  grad-w   -fmad=false  {ms_k:8.3f} ms  rel {err_k:.2e}   backend {ms_b:8.3f} ms  rel {err_b:.2e}   "
                  f"reference formula {ms_r:8.3f} ms  rel {err_r:.2e}", flush=True)
            torch.cuda.empty_cache()


def dname(dtype) -> str:
    return str(dtype).replace("torch.", "")


if __name__ == "__main__":
    main()
