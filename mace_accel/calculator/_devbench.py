"""Temporary device timing (not committed)."""
import time, sys
import numpy as np, torch
import mace_accel
from ase.build import bulk
from mace_accel.calculator import MACEAccelCalculator
from mace_accel.calculator.neighbours import neighbour_list
from mace.calculators import MACECalculator
from matscipy.neighbours import neighbour_list as mnl
MODEL = "mace_accel/data/bundled.model"
def sync(): torch.cuda.synchronize()
for rep in [(8, 8, 8), (17, 17, 17), (25, 25, 25)]:
    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(rep); a.rattle(0.05, seed=1)
    pos = torch.tensor(a.positions, device="cuda"); cell = torch.tensor(a.cell.array, device="cuda")
    for _ in range(3): ei, s = neighbour_list(pos, cell, (True,) * 3, 6.0)
    sync(); t = time.perf_counter()
    for _ in range(10): ei, s = neighbour_list(pos, cell, (True,) * 3, 6.0)
    sync(); dt = (time.perf_counter() - t) / 10
    t = time.perf_counter(); i, j, S = mnl("ijS", a, 6.0); dm = time.perf_counter() - t
    print(f"NL N={len(a)} E={ei.shape[1]} (matscipy {len(i)}) gpu {dt*1e3:.2f} ms, matscipy cpu {dm*1e3:.1f} ms, "
          f"peak mem {torch.cuda.max_memory_allocated()/2**20:.0f} MiB", flush=True)
a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((8, 8, 8)); a.rattle(0.05, seed=1)
a.symbols[::3] = "Ni"; a.symbols[1::7] = "Al"
def bench(calc, n=10):
    b = a.copy(); b.calc = calc; b.get_forces()
    sync(); t = time.perf_counter()
    for k in range(n):
        b.positions[k % len(b), 0] += 1e-3; b.get_forces(); b.get_stress()
    sync(); return (time.perf_counter() - t) / n
for dt in ["float32", "float64"]:
    r = bench(MACECalculator(model_paths=MODEL, device="cuda", default_dtype=dt))
    res = [f"mace {r*1e3:.1f} ms"]
    for acc in [False, True]:
        try:
            res.append(f"ours(acc={acc}) {bench(MACEAccelCalculator(MODEL, device='cuda', default_dtype=dt, accelerate=acc))*1e3:.1f} ms")
        except Exception as e:
            res.append(f"ours(acc={acc}) FAILED {type(e).__name__}: {e}")
    print(f"step 2048 atoms {dt}: " + ", ".join(res), flush=True)
