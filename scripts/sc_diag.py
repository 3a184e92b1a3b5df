"""Diagnostic: each generated symmetric-contraction kernel (forward, grad-x, grad-w) against the reference
executor, repeated with fresh inputs, with the kernels' register and local-memory use.

    python scripts/sc_diag.py            (GPU machine)
"""
import sys

sys.path.insert(0, "tests")
import torch  # noqa: E402
from test_symcon import inputs, make_pair, rel  # noqa: E402

from mace_accel.backends.cuda import sc as csc  # noqa: E402
from mace_accel.backends.cuda.sc_codegen import KIND_SC_GRAD_W, SCKernelSpec, grad_w_chunks  # noqa: E402
from mace_accel.backends.reference import sc as rsc  # noqa: E402


def main():
    for case in ("mp-medium", "mp-large"):
        for dtype in (torch.float32, torch.float64):
            _, acc = make_pair(case, channels=48, dtype=dtype)
            plan = acc._sc_plan
            worst = [0.0, 0.0, 0.0]
            for rep in range(6):
                x, _ = inputs(acc, 301, dtype, device="cuda", seed=10 + rep)
                wn = torch.randn(301, plan.weight_numel, 48, dtype=dtype, device="cuda")
                g = torch.randn(301, plan.out_dim, dtype=dtype, device="cuda")
                out = csc.forward(plan, x, wn)
                dx, _ = csc.backward(plan, x, wn, g, True, False)
                dw = torch.empty_like(wn)  # the generated grad-w kernels, which the backend does not launch
                for lo, hi in grad_w_chunks(plan):
                    csc._launch(plan, SCKernelSpec(KIND_SC_GRAD_W, csc._DTYPES[dtype], lo, hi), x, x, wn, g,
                                None, None, dw)
                torch.cuda.synchronize()
                x64, w64, g64 = x.double(), wn.double(), g.double()
                ro = rsc.forward(plan, x64, w64)
                rdx, rdw = rsc.backward(plan, x64, w64, g64, True, True)
                errs = [rel(out.double(), ro), rel(dx.double(), rdx), rel(dw.double(), rdw)]
                worst = [max(a, b) for a, b in zip(worst, errs)]
                if max(errs) > 1e-4:
                    bad = (dw.double() - rdw).abs() > 1e-3 * rdw.abs().max()
                    idx = bad.nonzero()
                    print(f"  {case} {dtype} rep {rep}: errs {errs}; bad dw entries {int(bad.sum())}, nodes "
                          f"{idx[:, 0].unique()[:10].tolist()}, k {idx[:, 1].unique()[:20].tolist()}, "
                          f"ch {idx[:, 2].unique()[:10].tolist()}")
            attrs = []
            for kind in (0, 1, 2):
                rng = (0, 16) if kind == 2 else (0, 0)  # grad-w: the first chunk
                fn = csc._function(plan, SCKernelSpec(kind, csc._DTYPES[dtype], *rng), 0)
                from cupy.cuda import driver

                regs = driver.funcGetAttribute(4, fn.ptr)   # CU_FUNC_ATTRIBUTE_NUM_REGS
                local = driver.funcGetAttribute(3, fn.ptr)  # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
                attrs.append(f"k{kind}: regs {regs} local {local} B")
            print(f"{case} {dtype}: worst rel fwd {worst[0]:.2e} dx {worst[1]:.2e} dw {worst[2]:.2e}; "
                  + "; ".join(attrs), flush=True)


if __name__ == "__main__":
    main()
