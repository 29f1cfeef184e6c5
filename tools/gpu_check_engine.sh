#!/usr/bin/env bash
# One-GPU check of the DeepSpeed engine (< 5 min on one H200):
#   1. sanity (~1 min): on the tiny config, the local and the DeepSpeed engine (NCCL, bf16 autocast) train the same
#      3 steps to bf16 accuracy, and the sharded EMA sample equals the exported weights' sample;
#   2. the XL model's joint training step (VAE + 1.36B flow + PatchGAN, bf16 autocast, ZeRO-3 at DP=1) at the
#      largest micro-batch that fits, with MFU.
#
#   bash tools/gpu_check_engine.sh                 # tries micro-batches 24 16 8, stops at the first that fits
#   MICRO_BATCHES="16 8" STEPS=3 OUT=/tmp/x bash tools/gpu_check_engine.sh
#
# Each attempt is a fresh process (an out-of-memory error leaves a CUDA context unusable) with its own time limit;
# attempts stop once BUDGET_S seconds are used. Prints the JSON line of tools/bench_engine.py --gpu-xl (step time,
# img/s, peak memory, FLOPs per step counted on a real step, MFU = FLOPs / step time / 989e12) and a summary line.
# Exit status 0 when the sanity check passed and one micro-batch ran, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/simflow-gpu-check}
STEPS=${STEPS:-4}
BUDGET_S=${BUDGET_S:-280}
ATTEMPT_S=${ATTEMPT_S:-150}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
start=$(date +%s)
echo "sanity: local vs DeepSpeed engine on tiny ..."
if ! timeout 120 "$PY" tools/bench_engine.py --gpu-sanity --steps 3 >"$OUT/sanity.json" 2>"$OUT/sanity.log"; then
  echo "sanity check FAILED: $(tail -c 600 "$OUT/sanity.json" "$OUT/sanity.log")"
  exit 1
fi
cat "$OUT/sanity.json"
for mb in ${MICRO_BATCHES:-24 16 8}; do
  left=$(( BUDGET_S - ($(date +%s) - start) ))
  if (( left < 60 )); then echo "budget used up before micro-batch $mb"; break; fi
  limit=$(( left < ATTEMPT_S ? left : ATTEMPT_S ))
  echo "micro-batch $mb (limit ${limit}s) ..."
  timeout "$limit" "$PY" tools/bench_engine.py --gpu-xl "$mb" --steps "$STEPS" >"$OUT/xl_mb$mb.json" 2>"$OUT/xl_mb$mb.log"
  rc=$?
  if (( rc == 0 )); then
    cat "$OUT/xl_mb$mb.json"
    "$PY" - "$OUT/xl_mb$mb.json" <<'EOF'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"XL on {r['device']}: micro-batch {r['micro_batch']}, {r['step_s']:.3f} s/step, {r['img_per_s']:.1f} img/s, "
      f"peak {r['peak_mem_gib']:.1f} GiB, {r['flops_per_step'] / 1e12:.1f} TFLOP/step, MFU {100 * r['mfu']:.1f}%")
EOF
    exit 0
  fi
  why=$(grep -m1 -oE "OutOfMemoryError[^\n]{0,160}|Error[^\n]{0,160}" "$OUT/xl_mb$mb.log" | head -c 200)
  echo "micro-batch $mb failed (rc=$rc): ${why:-see $OUT/xl_mb$mb.log}"
done
exit 1
