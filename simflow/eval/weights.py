"""Build a trained SimFlow generator for offline sampling and reconstruction metrics.

The weights and their config are read by :mod:`simflow.checkpoint.weights` (export files and checkpoints, local or
``s3://``); this module builds ``SimFlowModel(cfg)`` from them, in eval mode, with the flow's EMA weights by default.
Errors are :class:`simflow.checkpoint.weights.WeightsError`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from simflow.checkpoint.weights import check_state_fits, load_state
from simflow.config import SimFlowConfig, to_dict
from simflow.models.flow import convert_legacy_qkv
from simflow.models.simflow import SimFlowModel


def load_generator(
    weights: str,
    cfg: SimFlowConfig,
    device: torch.device = torch.device("cpu"),
    use_ema: Optional[bool] = None,
):
    """Build ``SimFlowModel(cfg)`` and load ``weights`` into it strictly, in eval mode on ``device``.

    Args:
        weights: see :func:`simflow.checkpoint.weights.load_state`.
        cfg: the config that describes the architecture (``model``, ``loss.repa``).
        device: where to put the model.
        use_ema: default ``cfg.sample.use_ema``.

    Returns:
        (model, :class:`~simflow.checkpoint.weights.WeightsSource`).

    Raises:
        WeightsError: missing/unexpected keys or shape mismatches (the message names keys and shapes and says the
            config does not describe these weights).
    """
    use_ema = cfg.sample.use_ema if use_ema is None else use_ema
    state, src = load_state(weights, use_ema)
    state = convert_legacy_qkv(state, cfg.model.flow.head_dim)  # weights saved before the fused QKV projection
    model = SimFlowModel(cfg)
    own = model.state_dict()
    # The REPA projector (a training-only head, method §6) plays no part in sampling or reconstruction.
    state = {k: v for k, v in state.items() if k in own or not k.startswith("repa_projector.")}
    check_state_fits(state, own, weights, "weights", "the config's model section")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return model.to(device).eval(), src


def model_fingerprint(cfg: SimFlowConfig) -> Dict[str, Any]:
    """The config section that changes what given weights compute: ``model`` (architecture, flow
    parameterisation, VAE posterior), as a plain dict."""
    return to_dict(cfg)["model"]


__all__ = [
    "load_generator",
    "model_fingerprint",
]
