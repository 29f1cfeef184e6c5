"""The distributed half of the launcher: torchrun / srun environment -> checked layout -> process groups -> trainer.

Called by :func:`launcher.main.main` when the world size is above one or ``parallel.engine`` is not ``local``.
Order of work, so that a bad layout fails fast and identically on every rank:

1. read rank / world size / rendezvous from the environment (:func:`simflow.runtime.detect_dist_env`:
   torchrun variables, else srun's ``SLURM_*``), without starting anything;
2. check the layout against the config (world divisible by ``parallel.tp_size``; with ``train.global_batch_size``
   set, ``train.grad_accumulation`` is derived for this DP size and must come out whole; heads divisible by TP)
   -> exit status 2 with the key named (``data.path`` was already checked by :func:`launcher.main.main`);
3. start the process groups (gloo on CPU, NCCL on CUDA) and megatron-core's TP/DP groups;
4. claim the run directory (run id + run lock, collective; another live job's lock -> exit 73 naming it), then
   print the topology table once (rank 0);
5. run the trainer (:func:`simflow.train.trainer.run`) with the engine factory
   :func:`simflow.parallel.factory.build_engine`; tear the groups down at the end, also on errors.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

from simflow.config import ConfigError, SimFlowConfig
from simflow.parallel.topology import check_parallel_config, destroy_topology, init_topology
from simflow.runtime import DistEnv, detect_dist_env


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
        from launcher.main import claimed_run_dir

        with claimed_run_dir(cfg) as status:  # collective; before DeepSpeed builds anything
            if status is not None:
                return status
            if topo.is_main:
                print(topo.table(cfg), flush=True)
            from simflow.parallel.factory import build_engine
            from simflow.train.trainer import run

            out = run(cfg, topo, build_engine=build_engine)
        if topo.is_main:
            print(f"done: step {out['step']}; samples {out.get('samples')}; loss curve {out.get('loss_curve')}; "
                  f"weights {out.get('weights')}", flush=True)
        return 0
    finally:
        destroy_topology(topo)


__all__ = ["launch_distributed"]
