"""FSDP2 + DTensor tensor-parallel engine (``parallel.engine=fsdp2``) behind the trainer's :class:`Engine` interface.

The PyTorch-native counterpart of :mod:`simflow.parallel.deepspeed_engine`, with the same call protocol, the same
non-finite policy (:mod:`simflow.parallel.engine`), the same AdamW settings and LR schedule, and the same checkpoints:

1. **Build**: the plain model (dense linear factory) is built whole on every rank from the same seed, moved to the
   device, then :func:`~simflow.parallel.fsdp2_parallelize.parallelize_simflow` applies DTensor TP over the
   ``"tp"`` mesh dimension, activation checkpointing / compile, and ``fully_shard`` over ``"dp"`` (per transformer
   layer, per VAE stage, root). The mesh is ``(dp, tp)`` with TP ranks adjacent, the same ranks as the megatron-core
   groups of :mod:`simflow.parallel.topology`, so data loaders shard by the same DP rank under either engine.
2. **Optimizer**: ``torch.optim.AdamW(foreach=True)`` on the sharded DTensor parameters (fused AdamW has no DTensor
   kernel on CPU); the moments are DTensors with the parameters' placements.
3. **Step**: gradients are reduce-scattered (averaged over DP) by FSDP2 in each backward. :meth:`step` computes the
   global gradient norm from the local shards (TP-split parameters summed over the world, TP-replicated ones counted
   once), combined in one all-reduce with the per-rank "a loss was non-finite" flags, clips as
   ``torch.nn.utils.clip_grad_norm_`` does, and skips AdamW on every rank when the bitmask is non-zero. The skip
   decision is read on the host once per step (one 2-element read after the all-reduce; DeepSpeed's engine reads its
   overflow flag the same way), because foreach AdamW has no ``found_inf`` input.
4. **EMA**: fp32 DTensors with the parameters' placements, updated on the local shards (``lerp_``), never gathered
   per step.
5. **Checkpoints**: :meth:`sharded_state` describes each rank's local shards of the weights, AdamW moments and EMA as
   rectangles of the full (TP=1) tensors (:meth:`~simflow.checkpoint.sharded.FlatShard.wrap_box`), under the keys
   the DeepSpeed engine uses (``module/<fqn>``, ``optim/<fqn>/exp_avg|exp_avg_sq``, ``ema/<fqn>``), with the same
   ``meta``. DCP therefore reshards between the two engines and between any (TP, DP) layouts: a checkpoint written
   by one engine loads into the other unchanged (format ``simflow-checkpoint/3``).

``full_params``, ``full_state_dict``, ``iter_full_state``, ``state_dict`` and ``load_state_dict`` are **collective**.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from simflow.config import SimFlowConfig
from simflow.parallel.engine import (ADAM_KEYS, BufferGuard, Engine, ema_decay_at, lr_at, nonfinite_bits,
                                     optimizer_settings, requires_grad_off, sharded_load_targets)
from simflow.parallel.fsdp2_parallelize import fsdp_modules, parallelize_simflow
from simflow.runtime import autocast_dtype



def build_mesh(topology) -> DeviceMesh:
    """The ``(dp, tp)`` device mesh of ``topology`` (global rank = dp_rank * tp_size + tp_rank, as megatron-core's
    groups). Raises RuntimeError if the mesh coordinates disagree with the topology's ranks."""
    mesh = init_device_mesh(topology.device.type, (topology.dp_size, topology.tp_size), mesh_dim_names=("dp", "tp"))
    if tuple(mesh.get_coordinate()) != (topology.dp_rank, topology.tp_rank):
        raise RuntimeError(f"device mesh coordinate {mesh.get_coordinate()} != topology (dp_rank, tp_rank) = "
                           f"({topology.dp_rank}, {topology.tp_rank})")
    return mesh


def _box(t: DTensor) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``(offset, size)`` of this rank's local shard of ``t`` in the full tensor (DCP's own computation)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    size, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(offset), tuple(size)


