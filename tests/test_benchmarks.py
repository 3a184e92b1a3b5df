"""CPU smoke test of the benchmark scripts (benchmarks/bench_conv.py, bench_ase.py, bench_sc.py).

Runs their dry-run mode (tiny sizes) in this process and checks the JSON they write: its structure, that
every implementation of ours was compared with e3nn before being timed, that a wrong implementation is
reported as a mismatch (not timed as if fine), and that peers that do not import are reported as unavailable.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_conv():
    return _load("bench_conv")


@pytest.fixture(scope="module")
def bench_ase():
    return _load("bench_ase")


def test_layout_transposes_roundtrip(bench_conv):
    from e3nn import o3

    irreps = o3.Irreps("3x0e+2x1o+2x2e")
    t = torch.randn(5, irreps.dim)
    u = bench_conv.mul_ir_to_ir_mul(t, irreps)
    assert torch.equal(bench_conv.ir_mul_to_mul_ir(u, irreps), t)
    # block 1x1o with mul 2: mul_ir [u0m0 u0m1 u0m2 u1m0 ...] -> ir_mul [m0u0 m0u1 m1u0 ...]
    off = 3
    assert torch.equal(u[:, off + 1], t[:, off + 3])


def test_compare_flags_errors(bench_conv):
    r = [torch.ones(4, 3)]
    assert bench_conv.compare([torch.ones(4, 3)], r, ("out",))["rel_err"] == 0.0
    assert bench_conv.compare([1.01 * torch.ones(4, 3)], r, ("out",))["rel_err"] == pytest.approx(0.01)
    assert bench_conv.compare([None], r, ("out",))["rel_err"] == float("inf")


def test_byte_and_flop_model(bench_conv):
    cfg = bench_conv.build_config("L1m", 4)
    n, e, s = 10, 100, 4
    x, y, w, o = n * cfg["in1_dim"] * s, e * 16 * s, e * cfg["weight_numel"] * s, n * cfg["out_dim"] * s
    assert bench_conv.count_bytes(cfg, n, e, s, "fwd") == x + y + w + o + 2 * e * 8
    assert bench_conv.count_bytes(cfg, n, e, s, "double") > bench_conv.count_bytes(cfg, n, e, s, "fwd_bwd")
    fpe = cfg["flops_per_edge"]
    assert fpe and bench_conv.count_flops(cfg, e, "fwd_bwd") == e * (fpe["forward"] + fpe["backward"])


def test_target_check(bench_conv):
    """The issue-2 verdict of a cell uses the fastest verified peer (largest ours/peer) and the mode's target."""
    row = {"config": "L0", "dtype": "float32", "mode": "fwd", "ours/e3nn": 0.1, "ours/cueq": 0.5, "ours/oeq": 0.4,
           "ours/oeq_det": 0.66}
    got = bench_conv.target_check(row)
    assert got["fastest_peer"] == "oeq_det" and got["ours/fastest_peer"] == 0.66 and got["target_met"]
    got = bench_conv.target_check({**row, "mode": "fwd_bwd", "ours/cueq": 0.7})
    assert got["fastest_peer"] == "cueq" and not got["target_met"]
    assert bench_conv.target_check({**row, "mode": "double", "ours/cueq": 0.76})["target_met"]
    assert bench_conv.target_check({"mode": "fwd", "ours/e3nn": 0.1}) == {}  # e3nn is not a target peer
    # ours_cold (grouping in every call) is compared with the same fastest peer, beside the verdict
    got = bench_conv.target_check({**row, "ours_cold/oeq_det": 0.7, "ours_cold/cueq": 0.2})
    assert got["target_met"] and got["ours_cold/fastest_peer"] == 0.7 and not got["target_met_cold"]
    assert "target_met_cold" not in bench_conv.target_check(row)


