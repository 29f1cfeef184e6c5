"""The narrow interface between the trainer and whatever holds the weights (design.md "Engine").

The trainer never touches optimizers, gradient scaling, sharding or process groups directly: it calls

    out = engine.module(...)          # forward (the wrapped nn.Module)
    engine.backward(loss)             # one micro-batch; the engine scales by 1/grad_accumulation
    stats = engine.step()             # at the accumulation boundary: clip, optimizer step (or a skip), zero grads, LR
    engine.ema_update()               # EMA of the configured sub-modules (masked on a skipped step), same sharding
    engine.state_dict() / engine.load_state_dict(sd)   # everything needed to continue (weights, optimizer, EMA, LR)
    engine.sharded_state() / load_targets(meta) / apply_loaded(t, meta)   # the same, as this rank's shards only
    engine.full_state_dict(ema=True)  # full (unsharded) fp32 weights for export / single-process sampling
    with engine.full_params(ema=True): ...   # temporarily run the module with full (EMA) weights, e.g. sampling

``state_dict``, ``load_state_dict``, ``full_state_dict`` and ``full_params`` are **collective** in a distributed
engine: every rank calls them (only the main rank writes files).

``step()`` returns ``{"grad_norm": 0-dim fp32 device tensor (pre-clip global L2 norm), "lr": float (the LR this step
used), "nonfinite": 0-dim int64 device tensor}``; nothing in it is read on the host, so a step queues device work
without waiting for it (DeepSpeed's own overflow check is the exception, see its engine).

**Non-finite steps** (the same policy in both engines). ``nonfinite`` is a bitmask, identical on every rank
(all-reduce MAX over the world): bit 0 (:data:`NONFINITE_LOSS`) = a micro-batch loss given to :meth:`backward` was
inf/NaN on some rank, bit 1 (:data:`NONFINITE_GRAD_NORM`) = the global gradient norm was inf/NaN. When it is non-zero
the step is **skipped** on every rank: weights, AdamW moments and AdamW's bias-correction step count stay bit for bit
as they were, the EMA update is masked (the EMA is left bit-identical), buffers written by the forward (BatchNorm
running statistics) are put back (:class:`BufferGuard`), the gradients are zeroed. The engine's step
counter ``steps`` and with it the LR schedule (:func:`lr_at`) still advance: they count *attempted* steps, so the
run length (``train.steps``) and the LR curve do not depend on how many steps were skipped. The skipped global batch
is consumed, not retried (the data order is a pure function of position; retrying a poisoned batch would loop); the
trainer counts skips (``skipped_steps``) and stops the run after ``train.max_skipped_steps`` consecutive ones.

:class:`LocalEngine` implements it for one process (CPU or one GPU). ``simflow.parallel.deepspeed_engine``
implements it with DeepSpeed ZeRO-3 (+ megatron-core tensor parallelism), ``simflow.parallel.fsdp2_engine`` with
FSDP2 (+ DTensor tensor parallelism); the two save the same checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from simflow.config import SimFlowConfig


def lr_at(step: int, base_lr: float, warmup_steps: int, schedule: str, total_steps: int, min_lr: float) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup from 0 to ``base_lr`` over
    ``warmup_steps``, then constant or cosine decay to ``min_lr`` at ``total_steps`` (TarFlow recipe, method §11.1;
    constant after warmup is the recommended default, method §12 #8)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule={schedule!r}: must be 'constant' or 'cosine'")


def optimizer_settings(cfg: SimFlowConfig, role: str) -> Dict[str, object]:
    """AdamW and LR-schedule settings for ``role`` (``"generator"`` or ``"discriminator"``), shared by both engines:
    the generator uses ``optim.lr``/``optim.betas``, the discriminator ``optim.disc_lr``/``optim.disc_betas``; both
    use ``weight_decay``, ``eps``, ``grad_clip`` and the warmup/decay schedule of :func:`lr_at` (method §8)."""
    if role not in ("generator", "discriminator"):
        raise ValueError(f"engine role must be 'generator' or 'discriminator', got {role!r}")
    o = cfg.optim
    gen = role == "generator"
    return dict(
        lr=o.lr if gen else o.disc_lr,
        betas=tuple(o.betas if gen else o.disc_betas),
        weight_decay=o.weight_decay,
        eps=o.eps,
        grad_clip=o.grad_clip,
        warmup_steps=o.warmup_steps,
        schedule=o.schedule,
        total_steps=cfg.train.steps,
        min_lr=o.min_lr,
    )


NONFINITE_LOSS = 1  # bit of ``step()["nonfinite"]``: a micro-batch loss was inf/NaN on some rank
NONFINITE_GRAD_NORM = 2  # bit of ``step()["nonfinite"]``: the global gradient norm was inf/NaN


def nonfinite_bits(loss_nonfinite: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """``NONFINITE_LOSS * loss_nonfinite + NONFINITE_GRAD_NORM * (grad_norm not finite)`` as a 0-dim int64 tensor on
    ``grad_norm``'s device (device ops only, no host sync). ``loss_nonfinite``: 0-dim bool."""
    norm_bad = ~torch.isfinite(grad_norm.detach().float())
    return loss_nonfinite.to(torch.int64) * NONFINITE_LOSS + norm_bad.to(torch.int64) * NONFINITE_GRAD_NORM


