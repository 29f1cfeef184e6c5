#!/bin/bash
# SimFlow XL (the paper's model: 1.36B flow + 70M VAE, ImageNet 256x256; configs/xl.yaml) on 2 nodes x 8 GPUs
# with DeepSpeed ZeRO-3: global batch 256 = micro-batch 16 x 16 GPUs.
#
#   sbatch slurm/train_xl.sh [key=value ...]
#   sbatch slurm/train_xl.sh data.path=s3://my-bucket/imagenet-256/train loss.perceptual.weights=/models/vgg16.pth
#   sbatch --partition=gpu --account=myproj slurm/train_xl.sh          # site options go on the sbatch line
#
# What the job does (all of it lives in slurm/train.sh, which this script runs with configs/xl.yaml):
#   - one elastic torchrun agent per node (c10d rendezvous on the first node, port from the job id), 8 workers each;
#   - the run directory runs/xl-<job id> is keyed by the job id, so a requeued job resumes the same run from its
#     newest valid checkpoint;
#   - SIGUSR1 arrives 10 minutes before the time limit (--signal=B:USR1@600): every rank finishes its step, saves,
#     and exits with status 75; the batch shell then requeues the job (--requeue) and the output file is appended to
#     (--open-mode=append);
#   - a node that dies does not end the job (--no-kill, srun --kill-on-bad-exit=0): the agents on the surviving
#     nodes restart their workers at the smaller world size from the newest checkpoint, with train.grad_accumulation
#     raised so the global batch stays 256.
# Settings for other clusters or for tests come from sbatch options and SIMFLOW_* environment variables (listed in
# slurm/train.sh), e.g. a CPU test on two nodes:
#   SIMFLOW_CONFIG=configs/tiny.yaml sbatch --gpus-per-node=0 --cpus-per-task=1 --mem=0 slurm/train_xl.sh ...
#
#SBATCH --job-name=simflow-xl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --no-kill
#SBATCH --output=%x-%j.out

set -uo pipefail
export SIMFLOW_CONFIG=${SIMFLOW_CONFIG:-configs/xl.yaml}
export SIMFLOW_SHUTDOWN_TIMEOUT=${SIMFLOW_SHUTDOWN_TIMEOUT:-540}   # below the 600 s signal lead

root=${SIMFLOW_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $root/slurm/train.sh ]]; then
  echo "[simflow-slurm] ERROR: $root/slurm/train.sh not found: submit from the repository root or set SIMFLOW_ROOT" >&2
  exit 2
fi
# exec keeps this process (the batch shell Slurm signals) and hands it to the common job logic.
exec bash "$root/slurm/train.sh" "$@"
