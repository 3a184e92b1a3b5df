"""Diagnostic: why does the generated symmetric-contraction grad-w kernel give wrong float64 results on the GPU
while the same source built for the host with g++ is right? (GPU machine)

    python scripts/sc_gradw_probe.py [--case mp-large] [--chunk 128 144] [--dump DIR]
    python scripts/sc_gradw_probe.py --bisect 130 [--dump DIR]

For one grad-w chunk it builds the same source several ways and runs each against the reference executor on
the same inputs (48 channels, 301 nodes, fresh random inputs): NVRTC cubin for the GPU (what the backend
does), NVRTC PTX loaded by the driver, NVRTC with -fmad=false, and NVRTC with lower ptxas optimisation levels;
then one launch per single weight of the chunk. Prints the relative error of each and the weights that are
wrong. ``--dump`` writes each variant's source and binary there (for nvdisasm). ``--bisect K`` builds the
grad-w kernel of weight K with only its first j terms, for every j, and prints which of them come out wrong
with the backend's build (each against a float64 evaluation of the same j terms by torch).
"""
import argparse
import os
import sys

sys.path.insert(0, "tests")
import torch  # noqa: E402
from test_symcon import inputs, make_pair, rel  # noqa: E402

import cupy  # noqa: E402
from mace_accel.backends.cuda import compiler  # noqa: E402
from mace_accel.backends.cuda import sc as csc  # noqa: E402
from mace_accel.backends.cuda.sc_codegen import KIND_SC_GRAD_W, SCKernelSpec, render_sc  # noqa: E402
from mace_accel.backends.reference import sc as rsc  # noqa: E402

VARIANTS = {
    "nvrtc sm cubin (backend)": ("sm", ()),
    "nvrtc compute PTX, driver JIT": ("compute", ()),
    "nvrtc -fmad=false": ("sm", ("-fmad=false",)),
    "nvrtc ptxas -O2": ("sm", ("--ptxas-options=-O2",)),
    "nvrtc ptxas -O1": ("sm", ("--ptxas-options=-O1",)),
    "nvrtc ptxas -O0": ("sm", ("--ptxas-options=-O0",)),
    "nvrtc -G (device debug)": ("sm", ("-G",)),
}


def build(source: str, name: str, arch: str, extra, dump=None, label=""):
    binary = compiler.nvrtc_compile(source, name, arch, compiler.NVRTC_OPTIONS + tuple(extra))
    if dump:
        safe = "".join(c if c.isalnum() else "_" for c in label)[:40]
        with open(os.path.join(dump, f"{safe}.{'ptx' if arch.startswith('compute') else 'cubin'}"), "wb") as f:
            f.write(binary)
    mod = cupy.cuda.function.Module()
    mod.load(binary)
    return mod.get_function(name)


class TermSubset:
    """A plan that answers terms() with the first ``j`` terms of weight ``k`` (everything else delegated)."""

    def __init__(self, plan, k: int, j: int):
        self._plan, self._terms = plan, [t for t in plan.terms() if t[2] == k][:j]

    def terms(self):
        return iter(self._terms)

    def __getattr__(self, name):
        return getattr(self._plan, name)


def subset_reference(plan, terms, x, g, channels: int):
    """dw of the given terms, [nodes, channels], float64 by torch."""
    xs = x.double().reshape(x.shape[0], channels, plan.num_ell)
    out = torch.zeros(x.shape[0], channels, dtype=torch.float64, device=x.device)
    for o, p, _k, u in terms:
        first, stride = plan.column(o)
        cols = first + torch.arange(channels, device=x.device) * stride
        m = torch.ones_like(out)
        for v in plan.monos[p]:
            m = m * xs[:, :, v]
        out += float(u) * g.double()[:, cols] * m
    return out


