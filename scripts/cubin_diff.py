"""Do two versions of the kernel templates compile to the same machine code? (NVRTC only: no GPU needed)

    python scripts/cubin_diff.py --old REV [--configs layer0 medium1 large1] [--arch sm_90] [--sc]

Renders every conv kernel the backend launches for the MACE-MP-0 layer configs (forward, atomic and
deterministic backward, deterministic dx, fused double backward with and without d/dgout, plain TP forward and
backward; float32 and float64; the tables as they are) twice: from ``kernels/`` in the working tree and from
``kernels/`` at git revision ``REV``, compiles both with NVRTC for ``--arch`` and compares the cubins byte for
byte. A template change that leaves every cubin identical cannot change speed or results, so it needs no
device run. ``--sc`` also compares the symmetric-contraction kernels (forward, grad-x, every grad-w chunk) of
the test plans (tests/test_symcon.py: mp-small, mp-medium, mp-large, lmax1-corr4 at 48 channels); ``--configs``
with no names skips the conv kernels. Exits 1 if any cubin differs, and names the kernels.
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import part_sweep as P  # noqa: E402  (puts tests/ on the path)
from tp_cases import launched_specs  # noqa: E402

from mace_accel.backends.cuda import codegen  # noqa: E402
from mace_accel.backends.cuda.compiler import nvrtc_compile, parse_arch  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def old_template(rev: str):
    """codegen.template_text as it would read kernels/ at ``rev``."""
    cache = {}

    def text(name: str) -> str:
        if name not in cache:
            cache[name] = subprocess.run(["git", "show", f"{rev}:kernels/{name}"], cwd=ROOT, check=True,
                                         capture_output=True, text=True).stdout
        return cache[name]
    return text


def compare(module, render, old_text, arch: str, label: str, differ: list) -> bool:
    """Whether ``render()`` (which reads its templates through ``module.template_text``) compiles to the same
    cubin from the working tree's kernels/ and from ``old_text``'s; prints one line, and appends ``label`` and
    the kernel's name to ``differ`` if not."""
    new_text, cubins = module.template_text, []
    for text in (new_text, old_text):
        module.template_text = text
        try:
            r = render()
        finally:
            module.template_text = new_text
        cubins.append(nvrtc_compile(r["source"], r["name"], arch))
    identical = cubins[0] == cubins[1]
    if not identical:
        differ.append(f"{' '.join(label.split())} ({r['name']})")
    print(f"{label} {'same' if identical else 'DIFFERENT'} ({len(cubins[0])} bytes)", flush=True)
    return identical


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="git revision whose kernels/ to compare against")
    ap.add_argument("--configs", nargs="*", default=["layer0", "medium1", "large1"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--sc", action="store_true", help="also the symmetric-contraction kernels")
    a = ap.parse_args()
    plans = P.mp0_plans(a.configs)
    old_text = old_template(a.old)
    same, differ, seen = 0, [], set()
    for cfg, plan in plans.items():
        for dt in a.dtypes:
            for label, spec in launched_specs(plan, dt, sm90=parse_arch(a.arch)[1] >= 90).items():
                if (cfg, spec) in seen:
                    continue
                seen.add((cfg, spec))
                same += compare(codegen, lambda: codegen.render(plan, spec), old_text, a.arch,
                                f"{cfg:8s} {dt} {label:12s} stage={spec.stage or '-':2s}", differ)
    if a.sc:
        s_same, s_differ = sc_kernels(old_text, a.arch, a.dtypes)
        same, differ = same + s_same, differ + s_differ
    print(f"{same} kernels compile to identical cubins for {a.arch}; {len(differ)} differ")
    for d in differ:
        print("  differs:", d)
    return 1 if differ else 0


def sc_kernels(old_text, arch: str, dtypes):
    """(identical count, [differing names]) of the symmetric-contraction kernels, rendered from the working
    tree's kernels/ and from ``old_text``'s."""
    import torch
    from test_symcon import make_pair

    from mace_accel.backends.cuda import sc_codegen as S

    same, differ = 0, []
    for case in ("mp-small", "mp-medium", "mp-large", "lmax1-corr4"):
        for dt in dtypes:
            _, acc = make_pair(case, channels=48, dtype=getattr(torch, dt))
            plan = acc._sc_plan
            specs = [S.SCKernelSpec(S.KIND_SC_FORWARD, dt), S.SCKernelSpec(S.KIND_SC_GRAD_X, dt)]
            specs += [S.SCKernelSpec(S.KIND_SC_GRAD_W, dt, lo, hi) for lo, hi in S.grad_w_chunks(plan)]
            for spec in specs:
                same += compare(S, lambda: S.render_sc(plan, spec), old_text, arch,
                                f"sc {case:11s} {dt} {spec.tag():14s}", differ)
    return same, differ


if __name__ == "__main__":
    sys.exit(main())
