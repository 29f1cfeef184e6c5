"""Training-speed transformations applied to a *built* generator from outside the model code (torchtitan style).

* :func:`apply_activation_checkpointing`: every :class:`~simflow.models.flow.TransformerLayer` recomputes its
  forward in backward (``torch.utils.checkpoint``, non-reentrant), keeping only its inputs alive: activation memory
  per layer drops from O(B T (hidden + attention)) to O(B T D) at the cost of one extra layer forward. The layer's
  ``forward`` is wrapped in place, so parameter names and state-dict keys do not change (no wrapper module), and
  the KV-cached decode path (``cache`` given) and ``no_grad`` evaluation run unwrapped.
* :func:`apply_compile`: ``torch.compile`` of each flow transformer layer's training forward (the KV-cached
  decode path stays eager, its shapes change every token) and of the VAE encoder and decoder
  (``nn.Module.compile``); all in place: keys unchanged, no ``_orig_mod.`` prefix.

:func:`parallelize` applies both according to ``train.compile`` / ``train.activation_checkpointing``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from simflow.config import TrainConfig


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap the forward of every ``TransformerLayer`` in ``model`` with non-reentrant activation checkpointing.

    Returns the number of layers wrapped (0 if ``model`` has none, e.g. the discriminator). Idempotent.
    """
    from simflow.models.flow import TransformerLayer

    n = 0
    for m in model.modules():
        if isinstance(m, TransformerLayer) and not getattr(m, "_activation_checkpointing", False):
            m.forward = _checkpointed(m.forward)  # instance attribute: nn.Module.__call__ dispatches to it
            m._activation_checkpointing = True
            n += 1
    return n


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(x: torch.Tensor, c: torch.Tensor, cache=None) -> torch.Tensor:
        if cache is not None or not torch.is_grad_enabled():
            return forward(x, c, cache)
        return checkpoint(forward, x, c, None, use_reentrant=False)

    return run


def apply_compile(model: nn.Module) -> int:
    """``torch.compile`` (in place) of every flow ``TransformerLayer``'s training forward and of the VAE encoder and
    decoder found in ``model`` (a :class:`~simflow.models.simflow.SimFlowModel`, or a bare flow / VAE).

    Per layer, as torchtitan compiles per transformer block: layers of one shape share one compiled graph (the
    parameters are graph inputs), so compile time does not grow with depth (XL: 56 layers). The KV-cached decode
    path (``cache`` given) stays eager: its sequence length changes every token. Returns the number of modules
    compiled (layers + 2 per VAE).
    """
    from simflow.models.flow import TransformerLayer
    from simflow.models.vae import VAE

    n = 0
    for m in model.modules():
        if isinstance(m, TransformerLayer) and not getattr(m, "_compiled", False):
            m.forward = _compiled(m.forward)
            m._compiled = True
            n += 1
        elif isinstance(m, VAE):
            for part in (m.encoder, m.decoder):
                part.compile()
                n += 1
    return n


def _compiled(forward):
    train_forward = torch.compile(lambda x, c: forward(x, c, None))

    @functools.wraps(forward)
    def run(x: torch.Tensor, c: torch.Tensor, cache=None) -> torch.Tensor:
        if cache is not None:
            return forward(x, c, cache)
        return train_forward(x, c)

    return run


def parallelize(model: nn.Module, train: TrainConfig) -> nn.Module:
    """Apply ``train.compile`` then ``train.activation_checkpointing`` to ``model`` in place (the checkpoint wraps the
    compiled layer, so the recomputation in backward runs compiled code too); returns ``model``."""
    if train.compile:
        apply_compile(model)
    if train.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


__all__ = ["apply_activation_checkpointing", "apply_compile", "parallelize"]
