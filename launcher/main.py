"""One entry point for every way SimFlow training is started: plain ``python``, ``torchrun`` or ``srun``.

    python -m simflow.train --config configs/tiny.yaml train.steps=100
    torchrun --nproc_per_node=2 -m simflow.train --config configs/tiny.yaml parallel.engine=deepspeed
    torchrun --nproc_per_node=4 -m launcher --config configs/tiny.yaml parallel.engine=deepspeed parallel.tp_size=2
    srun -N2 --ntasks-per-node=4 python -m launcher --config configs/xl.yaml parallel.engine=deepspeed parallel.tp_size=4

Order of work: parse arguments -> load and validate the config (unknown keys, types, cross-field rules) -> check
the layout against the world size, deriving ``train.grad_accumulation`` from ``train.global_batch_size`` -> check
``data.path`` (local file or shard index, ``s3://`` object, ``pipe:`` program; a hostile shard index is refused
here) -> only then build anything. A bad config or data path exits with status 2 and a message naming the key or path, before any model,
data or process group exists. Then the run directory is claimed (run id + run lock) before the engines are built:
another live job's lock exits with status 73 naming its holder.

Exit statuses (``simflow.train.signals``): 0 done; 2 configuration error; 3 (``NONFINITE_EXIT_CODE``)
``train.max_skipped_steps`` consecutive non-finite steps, not requeued; 70 watchdog; 73 run directory locked by
another live job; 75 (``REQUEUE_EXIT_CODE``) saved after SIGTERM/SIGUSR1, run again. The trainer raises 3 and 75
as ``SystemExit`` subclasses, so every rank of every launcher exits with them unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Iterator, List, NoReturn, Optional

from simflow.config import ConfigError, load_config
from simflow.train.signals import CONFIG_EXIT_CODE, LOCKED_EXIT_CODE


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
    from simflow.data.loader import DataError
    from simflow.data.shards import check_data_path
    from simflow.parallel.topology import check_parallel_config
    from simflow.runtime import detect_dist_env

    try:
        env = detect_dist_env()  # torchrun variables, else srun's SLURM_*, else one process; starts nothing
        check_parallel_config(cfg, env.world_size, args.config)  # layout; derives grad_accumulation
        d = cfg.data
        check_data_path(d.source, d.path, d.s3_endpoint, d.timeout_s, d.retries)  # before any process group
        if env.world_size > 1 or cfg.parallel.engine != "local":
            from launcher.distributed import launch_distributed

            return launch_distributed(cfg, args.config, env)
    except (ConfigError, DataError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return CONFIG_EXIT_CODE
    from simflow.train.trainer import run

    with claimed_run_dir(cfg) as status:
        if status is not None:
            return status
        out = run(cfg)
    print(f"done: step {out['step']}; samples {out.get('samples')}; loss curve {out.get('loss_curve')}; "
          f"weights {out.get('weights')}")
    return 0


@contextlib.contextmanager
def claimed_run_dir(cfg) -> Iterator[Optional[int]]:
    """Take the run directory (run id + run lock, :func:`simflow.checkpoint.lock.claim_run_dir`; collective when a
    process group exists) before the engines are built, so that a second job is refused in seconds. Yields None
    when claimed (released on exit), else the exit status after printing why: :data:`LOCKED_EXIT_CODE` (73) when
    another live job holds the lock, :data:`CONFIG_EXIT_CODE` (2) when the directory belongs to another run id or
    the ranks come from different Slurm jobs (a rendezvous clash)."""
    from simflow.checkpoint.lock import RunLockError, claim_run_dir, run_dir_of
    from simflow.checkpoint.store import CheckpointError

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
    """Process entry point (``python -m launcher``, ``python -m simflow.train``): :func:`main`, then exit with its
    status. After a stop signal the trainer raises :class:`~simflow.train.signals.RequeueExit` once the stop step is
    committed on every rank; this then flushes the logs and leaves with ``os._exit(75)``, skipping interpreter
    finalization, so that a second signal (torchrun's SIGTERM to the surviving workers, srun's relay) cannot kill the
    process with -15 after Python restored its default handlers."""
    from simflow.train.signals import REQUEUE_EXIT_CODE, RequeueExit, hold_handlers_after_requeue

    hold_handlers_after_requeue()  # this process ends right after a stop step: later signals are only recorded
    try:
        rc = main(argv)
    except RequeueExit:
        logging.shutdown()
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        os._exit(REQUEUE_EXIT_CODE)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