def bisect(a, plan, x, wn, g, channels, cap):
    k = a.bisect
    total = sum(1 for t in plan.terms() if t[2] == k)
    first_bad = None
    print(f"weight {k}: {total} terms; first j terms alone, backend build (sm_{cap}):", flush=True)
    for j in range(1, total + 1):
        sub = TermSubset(plan, k, j)
        r = render_sc(sub, SCKernelSpec(KIND_SC_GRAD_W, "float64", k, k + 1))
        dw = torch.full_like(wn, float("nan"))
        csc._launch_function(build(r["source"], r["name"], f"sm_{cap}", ()), plan, x, x, wn, g, None, None, dw)
        torch.cuda.synchronize()
        want = subset_reference(plan, sub._terms, x, g, channels)
        err = rel(dw[:, k], want)
        print(f"  j {j:3d}: rel {err:.3g}", flush=True)
        if first_bad is None and not err <= 1e-10:
            first_bad = (j, r)
    if first_bad and a.dump:
        j, r = first_bad
        with open(os.path.join(a.dump, f"k{k}_j{j}.cu"), "w") as f:
            f.write(r["source"])
        for label, extra in (("O3", ()), ("O1", ("--ptxas-options=-O1",))):
            build(r["source"], r["name"], f"sm_{cap}", extra, a.dump, f"k{k}_j{j}_{label}")
        build(r["source"], r["name"], f"compute_{cap}", (), a.dump, f"k{k}_j{j}_ptx")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="mp-large")
    ap.add_argument("--chunk", nargs=2, type=int, default=[128, 144])
    ap.add_argument("--dump", default=None)
    ap.add_argument("--bisect", type=int, default=None)
    a = ap.parse_args()
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
    dtype, channels, n = torch.float64, 48, 301
    _, acc = make_pair(a.case, channels=channels, dtype=dtype)
    plan = acc._sc_plan
    x, _ = inputs(acc, n, dtype, device="cuda", seed=11)
    wn = torch.randn(n, plan.weight_numel, channels, dtype=dtype, device="cuda")
    g = torch.randn(n, plan.out_dim, dtype=dtype, device="cuda")
    cap = cupy.cuda.Device(0).compute_capability
    if a.bisect is not None:
        return bisect(a, plan, x, wn, g, channels, cap)
    _, rdw = rsc.backward(plan, x, wn, g, True, True)
    lo, hi = a.chunk

    def run(fn, k_lo, k_hi):
        dw = torch.full_like(wn, float("nan"))
        csc._launch_function(fn, plan, x, x, wn, g, None, None, dw)
        torch.cuda.synchronize()
        err = rel(dw[:, k_lo:k_hi], rdw[:, k_lo:k_hi])
        per_k = [rel(dw[:, k], rdw[:, k]) for k in range(k_lo, k_hi)]
        bad = [k for k, e in zip(range(k_lo, k_hi), per_k) if not e <= 1e-10]
        return err, bad

    r = render_sc(plan, SCKernelSpec(KIND_SC_GRAD_W, "float64", lo, hi))
    if a.dump:
        with open(os.path.join(a.dump, "chunk.cu"), "w") as f:
            f.write(r["source"])
    print(f"{a.case} float64 grad-w chunk [{lo}, {hi}): {len(r['source'].splitlines())} lines; sm_{cap}", flush=True)
    for label, (kind, extra) in VARIANTS.items():
        try:
            fn = build(r["source"], r["name"], f"{kind}_{cap}", extra, a.dump, label)
        except Exception as exc:  # an option this NVRTC does not take: say so and go on
            print(f"  {label:34s} not built: {str(exc).splitlines()[0][:120]}", flush=True)
            continue
        err, bad = run(fn, lo, hi)
        print(f"  {label:34s} rel {err:.3g}  wrong weights {bad}", flush=True)
    print("  one launch per weight (backend's build):", flush=True)
    for k in range(lo, hi):
        rk = render_sc(plan, SCKernelSpec(KIND_SC_GRAD_W, "float64", k, k + 1))
        err, bad = run(build(rk["source"], rk["name"], f"sm_{cap}", ()), k, k + 1)
        terms = sum(1 for t in plan.terms() if t[2] == k)
        print(f"    k {k:3d}: {terms:4d} terms  rel {err:.3g}", flush=True)


if __name__ == "__main__":
    main()
