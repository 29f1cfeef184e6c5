#!/bin/bash
# FID-50k sample set as a Slurm job array: every array task runs one process per GPU (srun tasks) and writes its own
# index ranges of the set; the set does not depend on how it is split (python -m simflow.sample, README "Sampling
# for FID-50k").
#
#   sbatch slurm/sample_fid50k.sh --weights runs/xl-123456/weights.safetensors --config configs/xl.yaml \
#       --out samples/xl-cfg1.5 sample.cfg_scale=1.5
#   sbatch --array=0-31 slurm/sample_fid50k.sh --weights runs/xl-123456/checkpoints --out samples/xl   # 32 tasks
#
# Every argument goes to `python -m simflow.sample` unchanged; the array index and count come from
# SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT and the rank from srun (SLURM_PROCID / SLURM_STEP_NUM_TASKS).
# Resumable: a task skips the ranges whose parts are already written and verified (SHA-256), rewrites partial ones,
# and refuses parts made with other weights or settings. So re-submitting the same command after a failure, a
# cancellation or a time-out only computes what is missing; the last process to finish packs samples.npz.
# Near the time limit (--signal=B:USR1@120) a task requeues itself; its finished parts are kept.
# Settings for other clusters or tests come from sbatch options and the environment:
#   SIMFLOW_ROOT    repository checkout on the shared filesystem (default: the sbatch submit directory)
#   SIMFLOW_PYTHON  interpreter (default: $SIMFLOW_ROOT/.venv/bin/python, else python3)
#   e.g. on CPUs: sbatch --array=0-1 --ntasks-per-node=1 --gpus-per-task=0 slurm/sample_fid50k.sh ... --device cpu
#
#SBATCH --job-name=simflow-fid50k
#SBATCH --array=0-7
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

set -uo pipefail

log() { printf '[simflow-sample %s %s] %s\n' "$(date +%T)" "$(hostname)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit with 'sbatch slurm/sample_fid50k.sh --weights W --config C --out DIR'"
root=""
for c in "${SIMFLOW_ROOT:-}" "${SLURM_SUBMIT_DIR:-}"; do
  if [[ -n $c && -d $c/simflow && -f $c/slurm/sample_fid50k.sh ]]; then root=$(cd "$c" && pwd); break; fi
done
[[ -n $root ]] || die "cannot find the SimFlow checkout: submit from the repository root or set SIMFLOW_ROOT"
if [[ -z ${SIMFLOW_PYTHON:-} ]]; then
  if [[ -x $root/.venv/bin/python ]]; then SIMFLOW_PYTHON=$root/.venv/bin/python; else SIMFLOW_PYTHON=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

task=${SLURM_ARRAY_TASK_ID:-0}
log "job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID} task $task of ${SLURM_ARRAY_TASK_COUNT:-1} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS:-1} process(es) on $SLURM_JOB_NODELIST"

requeue() {  # time limit near (or scancel --signal=USR1 --batch): finished parts stay, the rest is redone
  log "got SIG$1: requeueing task $task (finished parts are kept)"
  if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
  log "scontrol requeue failed; re-submit the same command to finish the missing ranges"
  exit 75
}
trap 'requeue USR1' USR1

srun --kill-on-bad-exit=1 "$SIMFLOW_PYTHON" -m simflow.sample --no-progress "$@" &
pid=$!
while :; do
  wait "$pid"; rc=$?
  kill -0 "$pid" 2>/dev/null || break
done
log "task $task: simflow.sample finished with status $rc"
exit "$rc"
