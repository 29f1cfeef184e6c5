"""One entry point for every way SimFlow training is started: plain ``python``, ``torchrun`` or ``srun``.

``python -m simflow.launch`` and ``python -m simflow.train`` are the same command (console scripts
``simflow-launch``, ``simflow-train``).

    python -m simflow.train --config configs/tiny.yaml train.steps=100
    torchrun --nproc_per_node=2 -m simflow.train --config configs/tiny.yaml parallel.engine=deepspeed
    torchrun --nproc_per_node=4 -m simflow.launch --config configs/tiny.yaml parallel.engine=deepspeed parallel.tp_size=2
    srun -N2 --ntasks-per-node=4 python -m simflow.launch --config configs/xl.yaml parallel.engine=deepspeed parallel.tp_size=4

Order of work: parse arguments -> load and validate the config (unknown keys, types, cross-field rules) -> check
the layout against the world size, deriving ``train.grad_accumulation`` from ``train.global_batch_size`` -> check
``data.path`` (local file or shard index, ``s3://`` object, ``pipe:`` program; a hostile shard index is refused
here) -> only then build anything. A bad config or data path exits with status 2 and a message naming the key or path, before any model,
data or process group exists. Then the run directory is claimed (run id + run lock) before the engines are built:
another live job's lock exits with status 73 naming its holder. One process: the trainer runs here. Several (or the
DeepSpeed engine): :func:`launch_distributed` starts the process groups first. At the end rank 0 self-scores the
exported weights when ``eval.self_score_samples > 0`` (:mod:`simflow.eval.self_score`; here, not in the trainer,
so that training never imports evaluation code).

Exit statuses (``simflow.train.signals``): 0 done; 2 configuration error; 3 (``NONFINITE_EXIT_CODE``)
``train.max_skipped_steps`` consecutive non-finite steps, not requeued; 70 watchdog; 73 run directory locked by
another live job; 75 (``REQUEUE_EXIT_CODE``) saved after SIGTERM/SIGUSR1, run again. The trainer raises 3 and 75
as ``SystemExit`` subclasses, so every rank of every launcher exits with them unchanged.

**The distributed path** (:func:`launch_distributed`): torchrun / srun environment -> checked layout -> process
groups -> trainer. Called by :func:`main` when the world size is above one or ``parallel.engine`` is not ``local``.
Order of work, so that a bad layout fails fast and identically on every rank:

1. read rank / world size / rendezvous from the environment (:func:`simflow.runtime.detect_dist_env`:
   torchrun variables, else srun's ``SLURM_*``), without starting anything;
2. check the layout against the config (world divisible by ``parallel.tp_size``; with ``train.global_batch_size``
   set, ``train.grad_accumulation`` is derived for this DP size and must come out whole; heads divisible by TP)
   -> exit status 2 with the key named (``data.path`` was already checked by :func:`main`);
3. start the process groups (gloo on CPU, NCCL on CUDA; megatron-core's TP/DP groups for DeepSpeed with TP > 1);
4. claim the run directory (run id + run lock, collective; another live job's lock -> exit 73 naming it), then
   print the topology table once (rank 0);
5. run the trainer (:func:`simflow.train.trainer.run`) with the engine factory
   :func:`simflow.parallel.factory.build_engine`; tear the groups down at the end, also on errors.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Any, Dict, Iterator, List, NoReturn, Optional

from simflow.checkpoint.lock import RunLockError, claim_run_dir, run_dir_of
from simflow.checkpoint.store import CheckpointError
from simflow.config import ConfigError, SimFlowConfig, load_config
from simflow.data.loader import DataError
from simflow.data.shards import check_data_path
from simflow.eval.self_score import score_run
from simflow.parallel.factory import build_engine
from simflow.parallel.topology import (Topology, check_parallel_config, destroy_topology, init_topology,
                                       process_group_started)
from simflow.runtime import DistEnv, detect_dist_env, exit_now, resolve_device
from simflow.train.signals import (CONFIG_EXIT_CODE, LOCKED_EXIT_CODE, REQUEUE_EXIT_CODE, RequeueExit,
                                   hold_handlers_after_requeue)
from simflow.train.trainer import run


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="simflow-train", description="Train SimFlow (VAE + flow, jointly).")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 model.flow.width=128")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        env = detect_dist_env()  # torchrun variables, else srun's SLURM_*, else one process; starts nothing
        check_parallel_config(cfg, env.world_size, args.config)  # layout; derives grad_accumulation
        d = cfg.data
        check_data_path(d.source, d.path, d.s3_endpoint, d.timeout_s, d.retries)  # before any process group
        if env.world_size > 1 or cfg.parallel.engine != "local":
            return launch_distributed(cfg, args.config, env)
    except (ConfigError, DataError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return CONFIG_EXIT_CODE
    with claimed_run_dir(cfg) as status:
        if status is not None:
            return status
        out = train_and_score(cfg)
    print_done(out)
    return 0


def train_and_score(cfg: SimFlowConfig, topology: Optional[Topology] = None, build_engine=None) -> Dict[str, Any]:
    """:func:`simflow.train.trainer.run`, then on rank 0 the end-of-run self-score of the exported weights
    (``eval.self_score_samples > 0``: one printed line, ``<train.out_dir>/eval.json`` and ``out["eval"]``;
    :func:`simflow.eval.self_score.score_run`, on the trainer's device). Rank 0 alone: no collective follows.

    Returns:
        the trainer's result dict (``step``, ``metrics``, ``samples``, ``loss_curve``, ``weights``), plus ``eval``.
    """
    out = run(cfg, topology, build_engine)
    if (topology is None or topology.is_main) and cfg.eval.self_score_samples > 0 and out.get("weights"):
        device = topology.device if topology is not None else resolve_device(cfg.train.device, key="train.device")
        out["eval"] = score_run(out["weights"], cfg, cfg.train.out_dir, step=out["step"], device=device)
        print(out["eval"]["line"], flush=True)
    return out


def print_done(out: Dict[str, Any]) -> None:
    print(f"done: step {out['step']}; samples {out.get('samples')}; loss curve {out.get('loss_curve')}; "
          f"weights {out.get('weights')}", flush=True)


@contextlib.contextmanager
def claimed_run_dir(cfg) -> Iterator[Optional[int]]:
    """Take the run directory (run id + run lock, :func:`simflow.checkpoint.lock.claim_run_dir`; collective when a
    process group exists) before the engines are built, so that a second job is refused in seconds. Yields None
    when claimed (released on exit), else the exit status after printing why: :data:`LOCKED_EXIT_CODE` (73) when
    another live job holds the lock, :data:`CONFIG_EXIT_CODE` (2) when the directory belongs to another run id or
    the ranks come from different Slurm jobs (a rendezvous clash)."""
    root, run_id = run_dir_of(cfg)
    try:
        claim = claim_run_dir(root, run_id, cfg.checkpoint)
    except RunLockError as e:
        print(f"run lock: {e}", file=sys.stderr, flush=True)
        yield LOCKED_EXIT_CODE
        return
    except CheckpointError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        yield CONFIG_EXIT_CODE
        return
    try:
        yield None
    finally:
        claim.release()


def entry(argv: Optional[List[str]] = None) -> NoReturn:
    """Process entry point (``python -m simflow.launch``, ``python -m simflow.train``): :func:`main`, then exit with its
    status. After a stop signal the trainer raises :class:`~simflow.train.signals.RequeueExit` once the stop step is
    committed on every rank; this then leaves with status 75 through :func:`simflow.runtime.exit_now`, skipping
    interpreter finalization, so that a second signal (torchrun's SIGTERM to the surviving workers, srun's relay)
    cannot kill the process with -15 after Python restored its default handlers. A process that started process
    groups leaves the same way with any status: gloo's threads can abort a finalizing interpreter (``exit_now``)."""
    hold_handlers_after_requeue()  # this process ends right after a stop step: later signals are only recorded
    try:
        rc = main(argv)
    except RequeueExit:
        exit_now(REQUEUE_EXIT_CODE)
    except SystemExit as e:  # NonFiniteExit (status 3) and friends, after the process groups were torn down
        if process_group_started():
            exit_now(e.code if isinstance(e.code, int) else 1)
        raise
    if process_group_started():
        exit_now(rc)
    sys.exit(rc)


def launch_distributed(cfg: SimFlowConfig, source: str = "<config>", env: Optional[DistEnv] = None) -> int:
    """Run training in this process as one rank of a torchrun/srun job. Returns the process exit status
    (0 done, 2 configuration or environment error, 73 run directory locked by another live job)."""
    try:
        env = env or detect_dist_env()
        check_parallel_config(cfg, env.world_size, source)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("megatron").setLevel(logging.WARNING)  # import-time notices, once per rank
    topo = init_topology(cfg, env)
    try:
        if not topo.is_main:
            logging.getLogger().setLevel(logging.WARNING)
            logging.getLogger("simflow").setLevel(logging.WARNING)
        with claimed_run_dir(cfg) as status:  # collective; before DeepSpeed builds anything
            if status is not None:
                return status
            if topo.is_main:
                print(topo.table(cfg), flush=True)
            out = train_and_score(cfg, topo, build_engine=build_engine)
        if topo.is_main:
            print_done(out)
        return 0
    finally:
        destroy_topology(topo)


__all__ = ["main", "entry", "launch_distributed", "claimed_run_dir", "train_and_score"]


if __name__ == "__main__":
    entry()
