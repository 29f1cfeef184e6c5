#!/bin/bash
# SimFlow training on a Slurm cluster, any config: one elastic torchrun agent per node, self-requeue on pre-emption.
#
#   sbatch [sbatch options] slurm/train.sh CONFIG.yaml [key=value ...]
#   sbatch --nodes=2 slurm/train.sh configs/l.yaml train.steps=400000
#   SIMFLOW_RUN_DIR=runs/l-123456 sbatch slurm/train.sh configs/l.yaml     # continue the run of an earlier job
#
# slurm/train_xl.sh is the same job with the XL recipe's #SBATCH settings and configs/xl.yaml.
#
# The one file plays three roles (README "Running on a Slurm cluster"):
#
#   batch shell (no argument flag)  on the first node: derives the rendezvous (MASTER_ADDR = first host of the job,
#                                   port from the job id), the run directory (keyed by the job id, so a requeued job
#                                   resumes the same run), starts one task per node with srun, relays SIGUSR1/SIGTERM
#                                   to the step, and after the step ends reads the trainers' exit codes: 0 -> done,
#                                   75 (simflow.train.signals.REQUEUE_EXIT_CODE) -> `scontrol requeue` (unless the
#                                   stop was a SIGTERM, i.e. Slurm cancelling the job), else failed.
#   --node                          one per node (srun task): `torchrun --nnodes=MIN:MAX --rdzv-backend=c10d
#                                   --max-restarts=K` with the c10d store on the first node. When a node dies, the
#                                   surviving agents restart their workers, which resume from the newest checkpoint
#                                   at the smaller world size.
#   --worker                        one per GPU (started by torchrun): runs `python -m simflow.launch --config CONFIG ...`,
#                                   relays signals to it and records its exit code in the run directory, because
#                                   torchrun itself never passes a worker's exit code on.
#
# Settings come from the environment (all optional) or from sbatch options; nothing here needs editing:
#   SIMFLOW_ROOT             repository checkout on the shared filesystem (default: the sbatch submit directory)
#   SIMFLOW_PYTHON           interpreter (default: $SIMFLOW_ROOT/.venv/bin/python, else python3)
#   SIMFLOW_CONFIG           config file when it is not the first argument
#   SIMFLOW_RUN_DIR          run directory = train.out_dir (default: $SIMFLOW_ROOT/runs/<config name>-<job id>)
#   SIMFLOW_NPROC_PER_NODE   workers per node (default: GPUs on the node, SLURM_GPUS_ON_NODE; else 1)
#   SIMFLOW_MIN_NODES        elastic minimum number of nodes (default 1; maximum = nodes of the job)
#   SIMFLOW_MAX_RESTARTS     torchrun --max-restarts (default 3): worker-group restarts after failures
#   SIMFLOW_RDZV_PORT        c10d rendezvous port on the first node. Default: the first free port from
#                            20000 + job id mod 10000 upwards (simflow.runtime.rendezvous_base_port, the same base as srun-only starts). Set: used as given, and the job stops (exit 2,
#                            saying why) if that port is already in use there, e.g. by another job's rendezvous
#   SIMFLOW_RDZV_CONF        extra torchrun --rdzv-conf entries, e.g. "last_call_timeout=10,join_timeout=900"
#   SIMFLOW_SHUTDOWN_TIMEOUT seconds the agents give workers to save after a stop signal (default 240; keep it
#                            below the --signal lead time)
#   SIMFLOW_MAX_REQUEUES     stop requeueing after this many restarts of the job (default 50)
#
#SBATCH --job-name=simflow
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --no-kill
#SBATCH --output=%x-%j.out

set -uo pipefail

REQUEUE_EXIT_CODE=75   # simflow.train.signals.REQUEUE_EXIT_CODE: state saved after SIGTERM/SIGUSR1, run again
# Never requeued (requeueing cannot help): 2 config / data.path / rendezvous clash (CONFIG_EXIT_CODE), 73 the run
# directory is locked by another live job (LOCKED_EXIT_CODE), 3 train.max_skipped_steps consecutive non-finite steps
# (NONFINITE_EXIT_CODE), 70 watchdog (torchrun restarts those workers inside the job).
LOCKED_EXIT_CODE=73
NONFINITE_EXIT_CODE=3

log() { printf '[simflow-slurm %s %s] %s\n' "$(date +%T)" "$(hostname)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

# ------------------------------------------------------------------------------------------------ shared setup
# Runs in every role; the batch shell exports what it derives, so srun tasks and torchrun workers see the same.
find_root() {
  local c
  for c in "${SIMFLOW_ROOT:-}" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)"; do
    if [[ -n $c && -d $c/simflow && -f $c/simflow/launch.py && -f $c/slurm/train.sh ]]; then
      (cd "$c" && pwd)
      return 0
    fi
  done
  return 1
}

