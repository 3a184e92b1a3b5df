"""Diagnostic: each generated symmetric-contraction kernel (forward, grad-x, grad-w) against the reference
executor, repeated with fresh inputs, with the kernels' register and local-memory use.

    python scripts/sc_diag.py [--grad-w-options -fmad=false ...]     (GPU machine)

Forward and grad-x run as the backend launches them. The grad-w kernels (which the backend does not launch:
see mace_accel/backends/cuda/sc.py) are built here with NVRTC, the backend's options plus ``--grad-w-options``
(none by default: the build the backend would make), one launch per chunk of weights.
"""
import argparse
import os
import sys

sys.path.insert(0, "tests")
sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from sc_gradw_probe import build  # noqa: E402
from test_symcon import inputs, make_pair, rel  # noqa: E402

import cupy  # noqa: E402
from cupy.cuda import driver  # noqa: E402
from mace_accel.backends.cuda import sc as csc  # noqa: E402
from mace_accel.backends.cuda.sc_codegen import KIND_SC_GRAD_W, SCKernelSpec, grad_w_chunks, render_sc  # noqa: E402
from mace_accel.backends.reference import sc as rsc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grad-w-options", nargs="*", default=[])
    a = ap.parse_args()
    cap = cupy.cuda.Device(0).compute_capability
    print(f"grad-w kernels built with the backend's NVRTC options + {a.grad_w_options}", flush=True)
    for case in ("mp-medium", "mp-large"):
        for dtype in (torch.float32, torch.float64):
            _, acc = make_pair(case, channels=48, dtype=dtype)
            plan = acc._sc_plan
            dt = csc._DTYPES[dtype]
            grad_w = {}
            for lo, hi in grad_w_chunks(plan):
                r = render_sc(plan, SCKernelSpec(KIND_SC_GRAD_W, dt, lo, hi))
                grad_w[(lo, hi)] = build(r["source"], r["name"], f"sm_{cap}", a.grad_w_options)
            worst = [0.0, 0.0, 0.0]
            for rep in range(6):
                x, _ = inputs(acc, 301, dtype, device="cuda", seed=10 + rep)
                wn = torch.randn(301, plan.weight_numel, 48, dtype=dtype, device="cuda")
                g = torch.randn(301, plan.out_dim, dtype=dtype, device="cuda")
                out = csc.forward(plan, x, wn)
                dx, _ = csc.backward(plan, x, wn, g, True, False)
                dw = torch.full_like(wn, float("nan"))
                for fn in grad_w.values():
                    csc._launch_function(fn, plan, x, x, wn, g, None, None, dw)
                torch.cuda.synchronize()
                x64, w64, g64 = x.double(), wn.double(), g.double()
                ro = rsc.forward(plan, x64, w64)
                rdx, rdw = rsc.backward(plan, x64, w64, g64, True, True)
                errs = [rel(out.double(), ro), rel(dx.double(), rdx), rel(dw.double(), rdw)]
                worst = [max(a_, b) for a_, b in zip(worst, errs)]
                if max(errs) > 1e-4:
                    bad = (dw.double() - rdw).abs() > 1e-3 * rdw.abs().max()
                    idx = bad.nonzero()
                    print(f"  {case} {dtype} rep {rep}: errs {errs}; bad dw entries {int(bad.sum())}, nodes "
                          f"{idx[:, 0].unique()[:10].tolist()}, k {idx[:, 1].unique()[:20].tolist()}, "
                          f"ch {idx[:, 2].unique()[:10].tolist()}")
            attrs = []
            fns = [csc._function(plan, SCKernelSpec(kind, dt), 0) for kind in (0, 1)] + [grad_w[(0, 16)]]
            for kind, fn in enumerate(fns):  # grad-w: the first chunk
                regs = driver.funcGetAttribute(4, fn.ptr)   # CU_FUNC_ATTRIBUTE_NUM_REGS
                local = driver.funcGetAttribute(3, fn.ptr)  # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
                attrs.append(f"k{kind}: regs {regs} local {local} B")
            print(f"{case} {dtype}: worst rel fwd {worst[0]:.2e} dx {worst[1]:.2e} dw {worst[2]:.2e}; "
                  + "; ".join(attrs), flush=True)


if __name__ == "__main__":
    main()