class FSDP2Engine(Engine):
    """FSDP2 (+ DTensor TP) engine; see the module docstring.

    Args:
        cfg: the SimFlow config (``train``, ``optim``, ``parallel`` are read).
        build_module: ``build_module() -> nn.Module``, the plain model (called once, dense layers).
        role: ``"generator"`` or ``"discriminator"`` (selects LR and betas, :func:`optimizer_settings`).
        ema_prefixes: sub-module names whose parameters get an EMA (e.g. ``["flow"]``); empty = no EMA.
        topology: the :class:`~simflow.parallel.topology.Topology` from ``init_topology`` (a process group exists).

    Attributes:
        module: the FSDP2 module (forward; parameters are sharded DTensors between forwards).
        mesh: the ``(dp, tp)`` device mesh.
        optimizer: ``torch.optim.AdamW`` (foreach) over the trainable sharded parameters.
        steps: optimizer steps attempted (skipped ones included, as the LR schedule counts them).
    """

    def __init__(self, cfg: SimFlowConfig, build_module: Callable[..., nn.Module], role: str,
                 ema_prefixes: Sequence[str], topology):
        if not dist.is_initialized():
            raise RuntimeError("FSDP2Engine needs torch.distributed: call simflow.parallel.topology.init_topology")
        self.cfg, self.role, self.topo, self.device = cfg, role, topology, topology.device
        self.grad_accumulation = int(cfg.train.grad_accumulation)
        self._sched = optimizer_settings(cfg, role)
        self.ema_decay = float(cfg.train.ema_decay)
        self.mesh = build_mesh(topology)
        self.dp_rank, self.tp_rank = topology.dp_rank, topology.tp_rank
        self.dp_size, self.tp_size = topology.dp_size, topology.tp_size
        module = build_module().to(self.device)
        rng_cpu = torch.get_rng_state()  # whatever is built next (discriminator, noise) sees the local engine's stream
        rng_cuda = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
        bf16 = autocast_dtype(cfg, self.device) == torch.bfloat16
        self.module = parallelize_simflow(module, self.mesh, cfg, bf16=bf16)
        torch.set_rng_state(rng_cpu)
        if rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda)
        self._params: Dict[str, nn.Parameter] = dict(self.module.named_parameters())  # sharded DTensors
        bad = [n for n, p in self._params.items() if not isinstance(p, DTensor)]
        if bad:
            raise RuntimeError(f"{role} engine: parameters not sharded by FSDP2: {bad[:5]}")
        self._trainable = [n for n, p in self._params.items() if p.requires_grad]  # optimizer order = LocalEngine's
        # weight of each parameter's local squared gradient norm in the global sum: TP-split parameters are summed
        # over every rank, TP-replicated ones only on TP rank 0 (their gradients are identical on the TP ranks)
        self._norm_weight = {n: 1.0 if (self._tp_split(p) or self.tp_rank == 0) else 0.0
                             for n, p in self._params.items()}
        s = self._sched
        self.optimizer = torch.optim.AdamW(
            [self._params[n] for n in self._trainable],
            lr=lr_at(0, s["lr"], s["warmup_steps"], s["schedule"], s["total_steps"], s["min_lr"]),
            betas=s["betas"], weight_decay=s["weight_decay"], eps=s["eps"], foreach=True)
        self.steps = 0
        self._micro = 0
        self._frozen_depth = 0
        self._loss_nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # this rank, this step
        self._applied = torch.ones((), dtype=torch.float32, device=self.device)  # 1.0 if the last step was applied
        self._buffer_guard = BufferGuard(self.module)  # FSDP2 leaves buffers replicated and unsharded
        self.ema: Dict[str, DTensor] = {
            n: p.detach().float().clone() for n, p in self._params.items()
            if any(n == pre or n.startswith(pre + ".") for pre in ema_prefixes)
        }

    def _tp_split(self, p: DTensor) -> bool:
        """True when ``p`` is sharded over the ``"tp"`` mesh dimension (a column/row-parallel weight or bias)."""
        names = p.device_mesh.mesh_dim_names or ()
        return "tp" in names and p.placements[names.index("tp")].is_shard()

    # ------------------------------------------------------------------------------------------------------
    # forward / backward / step
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch loss (0-dim), scaled by ``1 / grad_accumulation``; FSDP2 reduce-scatters
        (averages over DP) the gradients into the local shards. Records, on the device, whether the loss was
        finite."""
        if self._micro >= self.grad_accumulation:
            raise RuntimeError(f"{self.role} engine: backward() called {self._micro + 1} times without step(); "
                               f"train.grad_accumulation={self.grad_accumulation}")
        self._loss_nonfinite |= ~torch.isfinite(loss.detach())
        (loss / self.grad_accumulation).backward()
        self._micro += 1

    def _grad_norm_and_loss_flag(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(global pre-clip L2 norm of the gradients, "some rank had a non-finite loss"), both 0-dim on the device,
        identical on every rank (one all-reduce SUM over the world)."""
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        grads, weights = [], []
        for n in self._trainable:
            g = self._params[n].grad
            if g is not None:
                grads.append(g.to_local())
                weights.append(self._norm_weight[n])
        if grads:
            norms = torch.stack(torch._foreach_norm(grads)).float()
            sq = (norms.square() * torch.tensor(weights, device=norms.device)).sum()
        acc = torch.stack([sq, self._loss_nonfinite.float()])
        dist.all_reduce(acc)  # default group = the whole (dp x tp) world
        return acc[0].sqrt(), acc[1] > 0

    def step(self) -> Dict[str, object]:
        """Optimizer step at the accumulation boundary: global norm, clip at ``optim.grad_clip``, AdamW with the LR
        of :func:`lr_at` for this step, or a skip on every rank when the loss or the norm was non-finite (the
        policy of :mod:`simflow.parallel.engine`); zero the gradients. Returns ``grad_norm`` (pre-clip, 0-dim fp32),
        ``lr`` (float) and ``nonfinite`` (0-dim int64 bitmask, identical on every rank)."""
        if self._micro != self.grad_accumulation:
            raise RuntimeError(f"{self.role} engine: step() after {self._micro} backward() calls; "
                               f"train.grad_accumulation={self.grad_accumulation}")
        s = self._sched
        lr = lr_at(self.steps, s["lr"], s["warmup_steps"], s["schedule"], s["total_steps"], s["min_lr"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        norm, loss_bad = self._grad_norm_and_loss_flag()
        bits = nonfinite_bits(loss_bad, norm)
        skip = bool(bits.item())  # the one host read per step (module docstring)
        if not skip:
            grads = [self._params[n].grad.to_local() for n in self._trainable if self._params[n].grad is not None]
            if s["grad_clip"] > 0 and grads:  # torch.nn.utils.clip_grad_norm_'s rule
                torch._foreach_mul_(grads, torch.clamp(s["grad_clip"] / (norm + 1e-6), max=1.0))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        skip_t = torch.tensor(skip, device=self.device)
        self._buffer_guard.settle(skip_t)
        self._applied = (~skip_t).to(torch.float32)
        self._loss_nonfinite = torch.zeros_like(self._loss_nonfinite)
        self.steps += 1
        self._micro = 0
        return {"grad_norm": norm.detach().float(), "lr": lr, "nonfinite": bits}

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """No parameter of this engine gets a gradient from graphs built inside the block (D(x_hat) in the generator
        loss). FSDP2 re-creates the unsharded parameters with the sharded ones' ``requires_grad`` at every gather
        (every group reshards after forward), so the gathered weights of a frozen forward need no gradient; the
        later backward gathers them again for the input gradients and reduces nothing."""
        self._frozen_depth += 1
        try:
            with requires_grad_off(self._params.values()):
                yield
        finally:
            self._frozen_depth -= 1

    @torch.no_grad()
    def ema_update(self) -> None:
        """``ema <- d_n * ema + (1 - d_n) * theta`` on the local shards (fp32; method §8), d_n of
        :func:`ema_decay_at` with n = ``steps - 1``; weight 0 after a skipped step (the EMA stays bit-identical)."""
        if not self.ema:
            return
        d = ema_decay_at(max(self.steps - 1, 0), self.ema_decay)
        weight = self._applied * (1.0 - d)
        for n, e in self.ema.items():
            e.to_local().lerp_(self._params[n].to_local().float(), weight)

    # ------------------------------------------------------------------------------------------------------
    # sharded state (checkpoints): this rank's local shards only
    def _shard(self, like: DTensor, local: torch.Tensor):
        """``local`` (a CPU copy of, or a buffer for, this rank's shard of a tensor placed like ``like``) as a DCP
        chunk of the full tensor."""
        from simflow.checkpoint.sharded import FlatShard

        offset, size = _box(like)
        if tuple(local.shape) != size:
            raise RuntimeError(f"{self.role} engine: local shard {tuple(local.shape)} != DCP box {size}")
        return FlatShard.wrap_box(local.reshape(-1), like.shape, offset, size)

    def _buffers_owned(self) -> bool:
        """Buffers (e.g. BatchNorm statistics, which differ per DP rank) are saved and read by DP 0 / TP 0 only."""
        return self.dp_rank == 0 and self.tp_rank == 0

    def sharded_state(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """CPU copies of this rank's shards of the fp32 weights, AdamW moments and EMA as chunks of the full
        tensors, keyed as the DeepSpeed engine keys them (see :meth:`Engine.sharded_state`); buffers from DP 0 /
        TP 0. Extra memory: this rank's share (~1/world of the TP-split and 1/DP of the replicated state)."""
        cpu = torch.device("cpu")
        out: Dict[str, torch.Tensor] = {}
        optim_step: Dict[str, int] = {}
        for n, p in self._params.items():
            out[f"module/{n}"] = self._shard(p, p.to_local().detach().to(cpu, torch.float32, copy=True))
            st = self.optimizer.state.get(p, {})
            if "exp_avg" in st:
                optim_step[n] = int(float(st["step"]))
                for k in ADAM_KEYS:
                    out[f"optim/{n}/{k}"] = self._shard(p, st[k].to_local().detach().to(cpu, torch.float32, copy=True))
            if n in self.ema:
                out[f"ema/{n}"] = self._shard(p, self.ema[n].to_local().detach().to(cpu, copy=True))
        if self._buffers_owned():
            out.update({f"module/{k}": b.detach().to(cpu, copy=True) for k, b in self.module.named_buffers()
                        if b is not None})
        g = self.optimizer.param_groups[0]
        return out, {"steps": self.steps, "optim_step": optim_step, "ema": sorted(self.ema),
                     "param_group": {k: v for k, v in g.items() if isinstance(v, (int, float, str, bool))}}

    def load_targets(self, meta: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Zeroed buffers, as chunks of this rank's shards at the *current* layout, for every parameter, its
        moments (when the checkpoint has them) and its EMA; full buffers on DP 0 / TP 0.

        Raises:
            KeyError: the checkpoint has optimizer state for parameters this model does not train, or other EMA
                entries than this model tracks.
        """
        out = sharded_load_targets(self.role, meta, self._params, list(self._trainable), list(self.ema),
                                   lambda p: self._shard(p, torch.zeros(p.to_local().shape)))
        if self._buffers_owned():
            out.update({f"module/{k}": torch.zeros_like(b, device="cpu") for k, b in self.module.named_buffers()
                        if b is not None})
        return out

    @torch.no_grad()
    def apply_loaded(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        """Install loaded shards: weights, AdamW moments and bias-correction steps (zero moments for a trained
        parameter the checkpoint has none for), EMA, buffers (broadcast from DP 0 / TP 0), step count and LR."""

        def local(key: str, like: torch.Tensor) -> torch.Tensor:
            return tensors[key].as_subclass(torch.Tensor).view(like.shape).to(like.device, like.dtype)

        ostate = meta.get("optim_step", {})
        self.optimizer.state.clear()
        for n, p in self._params.items():
            mine = p.to_local()
            mine.copy_(local(f"module/{n}", mine))
            if ostate and n in self._trainable:
                st = {"step": torch.tensor(float(ostate.get(n, 0)), dtype=torch.float32)}
                for k in ADAM_KEYS:
                    st[k] = torch.zeros_like(p)
                    if n in ostate:
                        st[k].to_local().copy_(local(f"optim/{n}/{k}", mine))
                self.optimizer.state[p] = st
            if n in self.ema:
                self.ema[n].to_local().copy_(local(f"ema/{n}", mine))
        for k, b in self.module.named_buffers():
            if b is not None and f"module/{k}" in tensors:
                b.copy_(tensors[f"module/{k}"].to(b.device, b.dtype))
        self._broadcast_buffers()
        self._set_steps(int(meta["steps"]))

    def _broadcast_buffers(self) -> None:
        """Send DP 0 / TP 0's buffers down its TP group, then down every DP group."""
        bufs = [b for _, b in self.module.named_buffers() if b is not None]
        for dim, first in (("tp", self.dp_rank == 0), ("dp", True)):
            group = self.mesh.get_group(dim)
            if dist.get_world_size(group) > 1 and first:
                for b in bufs:
                    dist.broadcast(b.data, src=dist.get_global_rank(group, 0), group=group)

    def _set_steps(self, steps: int) -> None:
        self.steps = steps
        self._micro = 0
        s = self._sched
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(steps, s["lr"], s["warmup_steps"], s["schedule"], s["total_steps"], s["min_lr"])
        self._buffer_guard.snapshot()

    # ------------------------------------------------------------------------------------------------------
    # full (topology-free) state: collective
    def _local_of(self, like: DTensor, full: torch.Tensor, name: str) -> torch.Tensor:
        """This rank's shard (placed like ``like``) of the full tensor ``full``; checks the shape."""
        if tuple(full.shape) != tuple(like.shape):
            raise ValueError(f"{self.role} state: {name!r} has shape {list(full.shape)}, this model needs "
                             f"{list(like.shape)}")
        offset, size = _box(like)
        return full[tuple(slice(o, o + s) for o, s in zip(offset, size))].to(self.device, torch.float32)

    def state_dict(self) -> Dict:
        """Topology-free training state, identical on every rank, in :class:`LocalEngine`'s layout (``module``,
        ``optimizer`` as ``torch.optim.AdamW.state_dict()`` indexed by trainable-parameter order, ``ema``,
        ``steps``); all tensors fp32 on CPU."""
        module_sd = {n: p.full_tensor().detach().float().cpu() for n, p in self._params.items()}
        module_sd.update({k: b.detach().cpu().clone() for k, b in self.module.named_buffers() if b is not None})
        ostate: Dict[int, Dict[str, torch.Tensor]] = {}
        for i, n in enumerate(self._trainable):
            st = self.optimizer.state.get(self._params[n], {})
            if "exp_avg" in st:
                ostate[i] = {"step": torch.tensor(float(st["step"]))}
                ostate[i].update({k: st[k].full_tensor().detach().cpu() for k in ADAM_KEYS})
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self._trainable)))
        return {"module": module_sd, "optimizer": {"state": ostate, "param_groups": [group]},
                "ema": {n: e.full_tensor().detach().cpu() for n, e in self.ema.items()}, "steps": self.steps}

    @torch.no_grad()
    def load_state_dict(self, sd: Dict) -> None:
        """Load a state written by :meth:`state_dict`, ``LocalEngine.state_dict`` or ``DeepSpeedEngine.state_dict``
        at any layout. Everything is checked before anything changes.

        Raises:
            KeyError / ValueError: a parameter or EMA entry is missing, unexpected, or has another shape.
        """
        msd, ema_sd = sd["module"], sd.get("ema", {})
        ostate = sd.get("optimizer", {}).get("state", {})
        buffers = dict(self.module.named_buffers())
        missing = [n for n in self._params if n not in msd]
        extra = [k for k in msd if k not in self._params and k not in buffers and not k.endswith("_extra_state")]
        if missing or extra:
            raise KeyError(f"{self.role} state: missing parameters {missing[:5]}, unexpected keys {extra[:5]}")
        extra_ema = sorted(set(ema_sd) - set(self.ema))
        if extra_ema or set(self.ema) - set(ema_sd):
            raise KeyError(f"{self.role} state: EMA entries differ: unexpected {extra_ema[:5]}, missing "
                           f"{sorted(set(self.ema) - set(ema_sd))[:5]}")
        staged = {}
        for n, p in self._params.items():
            staged[n] = {"w": self._local_of(p, msd[n], n)}
            if n in self.ema:
                staged[n]["ema"] = self._local_of(p, ema_sd[n], f"ema.{n}")
        for i, n in enumerate(self._trainable):
            st = ostate.get(i, ostate.get(str(i)))
            if st is not None:
                staged[n]["optim"] = {k: self._local_of(self._params[n], st[k], f"optimizer.state.{i}.{k} ({n})")
                                      for k in ADAM_KEYS}
                staged[n]["step"] = float(st["step"])
        self.optimizer.state.clear()
        for n, p in self._params.items():
            p.to_local().copy_(staged[n]["w"])
            if "ema" in staged[n]:
                self.ema[n].to_local().copy_(staged[n]["ema"])
            if ostate and n in self._trainable:
                st = {"step": torch.tensor(staged[n].get("step", 0.0), dtype=torch.float32)}
                for k in ADAM_KEYS:
                    st[k] = torch.zeros_like(p)
                    if "optim" in staged[n]:
                        st[k].to_local().copy_(staged[n]["optim"][k])
                self.optimizer.state[p] = st
        for k, b in buffers.items():
            if k in msd and b is not None:
                b.copy_(msd[k].to(b.device, b.dtype))
        self._set_steps(int(sd["steps"]))

    def full_state_dict(self, ema: bool = True) -> Dict[str, torch.Tensor]:
        """Full fp32 weights on CPU under the plain module's keys (EMA values for tracked parameters when ``ema``)
        and floating buffers; every rank gets the same dict."""
        return dict(self.iter_full_state(ema))

    def full_tensor_specs(self, ema: bool = True) -> List[Tuple[str, List[int], torch.dtype]]:
        """``[(name, full shape, dtype)]`` of what :meth:`iter_full_state` yields, in its order."""
        out = [(n, list(p.shape), torch.float32) for n, p in self._params.items()]
        return out + [(k, list(b.shape), torch.float32) for k, b in self.module.named_buffers()
                      if b is not None and b.is_floating_point()]

    def iter_full_state(self, ema: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        """:meth:`full_state_dict` one tensor at a time (an all-gather per parameter: every rank iterates fully)."""
        for n, p in self._params.items():
            src = self.ema[n] if (ema and n in self.ema) else p
            yield n, src.full_tensor().detach().float().cpu()
        for k, b in self.module.named_buffers():
            if b is not None and b.is_floating_point():
                yield k, b.detach().float().cpu()

    @contextlib.contextmanager
    def full_params(self, ema: bool = True) -> Iterator[nn.Module]:
        """Run the module with every FSDP2 group gathered (EMA values for tracked parameters when ``ema``) and kept
        gathered for the whole block (KV-cached sampling calls each layer once per token); TP stays in place, so
        sampling is collective over every rank. Yields the module; restores the training weights and the sharding
        on exit. Use under ``torch.no_grad()``, and enter the module through ``forward`` or one of
        :data:`~simflow.parallel.fsdp2_parallelize.SAMPLING_METHODS` (``sample``, ``inverse``): those run the root's
        FSDP2 hooks first, so the root, not the first layer to run, is FSDP2's root."""
        backup: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if ema:
                for n, e in self.ema.items():
                    mine = self._params[n].to_local()
                    backup[n] = mine.clone()
                    mine.copy_(e.to_local())
        units = fsdp_modules(self.module)
        try:
            for m in units:
                m.set_reshard_after_forward(False)
                m.unshard()
            yield self.module
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(True)
            with torch.no_grad():
                for n, b in backup.items():
                    self._params[n].to_local().copy_(b)

    # ------------------------------------------------------------------------------------------------------
    # introspection (tests, tools/bench_engine.py)
    def local_numel(self) -> int:
        """Parameter elements held by this rank (its local shards)."""
        return sum(p.to_local().numel() for p in self._params.values())

    def local_optimizer_numel(self) -> int:
        """Optimizer-state elements held by this rank: both AdamW moments of its shards (the sharded fp32
        parameter is itself the master weight; ZeRO-3 keeps a separate master partition)."""
        return sum(v.to_local().numel() for n in self._trainable
                   for k, v in self.optimizer.state.get(self._params[n], {}).items() if k in ADAM_KEYS)

    def full_numel(self) -> int:
        """Parameter elements of the whole (TP=1, unsharded) model."""
        return sum(p.numel() for p in self._params.values())


__all__ = ["FSDP2Engine", "build_mesh"]
