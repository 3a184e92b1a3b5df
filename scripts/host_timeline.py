"""Probe: where the host time of one conv forward + backward goes, as a timeline (GPU machine).

    python scripts/host_timeline.py [--config layer0] [--dtype float32] [--edges 4096] [--calls 300] [--fine]

Runs ``torch.autograd.grad(conv(x, y, w, sender, receiver), (x, y, w), g)`` as bench_conv's fwd_bwd mode does
(receiver grouping forgotten before each call), on the first ``--edges`` edges of the benchmark's Cu graph, so
that the GPU keeps up and every call measures host work only. The backend's entry points and each kernel launch
are wrapped with ``time.perf_counter`` stamps (~0.3 us each); the script prints the median time between
consecutive stamps over the calls, the median host time from the call's start to the launch of its last kernel,
and the whole call's. (bench_conv's unsynchronised event pairs read a host-bound call's whole host time per call:
scripts/host_affinity.py.)
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import torch  # noqa: E402
from host_profile import conv_call_parser, conv_calls, host_us  # noqa: E402

from mace_accel.backends import cuda as B  # noqa: E402

_STAMPS = []


def _stamp(label):
    _STAMPS.append((label, time.perf_counter()))


def _wrap(owner, name, label, enter=None, leave=None):
    """Replace ``owner.name`` by a call between two stamps (``label`` + " enter" / " exit" unless given)."""
    inner = getattr(owner, name)
    enter, leave = enter or f"{label} enter", leave or f"{label} exit"

    def wrapped(*args, **kw):
        _stamp(enter)
        out = inner(*args, **kw)
        _stamp(leave)
        return out

    setattr(owner, name, wrapped)


def instrument(fine: bool):
    if fine:  # torch's allocation calls (process-wide) and the backend's helpers, each stamped
        for name in ("empty", "zeros", "zeros_like"):
            _wrap(torch, name, f"torch.{name}")
        _wrap(torch.cuda, "is_current_stream_capturing", "is_capturing")
        for name in ("_spec", "_csr_function", "_dy_partials", "_alloc", "_launch"):
            _wrap(B, name, name)
    _wrap(B, "forward", "backend.forward")
    _wrap(B, "backward", "backend.backward")
    _wrap(B, "graph_csr", "graph_csr")
    _wrap(B, "_launch_on", "", enter="launch", leave="launched")  # every kernel launch goes through it


def main():
    ap = conv_call_parser(calls=300)
    ap.add_argument("--fine", action="store_true", help="also stamp torch's allocations and the backend helpers")
    a = ap.parse_args()
    _, fwd_bwd, r, n = conv_calls(a.config, a.dtype, a.edges)
    k = r.shape[0]

    plain = host_us(fwd_bwd, a.calls)  # after 20 warm-up calls (compile, caches)
    instrument(a.fine)
    runs = []
    for _ in range(a.calls):
        _STAMPS.clear()
        _stamp("call")
        fwd_bwd()
        _stamp("returned")
        runs.append(list(_STAMPS))
    torch.cuda.synchronize()
    labels = [lab for lab, _ in runs[0]]
    if any([lab for lab, _ in run] != labels for run in runs):
        raise RuntimeError("the calls took different paths; cannot line them up")
    print(f"{a.config} {a.dtype}, {k} edges, {n} nodes: {plain:.0f} us per fwd_bwd call uninstrumented "
          f"({a.calls} calls; {os.path.dirname(B.__file__)})")
    last_launch = max(i for i, lab in enumerate(labels) if lab == "launch")
    for i in range(1, len(labels)):
        d = statistics.median((run[i][1] - run[i - 1][1]) * 1e6 for run in runs)
        print(f"  {labels[i - 1]:>24s} -> {labels[i]:<24s} {d:7.1f} us")
    to_last = statistics.median((run[last_launch][1] - run[0][1]) * 1e6 for run in runs)
    total = statistics.median((run[-1][1] - run[0][1]) * 1e6 for run in runs)
    print(f"  call -> last kernel launch: {to_last:.1f} us; whole call {total:.1f} us (instrumented)")


if __name__ == "__main__":
    main()
