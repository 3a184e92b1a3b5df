"""Probe: what the backward of mace's row gathers costs on the GPU, per way of gathering (GPU machine).

    python scripts/gather_backward_probe.py

On the bench_ase graph (2048 Cu atoms, 159744 edges): gather + backward of ``cell[batch[sender]]`` (a one-row
[1, 3, 3] source, E rows) through ``index_select`` (backward ``index_add_``: all atomics on nine addresses) and
through ``expand`` (backward: a sum over rows), and of ``positions[sender]`` through ``index_select``. CUDA-event
median of the gather + ``autograd.grad`` over 50 calls after warm-up, in microseconds.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402


def main():
    dev = torch.device("cuda")
    s, r, n, e = C.cu_graph_on(dev, announce=False)
    cell = torch.randn(1, 3, 3, device=dev, requires_grad=True)
    pos = torch.randn(n, 3, device=dev, requires_grad=True)
    batch = torch.zeros(n, dtype=torch.long, device=dev)
    g9 = torch.randn(e, 3, 3, device=dev)
    g3 = torch.randn(e, 3, device=dev)
    cases = {
        "cell[batch[sender]] via index_select / index_add_":
            lambda: torch.autograd.grad(torch.index_select(cell, 0, batch[s]), cell, g9),
        "cell[batch[sender]] via expand / sum":
            lambda: torch.autograd.grad(cell.expand(e, 3, 3), cell, g9),
        "positions[sender] via index_select / index_add_":
            lambda: torch.autograd.grad(torch.index_select(pos, 0, s), pos, g3),
    }
    print(f"{torch.cuda.get_device_name()}: {n} atoms, {e} edges; gather + backward, CUDA-event median us")
    for name, fn in cases.items():
        print(f"  {name:52s} {C.time_fn(fn, dev, 10, 50)['median_ms'] * 1e3:8.1f}")


if __name__ == "__main__":
    main()
