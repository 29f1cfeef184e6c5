"""``build_engine``: the one place that turns (config, model constructor, role) into an :class:`Engine`.

The trainer passes a *constructor* rather than a module so that the DeepSpeed engine can build the model under
``deepspeed.zero.Init`` (partitioned as it is built) and choose the linear-layer factory (tensor parallelism).
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from simflow.config import SimFlowConfig
from simflow.parallel.engine import Engine, LocalEngine, optimizer_settings
from simflow.parallel.parallelize import parallelize


def build_engine(
    cfg: SimFlowConfig,
    build_module: Callable[..., nn.Module],
    role: str,
    ema_prefixes: Sequence[str],
    topology,
) -> Engine:
    """Engine for ``role`` (``"generator"`` | ``"discriminator"``) chosen by ``parallel.engine``.

    Args:
        cfg: SimFlow config.
        build_module: ``build_module(linear_factory=None) -> nn.Module``. ``local``: called with no factory (dense
            layers) and moved to ``topology.device``; ``deepspeed``: called once with the TP or dense factory under
            ``deepspeed.zero.Init``; ``fsdp2``: called with no factory (dense layers), then parallelised from
            outside (:func:`~simflow.parallel.fsdp2_parallelize.parallelize_simflow`).
        role: selects LR/betas (``optim.lr``/``betas`` or ``optim.disc_lr``/``disc_betas``).
        ema_prefixes: sub-modules with an EMA (e.g. ``["flow"]``).
        topology: the :class:`~simflow.parallel.topology.Topology` (``Topology.single`` for one process).

    Raises:
        ValueError: ``parallel.engine=local`` with more than one process, or an unknown ``parallel.engine``.
    """
    if cfg.parallel.engine == "deepspeed":
        from simflow.parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, build_module, role, ema_prefixes, topology)
    if cfg.parallel.engine == "fsdp2":
        from simflow.parallel.fsdp2_engine import FSDP2Engine

        return FSDP2Engine(cfg, lambda: build_module(), role, ema_prefixes, topology)
    if cfg.parallel.engine != "local":
        raise ValueError(f"parallel.engine={cfg.parallel.engine!r}: must be 'local', 'deepspeed' or 'fsdp2'")
    if topology.world_size > 1:
        raise ValueError("parallel.engine=local runs in one process; use parallel.engine=deepspeed or fsdp2 under "
                         "torchrun/srun")
    module = parallelize(build_module().to(topology.device), cfg.train)  # train.compile / activation_checkpointing
    s = optimizer_settings(cfg, role)
    return LocalEngine(
        module,
        lr=s["lr"],
        betas=s["betas"],
        weight_decay=s["weight_decay"],
        eps=s["eps"],
        grad_accumulation=cfg.train.grad_accumulation,
        grad_clip=s["grad_clip"],
        warmup_steps=s["warmup_steps"],
        schedule=s["schedule"],
        total_steps=s["total_steps"],
        min_lr=s["min_lr"],
        ema_prefixes=ema_prefixes,
        ema_decay=cfg.train.ema_decay,
    )


__all__ = ["build_engine"]
