"""Probe: what one eager conv forward + backward costs the host, part by part, in one process (GPU machine).

    python scripts/host_parts.py [--config layer0] [--dtype float32] [--edges 4096] [--calls 200] [--rounds 9]

The host's speed drifts ~2x within seconds on the GPU machine, so every item is timed in each of ``--rounds``
alternating rounds and the medians over rounds are printed next to each other. Items: bench_conv's fwd_bwd
(receiver grouping forgotten before each call); the same with the autograd engine kept on the calling thread
(``torch.autograd.set_multithreading_enabled(False)``: what the engine's hand-offs to its CUDA worker thread
cost); the forward alone; an empty autograd.Function's forward + grad on a CUDA tensor (the framework's floor,
with and without the worker thread); and the single steps our path takes (allocation, zero fill, one CuPy launch
with our kernels' 18 arguments, the capture query). On the first ``--edges`` edges of the benchmark's graph, so
the GPU keeps up and every call measures host work.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import torch  # noqa: E402
from host_profile import _Identity, conv_call_parser, conv_calls, host_us  # noqa: E402

from mace_accel.backends import cuda as B  # noqa: E402


def _single_thread(fn):
    def run():
        with torch.autograd.set_multithreading_enabled(False):
            return fn()
    return run


def main():
    ap = conv_call_parser(calls=200)
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    dev = torch.device("cuda")
    fwd, fwd_bwd, r, n = conv_calls(a.config, a.dtype, a.edges)
    t = torch.randn(64, device=dev, requires_grad=True)
    keys = r.long().contiguous()
    fn = B._csr_function("count", B.device_index(dev))
    counters = torch.zeros(n + 2, dtype=torch.int32, device=dev)
    seg = torch.empty(n + 1, dtype=torch.int64, device=dev)
    ptrs = (keys.data_ptr(), counters.data_ptr(), seg.data_ptr(), 0, n)
    # the count kernel reads only its first 5 arguments: the extra 13 cost what our conv kernels' 18 do
    args18 = ptrs + (0,) * 13
    items = {
        "fwd_bwd (bench_conv's)": fwd_bwd,
        "fwd_bwd, engine on the calling thread": _single_thread(fwd_bwd),
        "fwd alone (grad enabled)": fwd,
        "empty Function fwd+grad": lambda: torch.autograd.grad(_Identity.apply(t), (t,), t),
        "empty Function fwd+grad, one thread": _single_thread(
            lambda: torch.autograd.grad(_Identity.apply(t), (t,), t)),
        "torch.empty (4k floats)": lambda: torch.empty(4096, device=dev),
        "torch.zeros (4k floats)": lambda: torch.zeros(4096, device=dev),
        "CuPy launch, 18 args (0 blocks of work)": lambda: B.run_on_torch_stream(fn, dev, 1, B.CSR_THREADS, args18),
        "is_current_stream_capturing": torch.cuda.is_current_stream_capturing,
    }
    res = {k: [] for k in items}
    for _ in range(a.rounds):
        for name, f in items.items():
            res[name].append(host_us(f, a.calls))
    print(f"{torch.cuda.get_device_name()}; {a.config} {a.dtype}, {r.shape[0]} edges, {n} nodes; host us per call, "
          f"median over {a.rounds} alternating rounds of {a.calls} calls (min - max of the round medians)")
    for name, v in res.items():
        print(f"  {name:42s} {statistics.median(v):8.1f}   ({min(v):.1f} - {max(v):.1f})")


if __name__ == "__main__":
    main()
