"""Probe: is our layer-0 float32 forward time bimodal within one process? (GPU machine)

    python scripts/l0_variance.py

Times the L0 (128x0e x sh(3) -> 128x(0e+1o+2e+3o)) float32 forward on the benchmark's Cu graph 8 times, each
with freshly allocated inputs (new addresses), and the float64 forward for comparison.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common as C  # noqa: E402
import torch  # noqa: E402

import mace_accel  # noqa: E402
from tp_cases import mace_conv_args  # noqa: E402


def main():
    s, r, n, e = C.cu_graph_on("cuda", announce=False)
    node, sh, mid, ins = mace_conv_args("layer0")
    conv = mace_accel.TensorProductConv(node, sh, mid, ins, check_inputs=False)
    for dtype in (torch.float32, torch.float64):
        times = []
        for _ in range(8):
            x = torch.randn(n, node.dim, device="cuda", dtype=dtype)
            y = torch.randn(e, sh.dim, device="cuda", dtype=dtype)
            w = torch.randn(e, conv.weight_numel, device="cuda", dtype=dtype)
            times.append(C.time_fn(lambda: conv(x, y, w, s, r), torch.device("cuda"), 5, 30)["median_ms"])
            del x, y, w
        print(f"L0 {str(dtype)[6:]} fwd ms, 8 fresh allocations: " + " ".join(f"{t:.3f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
