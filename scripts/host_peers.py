"""Probe: host time per call of every implementation in one host-bound bench_conv cell (GPU machine).

    python scripts/host_peers.py [--config L0] [--dtype float32] [--mode fwd_bwd] [--rounds 6] [--calls 30]

bench_conv times a cell with a CUDA-event pair around each call and no synchronisation; when a call's host work
outlasts its GPU work, that span is the host time per call. This runs the cell's calls (bench_conv's own
``make_impl`` / ``run_mode`` on its Cu graph) for ours, ours_cold, ours_det and the peers, in rounds that
alternate the implementations, and prints per implementation the medians of: the host time of a call
(``perf_counter`` around it, no synchronisation), the CUDA-event span of a call, and the GPU time of a call
alone (synchronised before and after). Beside them: ``empty``, an autograd.Function over the same tensors
whose forward and backward allocate their outputs and launch nothing else (the module call, autograd and the
engine's hand-off to its device thread and back); ``*-1thread``, ours and oeq_det with the engine kept on the
calling thread (``torch.autograd.set_multithreading_enabled(False)``); ``ours-python``, ours through the Python
launch path (``MACE_ACCEL_NATIVE=0`` during its calls) instead of the native extension.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_conv as BC  # noqa: E402
import torch  # noqa: E402


class _Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, w, out_shape):
        ctx.shapes = (x, y, w)
        return x.new_empty(out_shape)

    @staticmethod
    def backward(ctx, g):
        x, y, w = ctx.shapes
        return torch.empty_like(x), torch.empty_like(y), torch.empty_like(w), None


def main():
    ap = BC.cell_parser("L0", "fwd_bwd", "ours,ours_cold,ours_det,cueq,oeq,oeq_det", 30)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    dev = torch.device("cuda")
    args, graph, cfg, dtype, data, peers = BC.cell_inputs(a.config, a.dtype, dev, a.impls.split(","))
    calls = {}
    for impl in a.impls.split(","):
        if not peers.get(BC.PEER_OF[impl], {"available": True})["available"]:
            print(f"{impl}: unavailable: {peers[BC.PEER_OF[impl]]['reason'][:120]}")
            continue
        b = BC.make_impl(impl, cfg, dtype, dev, args)(data)
        calls[impl] = (lambda b=b: BC.run_mode(b, a.mode), False, False)
        if impl in ("ours", "oeq_det"):
            calls[impl + "-1thread"] = (calls[impl][0], True, False)
        if impl == "ours":
            calls["ours-python"] = (calls[impl][0], False, True)
    if a.mode != "fwd":
        x, y, w, g = data["x"], data["y"], data["w"], data["g"]
        calls["empty"] = (lambda: torch.autograd.grad(_Empty.apply(x, y, w, g.shape), (x, y, w), g), False, False)
    host, span, gpu = ({k: [] for k in calls} for _ in range(3))
    for rnd in range(a.rounds):
        order = list(calls.items()) if rnd % 2 == 0 else list(reversed(calls.items()))
        for name, (fn, one_thread, python_path) in order:
            torch.autograd.set_multithreading_enabled(not one_thread)
            if python_path:
                os.environ["MACE_ACCEL_NATIVE"] = "0"
            try:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(a.calls)]
                hs = []
                for s, e in ev:
                    t0 = time.perf_counter()
                    s.record()
                    fn()
                    e.record()
                    hs.append(time.perf_counter() - t0)
                torch.cuda.synchronize()
                host[name].append(statistics.median(hs[5:]) * 1e6)
                span[name].append(statistics.median(s.elapsed_time(e) for s, e in ev[5:]) * 1e3)
                gs = []
                for _ in range(5):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    s.record()
                    fn()
                    e.record()
                    torch.cuda.synchronize()
                    gs.append(s.elapsed_time(e) * 1e3)
                gpu[name].append(statistics.median(gs))
            finally:
                torch.autograd.set_multithreading_enabled(True)
                os.environ.pop("MACE_ACCEL_NATIVE", None)
        print(f"round {rnd}: " + "  ".join(f"{k} {host[k][-1]:.0f}/{span[k][-1]:.0f}" for k in calls), flush=True)
    print(f"{torch.cuda.get_device_name()}: {a.config} {a.dtype} {a.mode}, {len(graph['sender'])} edges; "
          f"medians over {a.rounds} rounds of {a.calls} calls (us)")
    print(f"{'impl':16s} {'host/call':>10s} {'event span':>11s} {'alone (sync)':>13s}")
    for k in calls:
        print(f"{k:16s} {statistics.median(host[k]):10.0f} {statistics.median(span[k]):11.0f} "
              f"{statistics.median(gpu[k]):13.0f}")


if __name__ == "__main__":
    main()
