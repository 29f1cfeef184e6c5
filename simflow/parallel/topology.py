"""Process groups for SimFlow: who am I, who are my tensor-parallel and data-parallel peers.

Three ways a process can be started, all read from the environment (no flags):

* ``torchrun`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``,
  including one ``torchrun`` agent per node under ``srun``);
* ``srun`` directly, one task per process: ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID``; the
  rendezvous host is ``MASTER_ADDR`` when set, else the first host of ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST``;
  the port is ``MASTER_PORT`` when set, else derived from the job id
  (:func:`simflow.runtime.rendezvous_base_port`, the rule ``slurm/train.sh`` also starts from) so that all tasks of
  one job agree without talking to each other;
* a plain ``python`` process (world size 1).

:func:`simflow.runtime.detect_dist_env` only *reads* the environment: the launcher uses it to validate the configuration (global
batch = micro-batch x accumulation x DP) before any process group exists. :func:`init_topology` then starts
``torch.distributed`` (gloo on CPU, NCCL on CUDA), DeepSpeed's communication layer for the DeepSpeed engine and,
for DeepSpeed with TP > 1 only, megatron-core ``parallel_state`` (DeepSpeed's ``mpu`` and the column/row-parallel
layers read their groups from it; :func:`uses_megatron`). The FSDP2 engine builds its TP/DP groups from a
``DeviceMesh``, DeepSpeed at TP = 1 shards over the whole world and the local engine needs no groups, so none of them
imports megatron-core (about 2 s of CPU per process: it pulls in ``torch._dynamo``). Every engine places ranks alike
(:func:`rank_layout`, megatron order ``tp-cp-ep-dp-pp``): ``tp_size`` adjacent ranks per tensor-parallel group (ranks
``[0, 1]`` are one TP group when TP=2, so TP stays inside a node). DP = world / TP.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from simflow.config import ConfigError, SimFlowConfig, derive_grad_accumulation, global_batch_size, validate
from simflow.runtime import DistEnv, detect_dist_env, free_port, resolve_device


_STARTED = False  # init_topology started a process group in this process (its gloo/NCCL threads may still run)


def process_group_started() -> bool:
    """True once :func:`init_topology` started ``torch.distributed`` in this process (also after
    :func:`destroy_topology`): such a process should end through :func:`simflow.runtime.exit_now`."""
    return _STARTED


def rank_layout(rank: int, world_size: int, tp_size: int) -> Tuple[int, int]:
    """``(tp_rank, dp_rank)`` of global ``rank``: TP groups are ``tp_size`` adjacent ranks, DP groups the ranks
    ``tp_size`` apart (megatron-core's ``tp-cp-ep-dp-pp`` order with CP = EP = PP = 1; the FSDP2 engine's ``(dp,
    tp)`` mesh). Raises ValueError when ``tp_size`` does not divide ``world_size`` or ``rank`` is outside it."""
    if tp_size < 1 or world_size % tp_size or not 0 <= rank < world_size:
        raise ValueError(f"rank_layout: rank {rank} of world size {world_size} with TP={tp_size}")
    return rank % tp_size, rank // tp_size


def uses_megatron(cfg: SimFlowConfig) -> bool:
    """True when the engine takes its process groups from megatron-core ``parallel_state``: DeepSpeed with TP > 1
    (its ``mpu`` and the column/row-parallel layers). DeepSpeed at TP = 1 shards over the world (the topology makes
    its groups), FSDP2 uses a ``DeviceMesh``, the local engine no groups."""
    return cfg.parallel.engine == "deepspeed" and cfg.parallel.tp_size > 1


def resolve_backend(cfg: SimFlowConfig, device: torch.device) -> str:
    """``parallel.backend``: ``auto`` is NCCL on CUDA and gloo on CPU; NCCL on a CPU device is an error."""
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend='nccl' needs CUDA devices; use 'gloo' (or 'auto') on CPU")
    return backend


def check_parallel_config(cfg: SimFlowConfig, world_size: int, source: str = "<config>") -> int:
    """Check the parallel layout against the world size before any process group starts; return DP size.

    Rules: ``world_size % tp_size == 0``; the flow's attention heads divide by ``tp_size``; if
    ``train.global_batch_size`` is set, ``train.grad_accumulation`` is derived from it for this DP size (in place,
    :func:`simflow.config.derive_grad_accumulation`: the elastic rule, the same at every restart and under
    ``slurm/train.sh``) and must come out whole; TP > 1 needs a distributed engine (the local engine holds one
    process and no tensor-parallel groups).

    Raises:
        ConfigError: naming the key and the values at fault.
    """
    tp = cfg.parallel.tp_size
    if tp < 1 or world_size % tp != 0:
        raise ConfigError(
            f"{source}: parallel.tp_size={tp}: the world size {world_size} must be a multiple of the TP size"
        )
    dp = world_size // tp
    if cfg.parallel.engine == "local" and world_size > 1:
        raise ConfigError(
            f"{source}: parallel.engine='local' runs in one process, but the world size is {world_size}; "
            "use parallel.engine=deepspeed or parallel.engine=fsdp2"
        )
    if cfg.parallel.engine == "deepspeed" and cfg.parallel.zero_stage != 3:
        raise ConfigError(f"{source}: parallel.zero_stage={cfg.parallel.zero_stage}: only ZeRO stage 3 is supported")
    derive_grad_accumulation(cfg, dp, source)
    validate(cfg, dp_size=dp, source=source)
    return dp


@dataclass
class Topology:
    """This process's place in the job, after :func:`init_topology`.

    Attributes:
        env: the :class:`DistEnv` read at start.
        tp_size / tp_rank: tensor-parallel group size and rank (flow-transformer layers are split across it; every
            rank of a TP group sees the same micro-batch).
        dp_size / dp_rank: data-parallel size and rank. **Data loaders shard by (dp_rank, dp_size)**, not by the
            global rank; ZeRO-3 partitions parameters over the DP group.
        device: ``cpu`` or ``cuda:<local_rank>``.
        backend: ``gloo`` or ``nccl`` (``None`` when no process group was started: world size 1, local engine).
        engine: ``local``, ``deepspeed`` or ``fsdp2`` (from ``parallel.engine``).
        megatron: True when megatron-core ``parallel_state`` holds this job's TP/DP groups (:func:`uses_megatron`).
    """

    env: DistEnv
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    backend: Optional[str]
    engine: str
    megatron: bool = False
    _owns_process_group: bool = field(default=False, repr=False)
    _groups: Optional[Tuple[Any, Any]] = field(default=None, repr=False, compare=False)  # (tp, dp) made here

    @classmethod
    def single(cls, device: torch.device = torch.device("cpu"), engine: str = "local",
               env: Optional[DistEnv] = None) -> "Topology":
        """One process, no process group: rank 0 of world 1, TP = DP = 1 (a plain ``python`` run, the trainer's
        default, and :func:`init_topology` for a world of one with the local engine)."""
        env = env or DistEnv("single", 0, 1, 0, 1, 0, 1, "127.0.0.1", 0)
        return cls(env, 1, 0, 1, 0, device, None, engine)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (logging, file writes that happen once)."""
        return self.env.rank == 0

    @property
    def distributed(self) -> bool:
        """True when ``torch.distributed`` is initialised (world size > 1 or the DeepSpeed engine)."""
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    @property
    def tp_group(self):
        """This rank's tensor-parallel process group (``None`` when not distributed): megatron-core's when
        :attr:`megatron`, else (DeepSpeed at TP = 1) a group of this rank alone. Raises RuntimeError under an engine
        that keeps its groups in a ``DeviceMesh`` (FSDP2)."""
        return self._group(0, "get_tensor_model_parallel_group")

    @property
    def dp_group(self):
        """This rank's data-parallel process group (``None`` when not distributed): megatron-core's when
        :attr:`megatron`, else (DeepSpeed at TP = 1) the whole world. Raises RuntimeError under an engine that keeps
        its groups in a ``DeviceMesh`` (FSDP2)."""
        return self._group(1, "get_data_parallel_group")

    def _group(self, index: int, megatron_getter: str):
        if not self.distributed:
            return None
        if self._groups is not None:
            return self._groups[index]
        if not self.megatron:
            raise RuntimeError(f"parallel.engine={self.engine}: no TP/DP process groups here (the engine builds its "
                               f"own, e.g. FSDP2's DeviceMesh)")
        from megatron.core import parallel_state

        return getattr(parallel_state, megatron_getter)()

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process without a process group)."""
        if self.distributed:
            torch.distributed.barrier()

    def table(self, cfg: SimFlowConfig) -> str:
        """The topology as a small text table: world, TP, DP, micro-batch, accumulation, global batch."""
        rows = [
            ("launcher", self.env.launcher),
            ("engine", f"{self.engine} (ZeRO-{cfg.parallel.zero_stage})" if self.engine == "deepspeed" else self.engine),
            ("backend / device", f"{self.backend or '-'} / {self.device.type}"),
            ("nodes x procs/node", f"{self.env.num_nodes} x {self.env.local_world_size}"),
            ("world size", str(self.world_size)),
            ("tensor parallel (TP)", str(self.tp_size)),
            ("data parallel (DP)", str(self.dp_size)),
            ("micro-batch / rank", str(cfg.train.micro_batch_size)),
            ("grad accumulation", str(cfg.train.grad_accumulation)),
            ("global batch", f"{global_batch_size(cfg, self.dp_size)} = "
             f"{cfg.train.micro_batch_size} x {cfg.train.grad_accumulation} x {self.dp_size}"),
        ]
        w = max(len(k) for k, _ in rows)
        v = max(len(x) for _, x in rows)
        line = "+" + "-" * (w + 2) + "+" + "-" * (v + 2) + "+"
        out = [line] + [f"| {k.ljust(w)} | {x.ljust(v)} |" for k, x in rows] + [line]
        return "\n".join(out)

    def as_dict(self) -> Dict[str, object]:
        """Plain dict for logs and checkpoint metadata."""
        return {
            "launcher": self.env.launcher,
            "world_size": self.world_size,
            "rank": self.rank,
            "tp_size": self.tp_size,
            "tp_rank": self.tp_rank,
            "dp_size": self.dp_size,
            "dp_rank": self.dp_rank,
            "device": str(self.device),
            "backend": self.backend,
            "engine": self.engine,
        }


def init_topology(
    cfg: SimFlowConfig,
    env: Optional[DistEnv] = None,
    timeout_minutes: float = 30.0,
) -> Topology:
    """Start the process groups for ``cfg`` and return this rank's :class:`Topology`.

    Steps: check the layout (:func:`check_parallel_config`); pick the device and backend; set ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` in ``os.environ`` (DeepSpeed reads them);
    ``torch.distributed.init_process_group``; megatron-core ``parallel_state.initialize_model_parallel(tp_size)``
    where :func:`uses_megatron` (elsewhere the ranks come from :func:`rank_layout`); ``deepspeed.init_distributed``
    for the DeepSpeed engine. A world of one process with the local engine starts no process group at
    all.

    Raises:
        ConfigError: bad layout or environment.
    """
    global _STARTED
    env = env or detect_dist_env()
    dp = check_parallel_config(cfg, env.world_size)
    device = resolve_device(cfg.train.device, env.local_rank, "train.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    need_pg = env.world_size > 1 or cfg.parallel.engine != "local" or cfg.parallel.tp_size > 1
    if not need_pg:
        return Topology.single(device, cfg.parallel.engine, env)

    backend = resolve_backend(cfg, device)
    port = env.master_port or free_port(env.master_addr if env.launcher == "single" else "127.0.0.1")
    os.environ.update(
        {
            "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(port),
        }
    )
    owns = False
    if not torch.distributed.is_initialized():
        kwargs = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **kwargs,
        )
        owns = True
    _STARTED = True

    if cfg.parallel.engine == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if not uses_megatron(cfg):
        tp_rank, dp_rank = rank_layout(env.rank, env.world_size, cfg.parallel.tp_size)
        groups = None
        if cfg.parallel.engine == "deepspeed":  # TP = 1: DeepSpeed's mpu gets this rank alone as TP, the world as DP
            groups = (_own_rank_group(env.rank, env.world_size), torch.distributed.group.WORLD)
        return Topology(env=env, tp_size=cfg.parallel.tp_size, tp_rank=tp_rank, dp_size=dp, dp_rank=dp_rank,
                        device=device, backend=backend, engine=cfg.parallel.engine, _owns_process_group=owns,
                        _groups=groups)

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != cfg.parallel.tp_size:
            raise ConfigError(
                f"parallel.tp_size={cfg.parallel.tp_size}: megatron-core parallel_state is already initialised "
                f"with TP={parallel_state.get_tensor_model_parallel_world_size()}"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tp_size,
            create_gloo_process_groups=False,
            distributed_timeout_minutes=int(max(1, timeout_minutes)),
        )
    topo = Topology(
        env=env,
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
        backend=backend,
        engine=cfg.parallel.engine,
        megatron=True,
        _owns_process_group=owns,
    )
    if (topo.tp_rank, topo.dp_rank) != rank_layout(env.rank, env.world_size, topo.tp_size) or topo.dp_size != dp:
        raise RuntimeError(f"megatron-core placed rank {env.rank} at (tp_rank, dp_rank, dp_size) = "
                           f"({topo.tp_rank}, {topo.dp_rank}, {topo.dp_size}), expected "
                           f"{(*rank_layout(env.rank, env.world_size, topo.tp_size), dp)}")
    return topo


def _own_rank_group(rank: int, world_size: int):
    """The process group holding ``rank`` alone. Collective: ``torch.distributed.new_group`` must be called by every
    rank for every group, in the same order, so each rank creates all ``world_size`` singleton groups."""
    own = None
    for r in range(world_size):
        g = torch.distributed.new_group([r])
        if r == rank:
            own = g
    return own


def destroy_topology(topo: Optional[Topology] = None) -> None:
    """Tear down megatron-core's groups (when initialised; megatron-core is not imported for this) and the default
    process group (if :func:`init_topology` started it, or always when ``topo`` is None). Safe to call twice."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if topo is None or topo._owns_process_group:
            torch.distributed.destroy_process_group()


__all__ = [
    "Topology",
    "init_topology",
    "destroy_topology",
    "check_parallel_config",
    "rank_layout",
    "uses_megatron",
    "process_group_started",
    "resolve_backend",
]
