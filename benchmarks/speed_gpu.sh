#!/usr/bin/env bash
# Issue 26 on a bare CUDA machine (no network) with the gpu-kit copied to .gpu-kit/ (wheels in .gpu-kit/whl,
# threestudio in .gpu-kit/threestudio or .threestudio/): set up as the kit's run.sh does (skipped when already
# done on this machine), then the GPU suite's `parity` and `speed` sections (scoredistill.bench.gpu_suite):
# each Gaussian config at its own settings, results written after each config.
#   OUT=/path BUDGET=230 STEPS=12 bash benchmarks/speed_gpu.sh
# Results: $OUT/speed.json (+ speed.log, gsplat_build.log, env.txt); tables: the last lines of speed.log, or
#   PYTHONPATH=custom python3 -m scoredistill.bench.gpu_suite --report $OUT/speed.json
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT"
OUT=${OUT:-$ROOT/gpu-kit-out}; mkdir -p "$OUT"
KIT=$ROOT/.gpu-kit
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export SCOREDISTILL_GPU_SUITE_WORK=${SCOREDISTILL_GPU_SUITE_WORK:-/tmp/gsw}
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } > "$OUT/env.txt" 2>&1
if [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(PYTHONPATH=/tmp/site python3 -c "import torch;m,n=torch.cuda.get_device_capability();print(f'{m}.{n}')")}
TS_SRC=$KIT/threestudio; [ -d "$TS_SRC" ] || TS_SRC=$ROOT/.threestudio
[ -d /tmp/ts ] || { cp -r "$TS_SRC" /tmp/ts && rm -rf /tmp/ts/custom /tmp/ts/outputs && mkdir -p /tmp/ts/custom; }
( cd /tmp && PYTHONPATH=/tmp/site timeout "${GS_TIMEOUT:-330}" python3 -c "import time;t=time.time();from gsplat.cuda._backend import _C;print('gsplat_C_loaded', _C is not None, round(time.time()-t,1),'s')" ) > "$OUT/gsplat_build.log" 2>&1
echo "[speed_gpu] setup done in $(( $(date +%s) - T0 )) s: $(tail -1 "$OUT/gsplat_build.log")"
PYTHONPATH="$ROOT/custom:/tmp/site:$KIT/stubs" THREESTUDIO_ROOT=/tmp/ts \
  python3 -m scoredistill.bench.gpu_suite --mode full --repo "$ROOT" --sections parity speed \
  --launch-steps "${STEPS:-12}" --budget-s "${BUDGET:-230}" --out "$OUT/speed.json" 2>&1 | tee "$OUT/speed.log"
echo "[speed_gpu] done in $(( $(date +%s) - T0 )) s"
