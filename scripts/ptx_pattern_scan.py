"""Which generated kernels compute an index as int arithmetic that NVRTC widens with a multiply by c << 32 and a
sign-extending shift? (NVRTC only: no GPU needed)

    python scripts/ptx_pattern_scan.py [--old-sc REV]

The symmetric contraction's grad-w kernels came out wrong on the H100 with a 32-bit channel index, whose column
arithmetic ``first + ch * stride`` NVRTC emits as ``mul.lo.s64 d, ch, stride << 32`` and ``shr.s64 d, d, 32``;
with a 64-bit channel they are right (sc_codegen.py's module docstring). This compiles to PTX (compute_90)
every conv kernel the backend launches for the MACE-MP-0 layers and the symmetric-contraction kernels of
mp-medium / mp-large float64 (48 channels; grad-w: the chunk of weights 128-143, the one that was wrong), the
latter also from ``kernels/sym_contract.cu`` at ``--old-sc`` (default 7f7f731, the int channel everywhere), and
counts per kernel (multiplies by a nonzero multiple of 2**32, arithmetic shifts right by 32).
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import part_sweep as P  # noqa: E402  (puts tests/ on the path)
import torch  # noqa: E402
from ptx_checks import int_index_widenings as counts  # noqa: E402
from test_symcon import make_pair  # noqa: E402
from tp_cases import launched_specs  # noqa: E402

from mace_accel.backends.cuda import codegen  # noqa: E402
from mace_accel.backends.cuda import sc_codegen as S  # noqa: E402
from mace_accel.backends.cuda.compiler import nvrtc_compile  # noqa: E402

def sc_ptx(plan, spec, template=None):
    if template is None:
        r = S.render_sc(plan, spec)
    else:
        orig = S.template_text
        S.template_text = lambda name: template
        try:
            r = S.render_sc(plan, spec)
        finally:
            S.template_text = orig
    return nvrtc_compile(r["source"], r["name"], "compute_90")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-sc", default="7f7f731")
    a = ap.parse_args()
    old = subprocess.run(["git", "show", f"{a.old_sc}:kernels/sym_contract.cu"], check=True, capture_output=True,
                         text=True, cwd=os.path.join(os.path.dirname(__file__), "..")).stdout
    for case in ("mp-medium", "mp-large"):
        _, acc = make_pair(case, channels=48, dtype=torch.float64)
        plan = acc._sc_plan
        for kind, lohi in ((S.KIND_SC_FORWARD, (0, 0)), (S.KIND_SC_GRAD_X, (0, 0)), (S.KIND_SC_GRAD_W, (128, 144))):
            if kind == S.KIND_SC_GRAD_W and plan.weight_numel <= lohi[0]:
                continue
            spec = S.SCKernelSpec(kind, "float64", *lohi)
            print(f"sc {case:9s} {spec.tag():16s} {a.old_sc}: {counts(sc_ptx(plan, spec, old))}  "
                  f"working tree: {counts(sc_ptx(plan, spec))}", flush=True)
    n, found = 0, 0
    for cfg, plan in P.mp0_plans(["layer0", "medium1", "large1"]).items():
        for dt in ("float32", "float64"):
            for label, spec in launched_specs(plan, dt, sm90=True).items():
                r = codegen.render(plan, spec)
                c = counts(nvrtc_compile(r["source"], r["name"], "compute_90"))
                n += 1
                if any(c):
                    found += 1
                    print(f"conv {cfg} {dt} {label} {spec.tag()}: {c}", flush=True)
    print(f"conv kernels: {n} compiled, {found} with the pattern")


if __name__ == "__main__":
    main()
