"""Probe: host time of one conv forward + backward, this tree against a base revision, in one process.

    python scripts/host_ab.py --make-base REV DIR      # (any machine with git) copy REV's package into DIR
    python scripts/host_ab.py --base DIR [--config layer0] [--dtype float32] [--edges 4096] [--rounds 15]
    python scripts/host_ab.py --base DIR --cpu-stub    # CPU only: launches stubbed (scripts/host_cpu_stub.py)

The host's speed drifts ~2x within seconds on the GPU machine, so comparing two processes says little: this
imports the base revision's ``mace_accel`` as a second package (``mace_accel_base``, with its own kernel
templates and op namespace) next to this tree's, and times ``torch.autograd.grad(conv(x, y, w, s, r), (x, y, w),
g)`` for both in alternating rounds (receiver grouping forgotten before each call, as bench_conv does), on the
first ``--edges`` edges of the benchmark's Cu graph so that the GPU keeps up and every call measures host work.
Prints the median host microseconds per call of each, per round and over the rounds, and their ratio.
``--events``: time each round as bench_conv times a cell instead (benchmarks/_common.time_fn: a CUDA-event pair
around each of 20 calls after 6 warm-up calls, no synchronisation between calls, the median span in us): on the
benchmark's whole graph (``--edges 0``) that is the cell's own measure.
"""
import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # e3nn 0.4.4 on torch >= 2.6

BASE_NAME = "mace_accel_base"


def make_base(rev: str, out_dir: str) -> None:
    """``out_dir``/mace_accel_base (REV's package, its op namespace renamed) and ``out_dir``/kernels."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, check=True, capture_output=True,
                          text=True).stdout.strip()
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tar = subprocess.run(["git", "archive", rev, "mace_accel", "kernels"], cwd=root, check=True,
                             capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
        shutil.copytree(os.path.join(tmp, "kernels"), os.path.join(out_dir, "kernels"))
        shutil.copytree(os.path.join(tmp, "mace_accel"), os.path.join(out_dir, BASE_NAME))
    for dirpath, _, files in os.walk(os.path.join(out_dir, BASE_NAME)):
        for f in files:
            if not f.endswith(".py"):
                continue
            p = os.path.join(dirpath, f)
            src = open(p).read()
            # a second op namespace (torch.library refuses a second definition of mace_accel::...), and the
            # templates read from out_dir/kernels (the package-data lookup would find this tree's)
            new = src.replace('"mace_accel::', f'"{BASE_NAME}::').replace('"mace_accel.kernels"',
                                                                         f'"{BASE_NAME}_no_such_package"')
            new = new.replace("from mace_accel.", f"from {BASE_NAME}.").replace("import mace_accel.",
                                                                              f"import {BASE_NAME}.")
            if new != src:
                open(p, "w").write(new)
    print(f"{rev} -> {out_dir}/{BASE_NAME} (+ kernels/)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-base", nargs=2, metavar=("REV", "DIR"))
    ap.add_argument("--base", help="directory made by --make-base")
    ap.add_argument("--config", default="layer0")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--edges", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cpu-stub", action="store_true")
    ap.add_argument("--events", action="store_true", help="bench_conv's CUDA-event spans instead of host time")
    a = ap.parse_args()
    if a.make_base:
        make_base(*a.make_base)
        return
    if not a.base:
        ap.error("--base DIR (made by --make-base) is required")
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.path.insert(0, os.path.abspath(a.base))
    import torch

    import mace_accel

    base = importlib.import_module(BASE_NAME)
    pkgs = {"base": base, "this tree": mace_accel}
    if a.cpu_stub:
        from host_cpu_stub import stub_backend

        for p in pkgs.values():
            stub_backend(p)
    sync = (lambda: None) if a.cpu_stub else torch.cuda.synchronize
    from host_profile import conv_calls, host_us

    if a.events:
        import _common as C

        def measure(fn, calls, sync):
            return C.time_fn(fn, torch.device("cuda"), warmup=6, reps=20)["median_ms"] * 1e3
    else:
        measure = host_us
    device = "cpu" if a.cpu_stub else "cuda"
    calls = {k: conv_calls(a.config, a.dtype, a.edges, pkg=p, device=device)[1] for k, p in pkgs.items()}
    where = "CPU, launches stubbed" if a.cpu_stub else torch.cuda.get_device_name()
    what = "CUDA-event median span (us) of 20 calls" if a.events else f"host us per call ({a.calls} calls)"
    print(f"{where}; {a.config} {a.dtype}, {a.edges or 'all'} edges, fwd_bwd {what}, {a.rounds} interleaved rounds")
    got = {k: [] for k in calls}
    for rnd in range(a.rounds):
        order = list(calls) if rnd % 2 == 0 else list(reversed(calls))
        for k in order:
            got[k].append(measure(calls[k], a.calls, sync))
        print(f"  round {rnd:2d}: " + "  ".join(f"{k} {got[k][-1]:7.1f}" for k in calls), flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    for k in calls:
        print(f"  {k:10s} median {med[k]:7.1f} us (min {min(got[k]):7.1f}, max {max(got[k]):7.1f})")
    wins = sum(t < b for t, b in zip(got["this tree"], got["base"]))
    print(f"  this tree / base: {med['this tree'] / med['base']:.3f} of the median; faster in {wins} of "
          f"{a.rounds} rounds")


if __name__ == "__main__":
    main()
