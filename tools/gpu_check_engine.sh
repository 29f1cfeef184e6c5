#!/usr/bin/env bash
# One-GPU check (< 5 min on one H200, + ~2 min for the engine leg). Prints one table:
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
#   ENGINES=0 bash tools/gpu_check_engine.sh                # skip the engine leg below
#
# Engine leg (after the table, unless ENGINES=0): the XL joint step under DeepSpeed ZeRO-3 and under FSDP2 (bf16
# parameters, fp32 reduction) at micro-batch ENGINE_MICRO_BATCH (default 16), one JSON line each in $OUT/engines.json
# (tools/bench_engine.py --gpu-xl --engines deepspeed,fsdp2); SANITY=1 checks both engines against the local one.
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
  rc=$?; (( rc == 0 )) || { tail -c 2000 "$OUT/xl.log"; exit $rc; }
  if [[ "${ENGINES:-1}" != 0 ]]; then
    timeout "$LIMIT_S" "$PY" tools/bench_engine.py --gpu-xl "${ENGINE_MICRO_BATCH:-2}" --gpu-config tiny --dry-run-cpu \
      --steps 1 --engines deepspeed,fsdp2 >"$OUT/engines.json" 2>"$OUT/engines.log"
    rc=$?; (( rc == 0 )) && cat "$OUT/engines.json" || tail -c 2000 "$OUT/engines.log"
  fi
  exit $rc
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
start=$(date +%s)
if [[ "${SANITY:-0}" == 1 ]]; then
  echo "sanity: local vs DeepSpeed and FSDP2 engines on tiny ..."
  if ! timeout 180 "$PY" tools/bench_engine.py --gpu-sanity --engines deepspeed,fsdp2 --steps 3 >"$OUT/sanity.json" \
      2>"$OUT/sanity.log"; then
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
left=$(( LIMIT_S + ${ENGINE_LIMIT_S:-150} - ($(date +%s) - start) ))
if [[ "${ENGINES:-1}" != 0 ]] && (( left > 30 )); then
  echo "engines: XL joint step, DeepSpeed ZeRO-3 vs FSDP2, micro-batch ${ENGINE_MICRO_BATCH:-16} ..."
  if timeout "$left" "$PY" tools/bench_engine.py --gpu-xl "${ENGINE_MICRO_BATCH:-16}" --steps "${STEPS:-3}" \
      --engines deepspeed,fsdp2 >"$OUT/engines.json" 2>"$OUT/engines.log"; then
    cat "$OUT/engines.json"
  else
    echo "engine leg failed or ran out of time; lines so far:"; cat "$OUT/engines.json"; tail -c 1500 "$OUT/engines.log"
    (( rc == 0 )) && rc=1
  fi
fi
exit $rc