setup_common() {
  SIMFLOW_ROOT=$(find_root) || die "cannot find the SimFlow checkout: submit from the repository root or set SIMFLOW_ROOT (tried '${SIMFLOW_ROOT:-}', '${SLURM_SUBMIT_DIR:-}')"
  export SIMFLOW_ROOT
  if [[ -z ${SIMFLOW_PYTHON:-} ]]; then
    if [[ -x $SIMFLOW_ROOT/.venv/bin/python ]]; then SIMFLOW_PYTHON=$SIMFLOW_ROOT/.venv/bin/python; else SIMFLOW_PYTHON=python3; fi
  fi
  export SIMFLOW_PYTHON
  export PYTHONPATH="$SIMFLOW_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

# ------------------------------------------------------------------------------------------------ role: worker
# One per GPU, started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, TORCHELASTIC_RESTART_COUNT set by it).
role_worker() {
  local child rc rec
  # The launcher applies the elastic global-batch rule itself at every (re)start: with train.global_batch_size set,
  # train.grad_accumulation follows the world size (simflow.config.derive_grad_accumulation), as under plain torchrun.
  "$SIMFLOW_PYTHON" -m simflow.launch --config "$SIMFLOW_CONFIG" "train.out_dir=$SIMFLOW_RUN_DIR" "$@" &
  child=$!
  # torchrun's agent sends the stop signal to this shell (and srun to every process of the step): pass it on.
  trap 'kill -s USR1 "$child" 2>/dev/null' USR1
  trap 'kill -s TERM "$child" 2>/dev/null' TERM
  while :; do
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break   # still alive: the wait was cut short by a relayed signal
  done
  rec="$SIMFLOW_EXIT_DIR/$(hostname)-rank${RANK:-0}-restart${TORCHELASTIC_RESTART_COUNT:-0}"
  echo "$rc" >"$rec.tmp" && mv -f "$rec.tmp" "$rec"
  exit "$rc"
}

# ------------------------------------------------------------------------------------------------ role: node
# One srun task per node: an elastic torchrun agent. The first node hosts the c10d rendezvous store (is_host), so
# the rendezvous survives the loss of any other node.
role_node() {
  local nproc host=0 conf
  nproc=${SIMFLOW_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
  [[ ${SLURM_NODEID:-0} == 0 ]] && host=1
  conf="is_host=$host${SIMFLOW_RDZV_CONF:+,$SIMFLOW_RDZV_CONF}"
  if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$nproc} / nproc > 0 ? ${SLURM_CPUS_PER_TASK:-$nproc} / nproc : 1 ))
  fi
  log "node ${SLURM_NODEID:-0}: torchrun agent, $nproc worker(s), rendezvous $MASTER_ADDR:$SIMFLOW_RDZV_PORT ($conf)"
  exec "$SIMFLOW_PYTHON" -m torch.distributed.run \
    --nnodes="$SIMFLOW_MIN_NODES:$SIMFLOW_NUM_NODES" \
    --nproc-per-node="$nproc" \
    --max-restarts="$SIMFLOW_MAX_RESTARTS" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_ADDR:$SIMFLOW_RDZV_PORT" \
    --rdzv-id="$SIMFLOW_RDZV_ID" \
    --rdzv-conf="$conf" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="$SIMFLOW_SHUTDOWN_TIMEOUT" \
    --no-python bash "$SIMFLOW_ROOT/slurm/train.sh" --worker "$@"
}

# ------------------------------------------------------------------------------------------------ role: batch
STOP_SIGNAL=""
relay_stop() {  # SIGUSR1 (--signal=B:USR1@lead, scancel --signal=USR1 --batch) or SIGTERM reached the batch shell
  STOP_SIGNAL=$1
  log "got SIG$1: asking every worker to save at the next step boundary and exit with status $REQUEUE_EXIT_CODE"
  # srun passes SIGUSR1 on to every process of the step; SIGTERM to srun would instead cancel the step after
  # KillWait, possibly in the middle of a checkpoint write. The trainer treats both signals alike.
  [[ -n ${SRUN_PID:-} ]] && kill -s USR1 "$SRUN_PID" 2>/dev/null
}

