#!/usr/bin/env python3
"""Benchmark of MACE's product basis (symmetric contraction + its linear), one process, one GPU.

Implementations, all fed the same node features and element one-hots:

* ``e3nn``  mace-torch's own ``EquivariantProductBasisBlock`` (opt_einsum contractions) -- the reference;
* ``ours``  the same block after ``mace_accel.accelerate`` (generated symmetric-contraction kernel);
* ``cueq``  the block of the model converted by ``mace.cli.convert_e3nn_cueq`` (cuet.SymmetricContraction,
            ir_mul layout: its input is transposed to [N, L, C] outside the timing).

Model: MACE-MP-0 medium's architecture (bench_ase.build_model: hidden 128x0e+128x1o, max_ell 3,
correlation 3, one element), product blocks 0 (-> 128x0e+128x1o) and 1 (-> 128x0e), 2048 nodes.
Modes: ``fwd`` (no autograd) and ``fwd_bwd`` (forward + gradient w.r.t. the node features, as for forces;
parameters frozen, as the ASE calculators run them, so no implementation computes weight gradients).
Checks: each output is compared with e3nn's after sorting each row (layouts differ by a permutation within a
node: cueq's ir_mul); ours is also compared element by element. CUDA events, warm-up, medians.

GPU:  source .device/setup.sh && python benchmarks/bench_sc.py [--out PATH]
CPU:  python benchmarks/bench_sc.py --dry-run
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402

IMPLS = ("e3nn", "ours", "cueq")
MODES = ("fwd", "fwd_bwd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU smoke run")
    p.add_argument("--nodes", type=int, default=None, help="default 2048")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.nodes = a.nodes or (16 if a.dry_run else 2048)
    a.channels = 4 if a.dry_run else 128
    a.correlation = 2 if a.dry_run else 3
    a.max_ell = 2 if a.dry_run else 3
    if a.dry_run:
        a.reps, a.warmup = 1, 0
        if a.device == "auto":
            a.device = "cpu"
    return a


def build_blocks(args, dtype, device):
    """{impl: model} for e3nn, ours and (if available) cueq; same weights."""
    from bench_ase import build_model

    import mace_accel

    model, _ = build_model(args.channels, 6.0, 30.0, dtype, 0, "RealAgnosticResidualInteractionBlock",
                           max_ell=args.max_ell, correlation=args.correlation)
    model = model.to(device)
    out = {"e3nn": model, "ours": mace_accel.accelerate(model, device=device)}
    try:
        import cuequivariance_torch  # noqa: F401
        from mace.cli.convert_e3nn_cueq import run as to_cueq

        with C.default_dtype(dtype):
            out["cueq"] = to_cueq(copy.deepcopy(model), device=str(device), return_model=True)
    except Exception as e:  # noqa: BLE001 -- reported, not hidden
        out["cueq"] = e
    return out


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = C.resolve_device(args.device)
    report: Dict[str, Any] = {"benchmark": "bench_sc", "args": vars(args), "env": C.env_info(device),
                              "results": []}
    for dtype in (torch.float32, torch.float64):
        blocks = build_blocks(args, dtype, device)
        for m in blocks.values():  # frozen, as in the ASE calculators: the backward is d/dx only (forces)
            if isinstance(m, torch.nn.Module):
                for prm in m.parameters():
                    prm.requires_grad_(False)
        ref_model = blocks["e3nn"]
        for layer in range(len(ref_model.products)):
            ref_block = ref_model.products[layer]
            sc = ref_block.symmetric_contractions
            n, ch = args.nodes, sc.contractions[0].num_features
            num_ell = sc.contractions[0].U_tensors(1).shape[-2]
            g = torch.Generator(device="cpu").manual_seed(layer)
            x = torch.randn(n, ch, num_ell, generator=g, dtype=dtype).to(device)
            attrs = torch.ones(n, 1, dtype=dtype, device=device)  # one element
            want = ref_block(x, None, attrs).detach()
            cot = torch.randn(want.shape, generator=g, dtype=dtype).to(device)
            for impl in IMPLS:
                entry = {"layer": layer, "dtype": str(dtype)[6:], "impl": impl}
                m = blocks[impl]
                if isinstance(m, Exception):
                    entry.update(status="unavailable", error=C.describe_error(m))
                    report["results"].append(entry)
                    continue
                block = m.products[layer]
                xin = x.transpose(1, 2).contiguous() if impl == "cueq" else x  # cueq: ir_mul layout

                def fwd(block=block, xin=xin):
                    with torch.no_grad():
                        return block(xin, None, attrs)

                xg = xin.clone().requires_grad_(True)

                def fwd_bwd(block=block, xg=xg):
                    out = block(xg, None, attrs)
                    return torch.autograd.grad(out, xg, cot)[0]

                got = fwd().detach()
                tol = 1e-4 if dtype == torch.float32 else 1e-10
                scale = float(want.abs().max())
                err_sorted = float((got.sort(dim=1).values - want.sort(dim=1).values).abs().max()) / scale
                entry["rel_err_sorted_rows"] = err_sorted
                if impl == "ours":
                    entry["rel_err"] = float((got - want).abs().max()) / scale
                entry["status"] = "ok" if err_sorted <= tol else "mismatch"
                for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                    t = C.time_fn(fn, device, args.warmup, args.reps)
                    entry[f"{mode}_ms"] = t["median_ms"]
                report["results"].append(entry)
                print(f"layer {layer} {entry['dtype']} {impl:5s} {entry['status']:9s} "
                      + " ".join(f"{md} {entry.get(md + '_ms', float('nan')):8.3f} ms" for md in MODES)
                      + f"  err(sorted rows) {err_sorted:.1e}", flush=True)
        del blocks
        C.free_memory(device)
    ratios = []
    res = report["results"]
    for r in res:
        if r["impl"] != "ours" or r.get("status") != "ok":
            continue
        for peer in ("e3nn", "cueq"):
            p = next((q for q in res if q["impl"] == peer and q["layer"] == r["layer"] and q["dtype"] == r["dtype"]
                      and q.get("status") == "ok"), None)
            if p:
                ratios.append({"layer": r["layer"], "dtype": r["dtype"], "peer": peer,
                               **{f"ours/{peer} {md}": r[f"{md}_ms"] / p[f"{md}_ms"] for md in MODES}})
    report["ratios"] = ratios
    report["elapsed_s"] = time.perf_counter() - t0
    out = args.out or C.default_out("bench_sc", device)
    C.write_json(out, report)
    print(f"wrote {out}")
    for r in ratios:
        print(r)
    return report


if __name__ == "__main__":
    main()
