"""The narrow interface between the trainer and whatever holds the weights (design.md "Engine").

The trainer never touches optimizers, gradient scaling, sharding or process groups directly: it calls

    out = engine.module(...)          # forward (the wrapped nn.Module)
    engine.backward(loss)             # one micro-batch; the engine scales by 1/grad_accumulation
    stats = engine.step()             # at the accumulation boundary: clip, optimizer step, zero grads, LR schedule
    engine.ema_update()               # EMA of the configured sub-modules, kept in the same sharding as the params
    engine.state_dict() / engine.load_state_dict(sd)   # everything needed to continue (weights, optimizer, EMA, LR)
    engine.full_state_dict(ema=True)  # full (unsharded) fp32 weights for export / single-process sampling
    with engine.full_params(ema=True): ...   # temporarily run the module with full (EMA) weights, e.g. sampling

``state_dict``, ``load_state_dict``, ``full_state_dict`` and ``full_params`` are **collective** in a distributed
engine: every rank calls them (only the main rank writes files).

:class:`LocalEngine` implements it for one process (CPU or one GPU). ``simflow.parallel.deepspeed_engine``
implements it with DeepSpeed ZeRO-3 (+ megatron-core tensor parallelism).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn


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

    def full_params(self, ema: bool = True) -> contextlib.AbstractContextManager:  # pragma: no cover - interface
        raise NotImplementedError

    def frozen(self) -> contextlib.AbstractContextManager:  # pragma: no cover - interface
        """Context in which the module's parameters get no gradients (used for D during the generator pass)."""
        raise NotImplementedError


class LocalEngine(Engine):
    """Single-process engine (CPU or one GPU): plain parameters, ``torch.optim.AdamW``, fp32 master weights.

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
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
        self.steps = 0
        self.ema_decay = ema_decay
        self.ema: Dict[str, torch.Tensor] = {
            name: p.detach().clone().float()
            for name, p in module.named_parameters()
            if any(name == pre or name.startswith(pre + ".") for pre in ema_prefixes)
        }
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(0, **self._sched)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accumulation).backward()

    def step(self) -> Dict[str, float]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.steps, **self._sched)
        return {"grad_norm": float(norm), "lr": lr}

    @torch.no_grad()
    def ema_update(self) -> None:
        """ema <- d_n * ema + (1 - d_n) * param (fp32), method §8 (EMA 0.9999 on the flow), d_n with the warm-up of
        :func:`ema_decay_at` (called after :meth:`step`, so n = ``steps - 1``)."""
        if not self.ema:
            return
        params = dict(self.module.named_parameters())
        d = ema_decay_at(max(self.steps - 1, 0), self.ema_decay)
        for name, e in self.ema.items():
            e.lerp_(params[name].detach().float(), 1.0 - d)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Parameters receive no gradients inside the block (the discriminator during the generator pass)."""
        flags = [(p, p.requires_grad) for p in self.module.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, f in flags:
                p.requires_grad_(f)

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
        for k, v in sd["ema"].items():
            if k not in self.ema:
                raise KeyError(f"checkpoint has an EMA entry {k!r} that this model does not track")
            self.ema[k].copy_(v)
        self.steps = int(sd["steps"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.steps, **self._sched)

    def full_state_dict(self, ema: bool = True) -> Dict[str, torch.Tensor]:
        sd = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items() if v.is_floating_point()}
        if ema:
            sd.update({k: v.cpu().clone() for k, v in self.ema.items()})
        return sd

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