port_free() {  # port_free PORT: true if nothing listens on PORT on this host (the first node: the batch shell's)
  "$SIMFLOW_PYTHON" - "$1" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is free; a listener is not
s.bind(("", int(sys.argv[1])))
s.close()
PY
}

rendezvous_port() {
  # A job's agents must only ever join their own rendezvous: the rendezvous id carries the job id, and the port on
  # the first node is checked here (the batch shell runs on that node) before any agent starts.
  local p i
  if [[ -n ${SIMFLOW_RDZV_PORT:-} ]]; then
    [[ $SIMFLOW_RDZV_PORT =~ ^[0-9]+$ ]] && (( SIMFLOW_RDZV_PORT > 0 && SIMFLOW_RDZV_PORT < 65536 )) \
      || die "SIMFLOW_RDZV_PORT=$SIMFLOW_RDZV_PORT is not a TCP port number"
    port_free "$SIMFLOW_RDZV_PORT" || die "rendezvous port $SIMFLOW_RDZV_PORT (SIMFLOW_RDZV_PORT) is already in use on $MASTER_ADDR, probably by another job's rendezvous: not starting, so that this job cannot join or disturb it. Unset SIMFLOW_RDZV_PORT (a free port is then picked) or choose another"
    echo "$SIMFLOW_RDZV_PORT"
    return
  fi
  p=$((20000 + SLURM_JOB_ID % 10000))
  for (( i = 0; i < 100; i++ )); do
    if port_free "$p"; then echo "$p"; return; fi
    log "rendezvous port $p is in use on $MASTER_ADDR; trying the next one"
    p=$(( 20000 + (p - 20000 + 1) % 10000 ))
  done
  die "no free rendezvous port on $MASTER_ADDR among 100 tried from $((20000 + SLURM_JOB_ID % 10000)); set SIMFLOW_RDZV_PORT"
}

