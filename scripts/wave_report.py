"""Probe: registers, occupancy and waves of every conv kernel the benchmark cells launch (GPU machine)

    python scripts/wave_report.py [--cells layer0:float64 medium1:float32] [--min-blocks 0 4 6]

The benchmark graph is an fcc Cu supercell: every node has exactly 78 neighbours, so every work item of a
kernel carries the same work. A launch of B identical blocks on S SMs holding k blocks each runs in
ceil(B / (S k)) waves; when B / (S k) is just above an integer the last wave leaves most of the GPU idle.
For each cell and kernel kind (forward, atomic backward, no-gg fused double) this prints each launch's
kernel, registers, static shared memory, local (spill) bytes, resident blocks per SM (the driver's occupancy
calculator), grid, waves and the share of the last wave that is full, then the kernel call's time alone
(CUDA events, median of 20 after 3 warm-ups). ``--min-blocks`` re-times the forward of each cell with
``codegen.MIN_BLOCKS_PER_SM`` set to each value (0: no register cap), the knob that moves its occupancy.
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import part_sweep as P  # noqa: E402
import torch  # noqa: E402

from cupy.cuda import driver  # noqa: E402
from mace_accel.backends import cuda as B  # noqa: E402
from mace_accel.backends.cuda import codegen  # noqa: E402

KINDS = ("fwd", "bwd", "double_nogg")


def recorded_launches(call):
    """Run ``call`` once and return [(fn, blocks, threads)] of the kernels it launched through the backend."""
    seen = []
    original = B._launch_on

    def spy(fn, index, blocks, threads, args):
        seen.append((fn, blocks, threads))
        original(fn, index, blocks, threads, args)
    B._launch_on = spy
    try:
        call()
        torch.cuda.synchronize()
    finally:
        B._launch_on = original
    return seen


def spec_tag(fn) -> str:
    for (_plan, spec, _dev), f in B._FUNCS.items():
        if f is fn:
            return spec.tag() if hasattr(spec, "tag") else str(spec)
    return "?"


def describe(fn, blocks: int, threads: int, sms: int) -> str:
    k = driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, threads, 0)
    waves = blocks / (sms * k) if k else float("inf")
    last = waves - math.floor(waves) if waves != math.floor(waves) else 1.0
    # CU_FUNC_ATTRIBUTE_ 4: registers, 1: static shared bytes, 3: local bytes per thread
    regs, smem, local = (driver.funcGetAttribute(a, fn.ptr) for a in (4, 1, 3))
    return (f"    {spec_tag(fn)[:58]:58s} regs {regs:3d} smem {smem:6d} local {local:4d}"
            f"  {k:2d} blocks/SM  grid {blocks:6d}  waves {waves:6.2f} (last {last:4.2f} full)")


def report(call, label: str, dev, sms: int) -> None:
    """Time ``call`` alone and print each conv kernel it launches (the grouping's small launches left out)."""
    launches = recorded_launches(call)
    ms = P.C.time_fn(call, dev, 3, 20)["median_ms"]
    print(f"  {label} {ms:7.3f} ms", flush=True)
    for fn, blocks, threads in launches:
        if blocks > 64:
            print(describe(fn, blocks, threads, sms), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", nargs="+", default=["layer0:float32", "layer0:float64", "medium1:float32",
                                                   "medium1:float64", "large1:float32"])
    ap.add_argument("--min-blocks", nargs="*", type=int, default=[])
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    s, r, n, e = P.C.cu_graph_on(dev)
    print(f"{sms} SMs", flush=True)
    cells = [c.split(":") for c in args.cells]
    plans = P.mp0_plans(sorted({c for c, _ in cells}))
    P.C.gpu_warmup(dev)
    for cfg, dname in cells:
        plan = plans[cfg]
        calls = P.sweep_calls(plan, P.sweep_inputs(plan, getattr(torch, dname), n, e, dev), s, r, n)
        print(f"\n{cfg} {dname}", flush=True)
        for kname in KINDS:
            report(calls[kname], f"{kname:11s}", dev, sms)
        reset = P.restoring(codegen.MIN_BLOCKS_PER_SM)
        for mb in args.min_blocks:
            for unrolls in (False, True):
                codegen.MIN_BLOCKS_PER_SM[(codegen.KIND_FORWARD, dname, unrolls)] = mb
            try:
                report(calls["fwd"], f"fwd min_blocks {mb}:", dev, sms)
            finally:
                reset()
        del calls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
