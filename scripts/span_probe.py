"""Probe: what bench_conv's event span of a host-bound fwd+bwd cell is made of (GPU machine).

    python scripts/span_probe.py [--config layer0] [--dtype float32] [--edges 0] [--calls 60]

bench_conv times a cell with a CUDA-event pair around each call and no synchronisation between calls. For a call
whose host work outlasts its GPU work that span is either the host time per call H (when the GPU is still busy
with the previous call's last kernel as the next call starts) or L + t_last (when the GPU waits for every call:
L is the host time from the call's start to the launch of its last kernel, t_last that kernel's GPU time). This
runs the cell's loop (``torch.autograd.grad(conv(...), (x, y, w), g)``, receiver grouping forgotten before each
call) with a host stamp and an extra CUDA event just before each kernel launch of ours, and prints, as medians
over the calls after the first ten: the span, H, L, the GPU time from the start event to each launch point and
from the last launch point to the end event, and the GPU's idle time before the start event is reached.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import torch  # noqa: E402
from host_profile import conv_call_parser, conv_calls  # noqa: E402

from mace_accel.backends import cuda as B  # noqa: E402


def main():
    ap = conv_call_parser(calls=60)
    ap.set_defaults(edges=0)
    a = ap.parse_args()
    _, fwd_bwd, r, n = conv_calls(a.config, a.dtype, a.edges)
    marks = []  # (label, host time, event) per launch of the current call
    real = B._launch_on

    def stamped(fn, index, blocks, threads, args):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append((getattr(fn, "__name__", None) or getattr(fn, "name", "kernel"), time.perf_counter(), ev))
        real(fn, index, blocks, threads, args)

    B._launch_on = stamped
    for _ in range(10):
        fwd_bwd()
    torch.cuda.synchronize()
    calls = []
    for _ in range(a.calls):
        marks = []
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        h0 = time.perf_counter()
        s.record()
        fwd_bwd()
        e.record()
        h1 = time.perf_counter()
        calls.append((h0, h1, s, e, marks))
    torch.cuda.synchronize()
    B._launch_on = real
    rows = []
    for i in range(10, len(calls)):
        h0, h1, s, e, m = calls[i]
        nh0 = calls[i + 1][0] if i + 1 < len(calls) else None
        prev_e = calls[i - 1][3]
        rows.append({
            "span": s.elapsed_time(e) * 1e3,
            "H (host per call, start to next start)": (nh0 - h0) * 1e6 if nh0 else None,
            "host call (start to return)": (h1 - h0) * 1e6,
            "L (host start to last launch)": (m[-1][1] - h0) * 1e6,
            **{f"GPU start -> launch {k} ({lbl})": s.elapsed_time(ev) * 1e3 for k, (lbl, _, ev) in enumerate(m)},
            **{f"host start -> launch {k}": (t - h0) * 1e6 for k, (_, t, _) in enumerate(m)},
            "GPU last launch point -> end": m[-1][2].elapsed_time(e) * 1e3,
            "GPU previous end -> start": prev_e.elapsed_time(s) * 1e3,
        })
    print(f"{torch.cuda.get_device_name()}; {a.config} {a.dtype}, {r.shape[0]} edges, {n} nodes; medians over "
          f"{len(rows)} calls (us); kernels launched per call: {len(calls[-1][4])}")
    for k in rows[0]:
        v = [row[k] for row in rows if row.get(k) is not None]
        print(f"  {k:48s} {statistics.median(v):8.1f}   (min {min(v):7.1f}, max {max(v):7.1f})")


if __name__ == "__main__":
    main()
