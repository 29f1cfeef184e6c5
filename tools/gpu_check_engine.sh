#!/usr/bin/env bash
# One-GPU check (< 5 min on one H200). Prints one table:
#   the XL joint training step (VAE + 1.36B flow + PatchGAN, bf16 autocast, AdamW, EMA; local engine: at DP=1
#   ZeRO-3 only adds gathers) for eager / compiled (train.compile) x without / with activation checkpointing
#   (train.activation_checkpointing), each at the largest micro-batch of MICRO_BATCHES that fits (out-of-memory is
#   caught in process, largest first): step time, img/s, peak memory, MFU = model FLOPs per step (FlopCounterMode on
#   the eager step, no recomputation counted) / step time / 989e12; then KV-cached guided sampling img/s at batch
#   SAMPLE_BATCH and the projected FID-50k sampling GPU-hours. One process (tools/bench_flow.py --gpu-xl) builds
#   the model once and switches variants in place, so only one layer graph and the VAE are compiled.
#
#   bash tools/gpu_check_engine.sh                          # the table (about 3-4 min)
#   SANITY=1 bash tools/gpu_check_engine.sh                 # first: local vs DeepSpeed engine on tiny (+~1 min)
#   MICRO_BATCHES="32 16" SAMPLE_BATCH=128 OUT=/tmp/x bash tools/gpu_check_engine.sh
#   DRY_RUN=1 bash tools/gpu_check_engine.sh                # no GPU: same code path on CPU, tiny config, fp32
#
# Exit status 0 when at least one variant ran (and the sanity check passed, if asked), 1 otherwise. The JSON result
# is left in $OUT/xl.json, the per-variant log in $OUT/xl.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python
OUT=${OUT:-/tmp/simflow-gpu-check}
LIMIT_S=${LIMIT_S:-285}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  # inductor's C++ compilation takes minutes on a small CPU: the dry run skips the compiled variants unless COMPILE=1
  timeout "$LIMIT_S" "$PY" tools/bench_flow.py --gpu-xl --dry-run-cpu --micro-batches ${MICRO_BATCHES:-4 2} \
    $([[ "${COMPILE:-0}" == 1 ]] || echo --no-compile) --xl-steps 1 --xl-sample-batch "${SAMPLE_BATCH:-4}" --json "$OUT/xl.json" 2>"$OUT/xl.log"
  rc=$?; (( rc == 0 )) || tail -c 2000 "$OUT/xl.log"; exit $rc
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
start=$(date +%s)
if [[ "${SANITY:-0}" == 1 ]]; then
  echo "sanity: local vs DeepSpeed engine on tiny ..."
  if ! timeout 120 "$PY" tools/bench_engine.py --gpu-sanity --steps 3 >"$OUT/sanity.json" 2>"$OUT/sanity.log"; then
    echo "sanity check FAILED: $(tail -c 600 "$OUT/sanity.json" "$OUT/sanity.log")"
    exit 1
  fi
  cat "$OUT/sanity.json"
fi
left=$(( LIMIT_S - ($(date +%s) - start) ))
timeout "$left" "$PY" tools/bench_flow.py --gpu-xl --micro-batches ${MICRO_BATCHES:-64 48 32 24 16 8} \
  --xl-steps "${STEPS:-3}" --xl-sample-batch "${SAMPLE_BATCH:-256}" --json "$OUT/xl.json" 2>"$OUT/xl.log"
rc=$?
if (( rc != 0 )); then
  echo "XL benchmark failed or ran out of time (rc=$rc); variants finished so far:"
  grep '^{' "$OUT/xl.log" || true
  tail -c 1500 "$OUT/xl.log"
fi
exit $rc
