"""The narrow interface between the trainer and whatever holds the weights (design.md "Engine").

The trainer never touches optimizers, gradient scaling, sharding or process groups directly: it calls

    out = engine.module(...)          # forward (the wrapped nn.Module)
    engine.backward(loss)             # one micro-batch; the engine scales by 1/grad_accumulation
    stats = engine.step()             # at the accumulation boundary: clip, optimizer step, zero grads, LR schedule
    engine.ema_update()               # EMA of the configured sub-modules, kept in the same sharding as the params
    engine.state_dict() / engine.load_state_dict(sd)   # everything needed to continue (weights, optimizer, EMA, LR)
    engine.full_state_dict(ema=True)  # full (unsharded) fp32 weights for export / single-process sampling
    with engine.full_params(ema=True): ...   # temporarily run the module with full (EMA) weights, e.g. sampling

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