resolve_config() {
  local c=$1
  [[ $c == /* ]] && { echo "$c"; return; }
  if [[ -f ${SLURM_SUBMIT_DIR:-$PWD}/$c ]]; then echo "${SLURM_SUBMIT_DIR:-$PWD}/$c"; else echo "$SIMFLOW_ROOT/$c"; fi
}

role_batch() {
  [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit with 'sbatch slurm/train.sh CONFIG.yaml [key=value ...]'"
  if [[ $# -gt 0 && $1 != *=* && $1 == *.y*ml ]]; then SIMFLOW_CONFIG=$1; shift; fi
  [[ -n ${SIMFLOW_CONFIG:-} ]] || die "no config: pass CONFIG.yaml as the first argument or set SIMFLOW_CONFIG"
  SIMFLOW_CONFIG=$(resolve_config "$SIMFLOW_CONFIG")
  [[ -f $SIMFLOW_CONFIG ]] || die "config file $SIMFLOW_CONFIG does not exist"
  local name restart nodes
  name=$(basename "$SIMFLOW_CONFIG"); name=${name%.*}
  restart=${SLURM_RESTART_COUNT:-0}
  nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  export SIMFLOW_CONFIG
  export SIMFLOW_RUN_DIR=${SIMFLOW_RUN_DIR:-$SIMFLOW_ROOT/runs/$name-$SLURM_JOB_ID}
  [[ $SIMFLOW_RUN_DIR == /* ]] || SIMFLOW_RUN_DIR=$PWD/$SIMFLOW_RUN_DIR
  export SIMFLOW_EXIT_DIR=$SIMFLOW_RUN_DIR/slurm/exit-codes/$SLURM_JOB_ID.$restart
  export MASTER_ADDR
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  [[ -n $MASTER_ADDR ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
  SIMFLOW_RDZV_PORT=$(rendezvous_port) || exit 2
  export SIMFLOW_RDZV_PORT
  export SIMFLOW_RDZV_ID=simflow-$SLURM_JOB_ID-$restart
  export SIMFLOW_NUM_NODES=$nodes
  export SIMFLOW_MIN_NODES=${SIMFLOW_MIN_NODES:-1}
  export SIMFLOW_MAX_RESTARTS=${SIMFLOW_MAX_RESTARTS:-3}
  export SIMFLOW_SHUTDOWN_TIMEOUT=${SIMFLOW_SHUTDOWN_TIMEOUT:-240}
  (( SIMFLOW_MIN_NODES >= 1 && SIMFLOW_MIN_NODES <= nodes )) || die "SIMFLOW_MIN_NODES=$SIMFLOW_MIN_NODES must be in [1, $nodes] (the job's node count)"
  # A dead peer must surface as an error (then torchrun restarts the survivors), not as a hang.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # A fresh TCP store per rendezvous round: restarted workers otherwise read the dead round's keys and can hang in
  # init_process_group (pytorch/pytorch#135712).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
  mkdir -p "$SIMFLOW_EXIT_DIR" || die "cannot create $SIMFLOW_EXIT_DIR"
  rm -f "$SIMFLOW_EXIT_DIR"/*

  log "job $SLURM_JOB_ID restart $restart: $nodes node(s) [$SLURM_JOB_NODELIST], config $SIMFLOW_CONFIG, run dir $SIMFLOW_RUN_DIR"
  log "rendezvous c10d $MASTER_ADDR:$SIMFLOW_RDZV_PORT id $SIMFLOW_RDZV_ID, nodes $SIMFLOW_MIN_NODES:$nodes, max restarts $SIMFLOW_MAX_RESTARTS"

  trap 'relay_stop USR1' USR1
  trap 'relay_stop TERM' TERM
  # --kill-on-bad-exit=0 / --no-kill: a node whose task dies does not take the others down; their agents go on
  # at the smaller world size.
  srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=0 --no-kill \
    bash "$SIMFLOW_ROOT/slurm/train.sh" --node "$@" &
  SRUN_PID=$!
  [[ -n $STOP_SIGNAL ]] && relay_stop "$STOP_SIGNAL"   # the signal came before srun existed
  local rc
  while :; do
    wait "$SRUN_PID"; rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
  done
  SRUN_PID=""

  local codes
  codes=$(cat "$SIMFLOW_EXIT_DIR"/* 2>/dev/null | sort -nu | paste -sd, -)
  log "step ended (srun status $rc); worker exit codes: ${codes:-none recorded}${STOP_SIGNAL:+; stop signal SIG$STOP_SIGNAL}"
  if grep -qx 0 "$SIMFLOW_EXIT_DIR"/* 2>/dev/null; then
    log "result: done (run dir $SIMFLOW_RUN_DIR)"
    exit 0
  fi
  if grep -qx "$REQUEUE_EXIT_CODE" "$SIMFLOW_EXIT_DIR"/* 2>/dev/null; then
    if [[ $STOP_SIGNAL == TERM ]]; then
      # SIGTERM to the batch shell means Slurm is ending the job (scancel, time limit, pre-emption; a pre-emption
      # in REQUEUE mode requeues it by itself): do not turn a cancellation into a requeue.
      log "result: stopped by SIGTERM with a checkpoint saved; resubmit with SIMFLOW_RUN_DIR=$SIMFLOW_RUN_DIR to resume"
      exit "$REQUEUE_EXIT_CODE"
    fi
    if (( restart >= ${SIMFLOW_MAX_REQUEUES:-50} )); then
      log "result: requeue wanted but the job already restarted $restart times (SIMFLOW_MAX_REQUEUES); resubmit with SIMFLOW_RUN_DIR=$SIMFLOW_RUN_DIR"
      exit "$REQUEUE_EXIT_CODE"
    fi
    log "result: requeue (checkpoint saved; the requeued job resumes $SIMFLOW_RUN_DIR)"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    log "scontrol requeue failed (job submitted with --no-requeue?); resubmit with SIMFLOW_RUN_DIR=$SIMFLOW_RUN_DIR to resume"
    exit "$REQUEUE_EXIT_CODE"
  fi
  if grep -qx "$LOCKED_EXIT_CODE" "$SIMFLOW_EXIT_DIR"/* 2>/dev/null; then
    log "result: refused: another live job holds the run lock of $SIMFLOW_RUN_DIR (the worker output above names it); not requeued"
    exit "$LOCKED_EXIT_CODE"
  fi
  if grep -qx "$NONFINITE_EXIT_CODE" "$SIMFLOW_EXIT_DIR"/* 2>/dev/null; then
    log "result: stopped after too many consecutive non-finite steps (train.max_skipped_steps); not requeued"
    exit "$NONFINITE_EXIT_CODE"
  fi
  if grep -qx 2 "$SIMFLOW_EXIT_DIR"/* 2>/dev/null; then
    log "result: configuration, data.path or rendezvous error (named above); not requeued"
    exit 2
  fi
  log "result: failed (see the worker output above; the newest checkpoint in $SIMFLOW_RUN_DIR is kept)"
  (( rc != 0 )) && exit "$rc"
  exit 1
}

# ------------------------------------------------------------------------------------------------ dispatch
setup_common
case ${1:-} in
  --worker) shift; role_worker "$@" ;;
  --node) shift; role_node "$@" ;;
  *) role_batch "$@" ;;
esac
