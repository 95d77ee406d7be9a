#!/usr/bin/env bash
# The GPU suite (scoredistill.bench.gpu_suite): one prepared run, ONE results file (JSON), tables on stdout.
#   benchmarks/gpu_suite.sh                      # on a CUDA machine: full mode, ~10 min budget on one H200
#   MODE=tiny benchmarks/gpu_suite.sh            # CPU, seconds-scale plumbing run (what the test suite runs)
# Env: OUT (results file), MODE (full|tiny), BUDGET_S (wall-clock budget, default 540 s; later work is skipped
# and recorded as such), THREESTUDIO_ROOT (a threestudio work tree; default ./.threestudio).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=${MODE:-full}
OUT=${OUT:-benchmarks/results/gpu_suite_${MODE}.json}
export THREESTUDIO_ROOT=${THREESTUDIO_ROOT:-$REPO/.threestudio}
export PYTHONPATH="$REPO/custom${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$(dirname "$OUT")"
exec python -m scoredistill.bench.gpu_suite --mode "$MODE" --out "$OUT" --repo "$REPO" --budget-s "${BUDGET_S:-540}" "$@"
