#!/usr/bin/env bash
# Re-checks and re-measures everything GPU-side, one part per device call (run from the project root on the GPU
# machine, after `../shared/device/fetch-wheels.sh` here; carry .device):
#     source .device/setup.sh && bash scripts/device_check.sh [kernels|tests|conv|ase|host|probes|sanitize]
# Writes under $OUT (or benchmarks/results/ when OUT is unset): gpu_tests_kernels.log (test_cuda_kernels.py,
# ~7 minutes on an H100 with the native extension's first build), gpu_tests.log (every other GPU test, ~3.5
# minutes), bench_conv_h100.json/.png (~5.5), bench_ase_h100.json (~3); give each its own device call (600 s
# per call). `host`: host time per call of every implementation in the layer-0 fwd+bwd cell (host_peers) and
# the kernels of the two double cells (profile_mode), ~3 minutes. `probes`: per-kernel times of
# every bench_conv cell, the output-part sweep, the layer-0 unroll sweep, the double-backward (d/dgout, parts)
# sweep, the float32 dx-atomics sweep and the staged-rows sweep (about 10 minutes: give it its own device call).
# `sc`: the symmetric-contraction kernels against the reference and their speed (sc_diag, sc_fmad_ab; ~3 minutes).
set -uo pipefail
what=${1:?usage: device_check.sh kernels|tests|conv|ase|host|probes|sanitize|sc}
out=${OUT:-benchmarks/results}
export MACE_ACCEL_CACHE_DIR=${MACE_ACCEL_CACHE_DIR:-/tmp/mace_accel_cache}
# mace imports OpenEquivariance when it is importable, which JIT-builds its extension (minutes): the parts that
# do not time it hide it while they run
hide_oeq() { if [ -d /tmp/site/openequivariance ]; then mv /tmp/site/openequivariance /tmp/oeq_hidden; fi; }
show_oeq() { if [ -d /tmp/oeq_hidden ]; then mv /tmp/oeq_hidden /tmp/site/openequivariance; fi; }
if [[ $what == kernels || $what == tests ]]; then
  hide_oeq
  if [[ $what == kernels ]]; then
    timeout -s INT 560 python -m pytest -v -p no:cacheprovider -m gpu tests/test_cuda_kernels.py --durations=15 \
      > "$out/gpu_tests_kernels.log" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$out/gpu_tests_kernels.log" | tail -8
  else
    timeout -s INT 560 python -m pytest -v -p no:cacheprovider -m gpu tests/ \
      --ignore tests/test_cuda_kernels.py --durations=15 > "$out/gpu_tests.log" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$out/gpu_tests.log" | tail -8
  fi
  show_oeq
fi
if [[ $what == host ]]; then
  timeout 240 python scripts/host_peers.py > "$out/host_peers.txt" 2>&1; tail -12 "$out/host_peers.txt"
  timeout 150 python scripts/profile_mode.py > "$out/profile_double.txt" 2>&1
  timeout 150 python scripts/profile_mode.py --config L0 --dtype float64 >> "$out/profile_double.txt" 2>&1
  grep "==" "$out/profile_double.txt"
fi
if [[ $what == conv ]]; then
  # the default budget (330 s): 250 s was too short on a fresh machine (v21: the last cell's peers skipped)
  timeout 400 python benchmarks/bench_conv.py --out "$out/bench_conv_h100.json" 2>&1 | tail -22
fi
if [[ $what == ase ]]; then
  timeout 200 python benchmarks/bench_ase.py --out "$out/bench_ase_h100.json" 2>&1 | tail -8
fi
if [[ $what == sc ]]; then
  # the symmetric contraction's kernels against the reference (sc_diag: 48 channels, every grad-w chunk) and
  # their speed, the grad-w kernels against the reference formula (sc_fmad_ab: 2048 nodes, 128 channels)
  hide_oeq
  timeout 150 python scripts/sc_diag.py > "$out/sc_diag.txt" 2>&1; grep "worst" "$out/sc_diag.txt"
  timeout 200 python scripts/sc_fmad_ab.py > "$out/sc_fmad_ab.txt" 2>&1; grep -E "nodes|grad-w" "$out/sc_fmad_ab.txt"
  show_oeq
fi
if [[ $what == sanitize ]]; then
  hide_oeq
  for t in memcheck racecheck synccheck; do
    timeout 200 compute-sanitizer --tool $t --kernel-name kns=mace_accel --print-limit 20 \
      python scripts/sanitize_conv.py > "$out/sanitize_conv_$t.txt" 2>&1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/sanitize_conv_$t.txt"
  done
  show_oeq
fi
if [[ $what == probes ]]; then
  hide_oeq
  timeout 200 python scripts/conv_breakdown.py > "$out/conv_breakdown.txt" 2>&1; grep event "$out/conv_breakdown.txt"
  timeout 300 python scripts/part_sweep.py > "$out/part_sweep.txt" 2>&1; tail -40 "$out/part_sweep.txt"
  timeout 120 python scripts/occupancy_sweep.py > "$out/occupancy_sweep.txt" 2>&1; tail -12 "$out/occupancy_sweep.txt"
  timeout 200 python scripts/double_sweep.py > "$out/double_sweep.txt" 2>&1; grep double "$out/double_sweep.txt"
  timeout 120 python scripts/dx_atomic_sweep.py > "$out/dx_atomic_sweep.txt" 2>&1; grep float32 "$out/dx_atomic_sweep.txt"
  timeout 300 python scripts/stage_sweep.py > "$out/stage_sweep.txt" 2>&1; grep stage "$out/stage_sweep.txt"
  show_oeq
fi
