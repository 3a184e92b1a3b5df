"""Probe: hardware counters of chosen conv kernels under Nsight Compute (GPU machine with ncu).

    ncu --profile-from-start off --clock-control none -k regex:mace_accel_tp --section ... \
        python scripts/ncu_conv.py [--stream-weights] large1:float32:bwd medium1:float32:double_nogg:pf0 ...

Each argument names one kernel call of scripts/part_sweep.py's ``sweep_calls`` (config:dtype:kind[:setting...];
settings for that call's kernel: ``pfN`` prefetch distance N, ``xp`` / ``noxp`` POINTER_X_LOADS on / off,
``sr`` / ``nosr`` STREAM_RECEIVER_ROWS on / off) on the benchmark's Cu graph with fresh random inputs. Every
call runs twice first (compile, receiver order memoised), then once more between cudaProfilerStart/Stop, so
ncu sees only that launch (plus the small grouping and zeroing kernels around it, which the ``-k`` filter
leaves out). ``--stream-weights``: with
``codegen.STREAM_WEIGHTS`` on for every kernel kind (weight rows read and dW written L2 evict-first).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import part_sweep as P  # noqa: E402
import torch  # noqa: E402


def main(argv):
    if "--stream-weights" in argv:
        argv = [a for a in argv if a != "--stream-weights"]
        for kind in P.ALL_KINDS.values():
            for dt in ("float32", "float64"):
                P.codegen.STREAM_WEIGHTS[(kind, dt)] = True
    dev = torch.device("cuda")
    s, r, n, e = P.C.cu_graph_on(dev)
    cells = [a.split(":") for a in argv]
    plans = P.mp0_plans(sorted({c[0] for c in cells}))
    reset = P.restoring(P.codegen.PREFETCH_EDGES, P.codegen.POINTER_X_LOADS,
                        P.codegen.STREAM_RECEIVER_ROWS)
    for cfg, dname, kname, *settings in cells:
        kind = P.ALL_KINDS[kname]
        for st in settings:
            apply_setting(kind, dname, st)
        calls = P.sweep_calls(plans[cfg], P.sweep_inputs(plans[cfg], getattr(torch, dname), n, e, dev), s, r, n)
        call = calls[kname]
        for _ in range(2):
            call()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        call()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"profiled {cfg} {dname} {kname} {' '.join(settings)} "
              f"({P.call_spec(plans[cfg], kname, dname).tag()})", flush=True)
        reset()


def apply_setting(kind: int, dname: str, st: str) -> None:
    """One ``pfN`` / ``[no]xp`` / ``[no]sr`` setting of a cell (module docstring) into codegen's tables."""
    cg = P.codegen
    if st.startswith("pf") and st[2:].isdigit():
        P.set_switch(cg.PREFETCH_EDGES, kind, dname, int(st[2:]))
    elif st in ("sr", "nosr"):
        P.set_switch(cg.STREAM_RECEIVER_ROWS, kind, dname, st == "sr")
    elif st in ("xp", "noxp"):
        P.set_switch(cg.POINTER_X_LOADS, kind, dname, st == "xp")
    else:
        raise ValueError(f"unknown setting {st!r}: expected pfN, [no]xp or [no]sr")


if __name__ == "__main__":
    main(sys.argv[1:])