class BufferGuard:
    """Undo forward-time buffer updates (BatchNorm running statistics) of a skipped step, on the device.

    A skipped step must not leave a trace either: a non-finite forward would otherwise write NaN into the running
    statistics. :meth:`settle` is called at the end of every optimizer step: on a skip it copies the buffers back
    from the snapshot taken at the end of the previous step (``torch.where``, no host read), then re-snapshots.
    Call :meth:`snapshot` after loading a state. Costs one copy of the (small) buffers per step.
    """

    def __init__(self, module: nn.Module):
        self.buffers = [b for _, b in module.named_buffers() if b is not None]
        self.saved = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def snapshot(self) -> None:
        for b, s in zip(self.buffers, self.saved):
            s.copy_(b)

    @torch.no_grad()
    def settle(self, skip: torch.Tensor) -> None:
        """``skip``: 0-dim bool device tensor (True = the step was skipped)."""
        for b, s in zip(self.buffers, self.saved):
            b.copy_(torch.where(skip, s, b))
            s.copy_(b)


def ema_decay_at(num_updates: int, decay: float) -> float:
    """EMA decay for the EMA update that follows optimizer update number ``num_updates`` (0-based, i.e. the
    engine's step count minus one): ``min(decay, (1 + n) / (10 + n))``.

    This is the documented warm-up of TensorFlow's ``tf.train.ExponentialMovingAverage(decay, num_updates)``
    (the method spec gives only the final decay, method §8): the very first update keeps 10% of
    the initial weights instead of 99.99%, so with ``decay = 0.9999`` (method §8) the EMA follows the trained flow
    from the first thousand steps rather than staying mostly the step-0 identity flow for ~20k steps. The rule
    reaches ``decay`` at ``n = (10 decay - 1) / (1 - decay)`` (n = 89,991 for 0.9999, n = 890 for 0.99). Because
    ``n`` is derived from the checkpointed step count, a resumed run uses exactly the same decays.

    Args:
        num_updates: n >= 0, the number of optimizer updates before this one.
        decay: the configured ``train.ema_decay`` d in [0, 1).
    Returns:
        the decay in [0, d] (float).
    Raises:
        ValueError: for n < 0.
    """
    if num_updates < 0:
        raise ValueError(f"EMA update count must be >= 0, got {num_updates}")
    return min(float(decay), (1.0 + num_updates) / (10.0 + num_updates))