def test_bench_conv_dry_run(bench_conv, tmp_path, monkeypatch, capsys):
    """All modes on the layer-1 config; "ours_det" deliberately broken; the double-backward reference
    made to "fail" so the sub-graph check path runs (double_vjp, the same passes with the cotangents handed to
    autograd, checked on the full graph)."""
    real_make_impl = bench_conv.make_impl

    def make_impl(name, cfg, dtype, device, args):
        bind = real_make_impl(name, cfg, dtype, device, args)
        if name != "ours_det":
            return bind

        def broken_bind(d):
            b = bind(d)
            call = b.call
            b.call = lambda x, y, w: 1.001 * call(x, y, w)
            return b
        return broken_bind

    monkeypatch.setattr(bench_conv, "make_impl", make_impl)
    out = tmp_path / "conv.json"
    bench_conv.main(["--dry-run", "--configs", "L1m", "--dtypes", "float64", "--out", str(out),
                     "--graph-cache", str(tmp_path), "--simulate-ref-failure", "double", "--check-edges", "16"])
    rep = json.loads(out.read_text())
    assert (tmp_path / "conv.png").stat().st_size > 0

    for key in ("env", "graph", "copy_bandwidth", "peers", "configs", "results", "ratios", "byte_model"):
        assert key in rep
    assert rep["graph"]["num_edges"] > 0 and rep["copy_bandwidth"]["GBps_median"] > 0
    assert set(rep["configs"]) == {"L1m"}
    c = rep["configs"]["L1m"]
    assert c["irreps_in1"] == "4x0e+4x1o" and c["flops_per_edge"]["forward"] > 0
    res = {(r["mode"], r["impl"]): r for r in rep["results"]}
    assert len(res) == len(bench_conv.MODES) * len(bench_conv.IMPLS)
    n_edges = rep["graph"]["num_edges"]
    for mode in ("fwd", "fwd_bwd"):
        assert res[(mode, "e3nn")]["status"] == "reference" and res[(mode, "e3nn")]["median_ms"] > 0
    # the full-size reference "failed" for double: e3nn is reported so, the others checked on 16 edges
    assert res[("double", "e3nn")]["status"] == "oom" and "median_ms" not in res[("double", "e3nn")]
    for mode in bench_conv.MODES:
        r = res[(mode, "ours")]
        assert r["status"] == "ok", r
        assert r["rel_err"] <= r["tol"] == 1e-10
        assert r["check_edges"] == (16 if mode == "double" else n_edges)
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] and r["reps"] >= 1
        assert r["min_bytes"] > 0 and r["GBps"] > 0 and r["frac_copy_bw"] > 0 and r["flops"] > 0
        assert set(r["per_tensor"]) == set(bench_conv.GRAD_NAMES[mode])
        bad = res[(mode, "ours_det")]
        assert bad["status"] == "mismatch" and bad["rel_err"] > bad["tol"]
    # ratios only between verified timings
    rat = {r["mode"]: r for r in rep["ratios"]}
    assert rat["fwd"]["ours/e3nn"] > 0 and "ours_det/e3nn" not in rat["fwd"] and "ours/e3nn" not in rat["double"]
    # peers that do not import are reported, not dropped
    for impl in ("cueq", "oeq", "oeq_det"):
        peer = rep["peers"][bench_conv.PEER_OF[impl]]
        if not peer["available"]:
            assert res[("fwd", impl)]["status"] == "unavailable" and res[("fwd", impl)]["error"]
    tail = capsys.readouterr().out.strip().splitlines()
    assert tail[-2].startswith("L1m  f64 double ") and "MISMATCH" in tail[-2]
    assert tail[-1].startswith("L1m  f64 double_vjp") and "MISMATCH" in tail[-1]
    assert any(line.startswith("== bench_conv") for line in tail[-8:])


def test_bench_ase_dry_run(bench_ase, tmp_path, capsys):
    out = tmp_path / "ase.json"
    bench_ase.main(["--dry-run", "--out", str(out), "--graph-cache", str(tmp_path)])
    rep = json.loads(out.read_text())
    for key in ("env", "system", "model", "calculators", "ratios", "method"):
        assert key in rep
    assert rep["model"]["model"] == "ScaleShiftMACE" and rep["model"]["num_params"] > 0
    calcs = rep["calculators"]
    assert list(calcs) == list(bench_ase.CALCS)
    ref = calcs["e3nn"]
    assert ref["status"] == "reference" and ref["median_ms"] > 0 and ref["steps"] == 1
    try:
        from mace_accel import MACEAccelCalculator  # noqa: F401
        have_ours = True
    except Exception:  # noqa: BLE001 -- not written yet
        have_ours = False
    ours = calcs["ours"]
    if have_ours:
        assert ours["status"] == "ok", ours
        assert ours["force_rel_err"] <= rep["args"]["tol"] and ours["median_ms"] > 0
        assert rep["ratios"]["ours/e3nn"] > 0
    else:
        assert ours["status"] == "unavailable" and "MACEAccelCalculator" in ours["error"]
    for name in ("cueq", "oeq"):
        assert calcs[name]["status"] in ("ok", "unavailable", "error"), calcs[name]
        if calcs[name]["status"] != "ok":
            assert calcs[name]["error"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("== bench_ase") for line in lines[-12:])


def test_bench_sc_dry_run(tmp_path):
    bench_sc = _load("bench_sc")
    out = tmp_path / "sc.json"
    bench_sc.main(["--dry-run", "--out", str(out)])
    rep = json.loads(out.read_text())
    rows = rep["results"]
    ours = [r for r in rows if r["impl"] == "ours"]
    assert len(ours) == 2 * 2  # two product blocks, two dtypes
    for r in ours:  # checked element by element against mace's block before timing
        assert r["status"] == "ok" and r["rel_err"] <= (1e-5 if r["dtype"] == "float32" else 1e-12), r
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    for r in rows:
        if r["impl"] == "cueq" and r["status"] != "ok":
            assert r["status"] == "unavailable" and r["error"]
    assert {q["peer"] for q in rep["ratios"]} >= {"e3nn"}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_pin_threads_covers_running_and_later_threads():
    """_common.pin_threads (bench_conv --pin-cores): every running thread and every thread started afterwards
    gets the pinned cores; pin_threads(None) gives back all of them."""
    import threading

    _load("bench_conv")  # puts benchmarks/ on sys.path
    import _common as C

    before = os.sched_getaffinity(0)
    core = min(before)
    started, seen = threading.Event(), {}
    go = threading.Event()

    def worker(key, wait):
        started.set()
        if wait:
            go.wait(10)
        seen[key] = os.sched_getaffinity(0)

    early = threading.Thread(target=worker, args=("early", True))
    early.start()
    started.wait(10)
    try:
        assert C.pin_threads([core]) == [core]
        go.set()
        early.join(10)
        late = threading.Thread(target=worker, args=("late", False))
        late.start()
        late.join(10)
        assert seen["early"] == {core} and seen["late"] == {core} and os.sched_getaffinity(0) == {core}
    finally:
        go.set()
        C.pin_threads(sorted(before))
    assert os.sched_getaffinity(0) == before
