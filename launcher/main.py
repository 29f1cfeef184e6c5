"""One entry point for every way SimFlow training is started: plain ``python``, ``torchrun`` or ``srun``.

    python -m simflow.train --config configs/tiny.yaml train.steps=100
    torchrun --nproc_per_node=2 -m simflow.train --config configs/tiny.yaml parallel.engine=deepspeed
    torchrun --nproc_per_node=4 -m launcher --config configs/tiny.yaml parallel.engine=deepspeed parallel.tp_size=2
    srun -N2 --ntasks-per-node=4 python -m launcher --config configs/xl.yaml parallel.engine=deepspeed parallel.tp_size=4

Order of work: parse arguments -> load and validate the config (unknown keys, types, cross-field rules) -> only
then build anything. A bad config exits with status 2 and a message naming the key, before any model, data or
process group exists.

Exit statuses (``simflow.train.signals``): 0 done; 2 configuration error; 3 (``NONFINITE_EXIT_CODE``)
``train.max_skipped_steps`` consecutive non-finite steps, nothing saved, not requeued by ``slurm/train.sh`` (only
75 is); 70 watchdog; 75 (``REQUEUE_EXIT_CODE``) saved after SIGTERM/SIGUSR1, run again. The trainer raises 3 and 75
as ``SystemExit`` subclasses, so every rank of every launcher exits with them unchanged.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from simflow.config import ConfigError, load_config


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
    from simflow.parallel.topology import check_parallel_config, detect_dist_env

    try:
        env = detect_dist_env()  # torchrun variables, else srun's SLURM_*, else one process; starts nothing
        if env.world_size > 1 or cfg.parallel.engine != "local":
            from launcher.distributed import launch_distributed

            return launch_distributed(cfg, args.config, env)
        check_parallel_config(cfg, 1, args.config)  # global batch = micro x accumulation x 1
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from simflow.train.trainer import run

    out = run(cfg)
    print(f"done: step {out['step']}; samples {out.get('samples')}; loss curve {out.get('loss_curve')}; "
          f"weights {out.get('weights')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