class Engine:
    """Interface (see module docstring). Subclasses set ``module``, ``grad_accumulation`` and ``optimizer``."""

    module: nn.Module
    grad_accumulation: int = 1

    def backward(self, loss: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def step(self) -> Dict[str, float]:  # pragma: no cover - interface
        raise NotImplementedError

    def ema_update(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> Dict:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, sd: Dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def full_state_dict(self, ema: bool = True) -> Dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def sharded_state(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:  # pragma: no cover - interface
        """``(tensors, meta)`` for a sharded checkpoint: CPU *copies* of what this rank owns, keyed
        ``module/<name>`` (weights and buffers), ``optim/<name>/exp_avg|exp_avg_sq``, ``ema/<name>``, as full
        tensors or :class:`~simflow.checkpoint.sharded.FlatShard` chunks of them; ``meta`` is JSON (step counts,
        optimizer hyper-parameters, EMA names). Safe to write while training continues."""
        raise NotImplementedError

    def load_targets(self, meta: Dict[str, Any]) -> Dict[str, torch.Tensor]:  # pragma: no cover - interface
        """Fresh buffers, keyed as in :meth:`sharded_state`, that a DCP load fills with this rank's part of a
        checkpoint whose ``meta`` is given. Raises KeyError when ``meta`` names state this model does not have."""
        raise NotImplementedError

    def apply_loaded(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:  # pragma: no cover
        """Install the buffers of :meth:`load_targets` after the load filled them (weights, moments, EMA, steps, LR)."""
        raise NotImplementedError

    def full_params(self, ema: bool = True) -> contextlib.AbstractContextManager:  # pragma: no cover - interface
        raise NotImplementedError

    def frozen(self) -> contextlib.AbstractContextManager:  # pragma: no cover - interface
        """Context in which the module's parameters get no gradients (used for D during the generator pass)."""
        raise NotImplementedError


@contextlib.contextmanager
def requires_grad_off(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` off for every parameter in ``params`` inside the block, each put back to its own value after
    (also on error): the body of every engine's :meth:`Engine.frozen`."""
    flags = [(p, p.requires_grad) for p in params]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


ADAM_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter moments, as the checkpoint names them


def tp_partition_dim(param: torch.Tensor) -> Optional[int]:
    """The dimension along which ``param`` is split over tensor-parallel ranks, or ``None`` if it is replicated
    (reads the ``tensor_model_parallel`` / ``partition_dim`` attributes megatron-core's column/row-parallel layers
    set; defined here so that engines read them without importing megatron-core)."""
    if getattr(param, "tensor_model_parallel", False):
        return int(getattr(param, "partition_dim"))
    return None


def sharded_load_targets(role: str, meta: Dict[str, Any], params: Dict[str, Any], trainable: Sequence[str],
                         ema: Sequence[str], zeros: Callable[[Any], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The Checkpointer's load targets of a sharded engine (DeepSpeed, FSDP2): ``module/<n>`` for every parameter,
    ``optim/<n>/exp_avg`` and ``optim/<n>/exp_avg_sq`` when the checkpoint has moments for it, ``ema/<n>`` for every
    EMA entry; each one a fresh zero buffer ``zeros(p)`` (this rank's chunks of the full tensor at the current
    layout). Buffers (BatchNorm statistics) are the engine's own business.

    Raises:
        KeyError: the checkpoint (``meta`` from the engine's ``sharded_state``) has optimizer state for parameters
            this model does not train, or other EMA entries than this model tracks; the message names them.
    """
    saved_optim = meta.get("optim_step", {})
    unknown = sorted(set(saved_optim) - set(trainable))
    if unknown:
        raise KeyError(f"{role} state: optimizer state for {unknown[:5]}, which this model does not train")
    if set(meta.get("ema", [])) != set(ema):
        raise KeyError(f"{role} state: checkpoint EMA entries {sorted(meta.get('ema', []))[:5]} differ from "
                       f"the ones this model tracks {sorted(ema)[:5]}")
    out: Dict[str, torch.Tensor] = {}
    for n, p in params.items():
        out[f"module/{n}"] = zeros(p)
        if n in saved_optim:
            for k in ADAM_KEYS:
                out[f"optim/{n}/{k}"] = zeros(p)
        if n in ema:
            out[f"ema/{n}"] = zeros(p)
    return out


class LocalEngine(Engine):
    """Single-process engine (CPU or one GPU): plain parameters, fused ``torch.optim.AdamW``, fp32 master weights.

    Non-finite steps (module docstring) are skipped on the device, as ``torch.amp.GradScaler`` skips fused optimizer
    steps: the flag goes to the fused AdamW kernel as ``found_inf``, which then leaves parameters and moments
    untouched and undoes its own ``step`` increment (``torch/optim/adam.py`` ``_fused_adam``); the EMA update is
    multiplied by the same flag. No value is read on the host.

    Args:
        module: the model (already on its device).
        optim: ``(lr, betas, weight_decay, eps)`` of AdamW and the LR schedule (``lr_at``) arguments.
        grad_accumulation: micro-batches per optimizer step; :meth:`backward` scales the loss by its inverse.
        grad_clip: max global L2 norm of the gradients (0 disables), method §8.
        ema_prefixes: names of sub-modules whose EMA is kept (e.g. ``["flow"]``), decay ``ema_decay``.
    """

    def __init__(
        self,
        module: nn.Module,
        lr: float,
        betas: Sequence[float],
        weight_decay: float,
        eps: float,
        grad_accumulation: int = 1,
        grad_clip: float = 0.0,
        warmup_steps: int = 0,
        schedule: str = "constant",
        total_steps: int = 1,
        min_lr: float = 0.0,
        ema_prefixes: Sequence[str] = (),
        ema_decay: float = 0.9999,
    ):
        self.module = module
        self.grad_accumulation = grad_accumulation
        self.grad_clip = grad_clip
        self._sched = dict(base_lr=lr, warmup_steps=warmup_steps, schedule=schedule, total_steps=total_steps, min_lr=min_lr)
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps,
                                           fused=True)
        self.steps = 0
        dev = params[0].device if params else torch.device("cpu")
        self._loss_nonfinite = torch.zeros((), dtype=torch.bool, device=dev)  # any micro-batch loss inf/NaN
        self._applied = torch.ones((), dtype=torch.float32, device=dev)  # 1.0 if the last step was applied, else 0.0
        self.ema_decay = ema_decay
        self.ema: Dict[str, torch.Tensor] = {
            name: p.detach().clone().float()
            for name, p in module.named_parameters()
            if any(name == pre or name.startswith(pre + ".") for pre in ema_prefixes)
        }
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(0, **self._sched)
        self._buffer_guard = BufferGuard(module)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch loss (0-dim), scaled by ``1 / grad_accumulation``; records (on the device)
        whether it was finite."""
        self._loss_nonfinite |= ~torch.isfinite(loss.detach())
        (loss / self.grad_accumulation).backward()

    def step(self) -> Dict[str, object]:
        """Clip at ``grad_clip`` (global L2 norm), then the fused AdamW step, or a skip when the loss or the norm is
        non-finite (module docstring); zero the gradients; advance ``steps`` and the LR. Returns ``grad_norm``
        (pre-clip, 0-dim fp32 device tensor), ``lr`` (float, the LR this step used) and ``nonfinite`` (0-dim int64
        bitmask). No host sync."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        bits = nonfinite_bits(self._loss_nonfinite, norm)
        skip = bits != 0
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.found_inf = skip.to(torch.float32)  # read by the fused kernel: 1.0 = skip (GradScaler's protocol)
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self._buffer_guard.settle(skip)
        self._applied = (~skip).to(torch.float32)
        self._loss_nonfinite = torch.zeros_like(self._loss_nonfinite)
        self.steps += 1  # attempted steps: the LR schedule does not depend on skips
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.steps, **self._sched)
        return {"grad_norm": norm.detach().float(), "lr": lr, "nonfinite": bits}

    @torch.no_grad()
    def ema_update(self) -> None:
        """ema <- d_n * ema + (1 - d_n) * param (fp32), method §8 (EMA 0.9999 on the flow), d_n with the warm-up of
        :func:`ema_decay_at` (called after :meth:`step`, so n = ``steps - 1``; ``steps`` counts attempted steps).
        After a skipped step the weight ``1 - d_n`` is multiplied by 0 on the device, so the EMA stays as it was
        (``lerp`` with weight 0 returns ``ema + 0 * (param - ema)``; the parameters are finite because the skipped
        step did not touch them)."""
        if not self.ema:
            return
        params = dict(self.module.named_parameters())
        d = ema_decay_at(max(self.steps - 1, 0), self.ema_decay)
        weight = self._applied * (1.0 - d)  # 0-dim device tensor: no host read
        for name, e in self.ema.items():
            e.lerp_(params[name].detach().float(), weight)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Parameters receive no gradients inside the block (the discriminator during the generator pass)."""
        with requires_grad_off(self.module.parameters()):
            yield

    def state_dict(self) -> Dict:
        return {
            "module": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "ema": {k: v.clone() for k, v in self.ema.items()},
            "steps": self.steps,
        }

    def load_state_dict(self, sd: Dict) -> None:
        self.module.load_state_dict(sd["module"])
        self.optimizer.load_state_dict(sd["optimizer"])
        for g in self.optimizer.param_groups:  # a state from another engine (foreach AdamW) must stay fused here,
            g["fused"], g["foreach"] = True, None  # or the skip flag (found_inf) would be refused
            for p in g["params"]:
                st = self.optimizer.state.get(p, {})
                if "step" in st:  # the fused kernel wants its step counts on the parameter's device, fp32
                    st["step"] = st["step"].to(p.device, torch.float32)
        for k, v in sd["ema"].items():
            if k not in self.ema:
                raise KeyError(f"checkpoint has an EMA entry {k!r} that this model does not track")
            self.ema[k].copy_(v)
        self.steps = int(sd["steps"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.steps, **self._sched)
        self._buffer_guard.snapshot()

    def _named_trainable(self) -> Dict[str, torch.nn.Parameter]:
        ids = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        return {n: p for n, p in self.module.named_parameters() if id(p) in ids}

    def sharded_state(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """One process owns everything: full tensors (see :meth:`Engine.sharded_state`)."""
        tensors = {f"module/{k}": v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        optim_step: Dict[str, int] = {}
        for name, p in self._named_trainable().items():
            st = self.optimizer.state.get(p, {})
            if "exp_avg" in st:
                optim_step[name] = int(float(st["step"]))
                for k in ("exp_avg", "exp_avg_sq"):
                    tensors[f"optim/{name}/{k}"] = st[k].detach().to("cpu", copy=True)
        tensors.update({f"ema/{k}": v.detach().to("cpu", copy=True) for k, v in self.ema.items()})
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        return tensors, {"steps": self.steps, "optim_step": optim_step, "ema": sorted(self.ema),
                         "param_group": {k: v for k, v in group.items() if isinstance(v, (int, float, str, bool))}}

    def load_targets(self, meta: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        trainable = self._named_trainable()
        unknown = sorted(set(meta.get("optim_step", {})) - set(trainable))
        if unknown:
            raise KeyError(f"checkpoint has optimizer state for {unknown[:5]}, which this model does not train")
        if set(meta.get("ema", [])) != set(self.ema):
            raise KeyError(f"checkpoint EMA entries {sorted(meta.get('ema', []))[:5]}... differ from the ones this "
                           f"model tracks {sorted(self.ema)[:5]}...")
        out = {f"module/{k}": torch.empty_like(v, device="cpu") for k, v in self.module.state_dict().items()}
        for name in meta.get("optim_step", {}):
            for k in ("exp_avg", "exp_avg_sq"):
                out[f"optim/{name}/{k}"] = torch.zeros_like(trainable[name], dtype=torch.float32, device="cpu")
        out.update({f"ema/{k}": torch.empty_like(v, device="cpu") for k, v in self.ema.items()})
        return out

    @torch.no_grad()
    def apply_loaded(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        self.module.load_state_dict({k[len("module/"):]: v for k, v in tensors.items() if k.startswith("module/")})
        self.optimizer.state.clear()
        for name, p in self._named_trainable().items():
            if name in meta.get("optim_step", {}):
                self.optimizer.state[p] = {
                    "step": torch.tensor(float(meta["optim_step"][name]), dtype=torch.float32, device=p.device),
                    "exp_avg": tensors[f"optim/{name}/exp_avg"].to(p.device, p.dtype),
                    "exp_avg_sq": tensors[f"optim/{name}/exp_avg_sq"].to(p.device, p.dtype)}
        for k, e in self.ema.items():
            e.copy_(tensors[f"ema/{k}"])
        self.steps = int(meta["steps"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.steps, **self._sched)
        self._buffer_guard.snapshot()

    def full_state_dict(self, ema: bool = True) -> Dict[str, torch.Tensor]:
        sd = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items() if v.is_floating_point()}
        if ema:
            sd.update({k: v.cpu().clone() for k, v in self.ema.items()})
        return sd

    def full_tensor_specs(self, ema: bool = True) -> List[Tuple[str, List[int], torch.dtype]]:
        """``[(name, shape, dtype)]`` of what :meth:`iter_full_state` yields, in its order."""
        return [(k, list(v.shape), torch.float32) for k, v in self.module.state_dict().items() if v.is_floating_point()]

    def iter_full_state(self, ema: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        """:meth:`full_state_dict`, one tensor at a time (fp32 CPU; EMA values for tracked ones when ``ema``)."""
        for k, v in self.module.state_dict().items():
            if v.is_floating_point():
                src = self.ema[k] if (ema and k in self.ema) else v
                yield k, src.detach().float().cpu()

    @contextlib.contextmanager
    def full_params(self, ema: bool = True) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into the module (restored on exit)."""
        if not ema or not self.ema:
            yield self.module
            return
        params = dict(self.module.named_parameters())
        backup = {k: params[k].detach().clone() for k in self.ema}
        with torch.no_grad():
            for k, e in self.ema.items():
                params[k].copy_(e)
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for k, b in backup.items():
                    params[k].copy_(b)
