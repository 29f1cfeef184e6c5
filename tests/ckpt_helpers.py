"""Helpers shared by the checkpoint tests (not collected by pytest: no ``test_`` prefix).

The smallest settings that still exercise every part of the state: the tiny config at flow width 32 with one layer
per block, micro-batches of 4, a GroupNorm discriminator active from step 1 (so D's weights, optimizer and the GAN
term are in the state), label dropout 0.5 and per-sample posterior noise (both drawn from the global sample
index, so an exact resume needs the loader position).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def small_overrides(demo_npz: str, out_dir: str, *extra: str) -> List[str]:
    """``key=value`` overrides for a fast, complete tiny run writing to ``out_dir``."""
    return [
        "data.source=npz", f"data.path={demo_npz}", f"train.out_dir={out_dir}", "logging.wandb=disabled", "eval.self_score_samples=0",
        "train.sample_every=0", "train.log_every=1", "train.sample_grid=2", "train.micro_batch_size=4",
        "model.flow.width=32", "model.flow.layers_per_block=[1,1,1,1]", "loss.gan.start_step=1",
        "loss.gan.norm=group", "train.label_drop=0.5", "optim.warmup_steps=2", "train.ema_decay=0.5",
        "checkpoint.lock_heartbeat_s=1", "checkpoint.lock_stale_s=30", *extra,
    ]


def weights_of(trainer) -> Dict[str, torch.Tensor]:
    """Full fp32 raw and EMA weights of a trainer's generator and discriminator (for bitwise comparisons)."""
    out = {f"gen.{k}": v for k, v in trainer.gen.full_state_dict(ema=False).items()}
    out.update({f"ema.{k}": v for k, v in trainer.gen.full_state_dict(ema=True).items()})
    if trainer.disc is not None:
        out.update({f"disc.{k}": v for k, v in trainer.disc.full_state_dict(ema=False).items()})
    return out


def child_env(**extra: str) -> Dict[str, str]:
    """Environment for a child training process: one thread, this repo importable, the shared DeepSpeed JIT
    cache (``TORCH_EXTENSIONS_DIR`` as set by the caller, else DeepSpeed's default)."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_PROCID"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore::FutureWarning")
    env.update(extra)
    return env


def launch_ranks(world: int, overrides: Sequence[str], logdir: str, port: int,
                 module: str = "simflow.launch") -> List[subprocess.Popen]:
    """Start ``world`` processes of ``python -m simflow.launch --config tiny.yaml ...`` with torchrun-style variables
    (one process per rank, as ``srun`` without torchrun would); stdout+stderr go to ``logdir/rank<r>.log``."""
    procs = []
    for r in range(world):
        env = child_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(os.path.join(logdir, f"rank{r}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, "-m", module, "--config", TINY, *overrides], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True))
    return procs


def wait_all(procs: Sequence[subprocess.Popen], timeout: float) -> List[Optional[int]]:
    """Exit codes after all exit or ``timeout`` s pass (then the rest are killed and report None)."""
    deadline = time.time() + timeout
    codes: List[Optional[int]] = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return codes


def read_logs(logdir: str) -> str:
    out = []
    for name in sorted(os.listdir(logdir)):
        if name.endswith(".log"):
            with open(os.path.join(logdir, name), errors="replace") as f:
                out.append(f"==== {name}\n{f.read()[-4000:]}")
    return "\n".join(out)


def descendants(pid: int):
    """PIDs of every process below ``pid`` (from /proc/<pid>/task/<pid>/children, recursively)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a torchrun agent and every process below it (its workers run in sessions of their own)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
