#!/usr/bin/env bash
# Reproduce the tables of docs/benchmarks.md (CPU; a few minutes on 2 idle cores).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
python -m scoredistill.bench.gt3d_bench --out "$OUT/gt3d"  # ground-truth 3D benchmark (launch.py runs; ~1 h on 2 cores)
python -m scoredistill.bench.exact_score_bench --out "$OUT"
python -m scoredistill.bench.cost_bench --model tiny --resolution 64 --batch 1 --steps 3 --warmup 1 --threads 1 --out "$OUT"
# GPU only (not run here): the real SD 2.1-base architecture, random weights, 512² fp16
if [ "${WITH_GPU:-0}" = 1 ]; then
  python -m scoredistill.bench.cost_bench --model sd21-arch --device cuda --dtype fp16 --resolution 512 --batch 1 --steps 5 --warmup 2 --out "$OUT"
  OUT="$OUT/gpu_suite_full.json" benchmarks/gpu_suite.sh  # everything measured on a GPU, one results file
fi
