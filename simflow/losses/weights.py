"""Reading frozen-network weights (LPIPS backbone, DINOv2 teacher) from user-supplied files, never from the network.

Supported formats: ``.safetensors`` (``safetensors.torch.load_file``) and anything ``torch.load(weights_only=True)``
reads (``.pth``, ``.pt``, ``.bin``, ``.ckpt``). A checkpoint that wraps its tensors in a ``"state_dict"`` or
``"model"`` entry is unwrapped.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch


class WeightsNotFoundError(FileNotFoundError):
    """A configured weights file does not exist (or no path was configured). The message names the file, what it
    is and the config key."""


def require_weights_path(path: Optional[str], what: str, key: str, random_key: str) -> str:
    """Return ``path`` if it names an existing file, else raise :class:`WeightsNotFoundError`.

    Args:
        path: configured path (may be ``None``).
        what: description for the message, e.g. ``"torchvision VGG16 weights for LPIPS"``.
        key: the config key holding the path, e.g. ``"loss.perceptual.weights"``.
        random_key: the config key that allows random weights instead (named in the message).
    """
    hint = (
        f"set {key}=/path/to/file (nothing is downloaded at run time), or {random_key}=true for a randomly "
        f"initialised network (tests only)"
    )
    if not path:
        raise WeightsNotFoundError(f"{what}: no file configured ({key} is empty); {hint}")
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"{what}: file not found: {path} ({key}); {hint}")
    return path


def load_state_dict_file(path: str, what: str) -> Dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` state dict on the CPU from ``path``.

    Raises:
        ValueError: the file cannot be parsed or holds no tensor mapping (message names the file and ``what``).
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with non-tensor objects, ...
        raise ValueError(f"{what}: cannot read {path}: {type(e).__name__}: {e}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{what}: {path} does not hold a state dict of tensors")
    return sd


__all__ = ["WeightsNotFoundError", "require_weights_path", "load_state_dict_file"]
