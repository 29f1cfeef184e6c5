"""LPIPS perceptual distance with a VGG16 backbone, built entirely offline (method §5.2).

LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", arXiv 1801.03924,
v0.1) compares unit-normalised VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 through learned
1x1 "linear" heads and averages over space. We build it with the ``lpips`` package:

* ``lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, model_path=<package file>)``: the linear heads come from
  the file **shipped inside the lpips wheel** (``lpips/weights/v0.1/vgg.pth``), and the backbone is torchvision's
  ``vgg16(weights=None)``, randomly initialised; neither step touches the network.
* The backbone weights are then copied from ``loss.perceptual.weights``: a torchvision ``vgg16`` state dict
  (``features.<i>.weight|bias``; ``classifier.*`` entries are ignored). lpips keeps torchvision's layer index ``i``
  inside five slices (``net.slice<s>.<i>.*``), so each key maps to exactly one slice parameter.
* ``loss.perceptual.random_init=true`` keeps the random backbone (tests and offline demos) and logs a warning.

The module is frozen (``requires_grad=False``) and always in eval mode (the linear heads contain dropout).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Dict, Optional

import torch
from torch import nn

from simflow.config import PerceptualConfig
from simflow.losses.weights import load_state_dict_file, require_weights_path

log = logging.getLogger(__name__)

WHAT = "torchvision VGG16 weights for LPIPS"


def _lpips_head_file() -> str:
    import lpips

    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS linear-head weights shipped with the lpips package are missing: {path}")
    return path


def _new_lpips() -> nn.Module:
    """lpips VGG LPIPS v0.1 with the package-shipped linear heads and a random (torchvision ``weights=None``) trunk."""
    import lpips

    with warnings.catch_warnings():
        # lpips passes the deprecated ``pretrained=False`` to torchvision (same as ``weights=None``).
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\..*")
        return lpips.LPIPS(
            net="vgg", version="0.1", pretrained=True, pnet_rand=True, model_path=_lpips_head_file(), verbose=False
        )


def load_vgg16_into_lpips(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = "<state dict>") -> int:
    """Copy a torchvision ``vgg16`` state dict into an ``lpips.LPIPS(net="vgg")`` trunk in place.

    Args:
        model: an ``lpips.LPIPS`` instance with ``net="vgg"`` (its trunk parameters are ``net.slice<s>.<i>.<p>``).
        state_dict: torchvision names ``features.<i>.<p>`` (a ``module.`` prefix is stripped; ``classifier.*``
            ignored).
        source: file name for error messages.

    Returns:
        the number of tensors copied (26 for VGG16: 13 convolutions x weight, bias).

    Raises:
        ValueError: a trunk tensor is missing, has the wrong shape, or an unknown ``features.*`` key is present
            (e.g. a ``vgg16_bn`` state dict); the message names the file and the keys.
    """
    targets = {}
    for name, p in model.net.named_parameters():
        m = re.fullmatch(r"slice\d+\.(\d+)\.(weight|bias)", name)
        if m is None:
            raise ValueError(f"unexpected lpips trunk parameter {name!r}")
        targets[f"features.{m.group(1)}.{m.group(2)}"] = p
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    missing = sorted(k for k in targets if k not in sd)
    unknown = sorted(k for k in sd if k.startswith("features.") and k not in targets)
    if missing or unknown:
        raise ValueError(
            f"{WHAT}: {source} is not a torchvision vgg16 state dict: missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected {unknown[:6]}{'...' if len(unknown) > 6 else ''}"
        )
    with torch.no_grad():
        for k, p in targets.items():
            if sd[k].shape != p.shape:
                raise ValueError(f"{WHAT}: {source}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(sd[k].to(p.dtype))
    return len(targets)


class LPIPSLoss(nn.Module):
    """Frozen LPIPS-VGG distance (arXiv 1801.03924, v0.1).

    Call ``perceptual(x, x_hat)``: two float image batches ``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B,)`` distances
    (dimensionless, >= 0, exactly 0 for identical inputs). Gradients flow to the inputs, never to the weights.
    Build it with :func:`build_perceptual`.
    """

    def __init__(self, lpips_model: nn.Module):
        super().__init__()
        self.lpips = lpips_model
        for p in self.lpips.parameters():
            p.requires_grad_(False)
        self.lpips.eval()

    def train(self, mode: bool = True) -> "LPIPSLoss":
        """Stays in eval mode whatever ``mode`` says (frozen metric; its heads contain dropout)."""
        super().train(False)
        return self

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        if x.shape != x_hat.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (B, 3, H, W) batches; got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        return self.lpips(x, x_hat, normalize=False).reshape(x.shape[0])


def build_perceptual(cfg: PerceptualConfig) -> Optional[LPIPSLoss]:
    """Build the LPIPS loss from ``loss.perceptual`` (method §5.2), or ``None`` when ``cfg.weight == 0``.

    Raises:
        WeightsNotFoundError (a ``FileNotFoundError``): ``cfg.weights`` is unset or missing and ``cfg.random_init``
            is false; the message names the file and says "torchvision VGG16 weights for LPIPS".
        ValueError: the file is unreadable or not a torchvision vgg16 state dict.
    """
    if cfg.weight == 0:
        return None
    if cfg.random_init:
        model = _new_lpips()
        log.warning(
            "loss.perceptual.random_init=true: LPIPS uses a RANDOMLY initialised VGG16 backbone (tests/demos only)"
        )
        return LPIPSLoss(model)
    path = require_weights_path(cfg.weights, WHAT, "loss.perceptual.weights", "loss.perceptual.random_init")
    sd = load_state_dict_file(path, WHAT)
    model = _new_lpips()
    n = load_vgg16_into_lpips(model, sd, source=path)
    log.info("LPIPS: loaded %d VGG16 trunk tensors from %s", n, path)
    return LPIPSLoss(model)


__all__ = ["LPIPSLoss", "build_perceptual", "load_vgg16_into_lpips"]
