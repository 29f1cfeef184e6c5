"""REPA-E representation alignment: the frozen DINOv2 teacher and the alignment loss (method §6).

* :class:`DINOv2Teacher` (built by :func:`build_teacher`): a timm DINOv2 ViT (default ``vit_base_patch14_dinov2``,
  no registers) created with ``pretrained=False`` at ``teacher_resolution`` and loaded from the user's file
  ``loss.repa.teacher_weights``. Nothing is downloaded. The file may be a timm-format state dict or the original
  DINOv2 release format; both pass through timm's own ``checkpoint_filter_fn`` for the architecture, which renames
  DINOv2 keys and resamples the positional embedding to the model's patch grid (518 px release -> 16x16 grid at
  224 px, as REPA does, method §6.1).
* the projector MLP that maps flow tokens to the teacher's width is model state:
  :class:`simflow.models.repa.REPAProjector`.
* :func:`repa_loss`: ``-mean_{b,t} cos(proj_{b,t}, f_{b,t})`` (method §6.1). When the flow's token count ``T``
  differs from the teacher's patch count ``N``, the teacher tokens are resampled to the flow's grid by bilinear
  interpolation on the 2-D (square) patch grid (:func:`resample_token_grid`).
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from simflow.config import REPAConfig
from simflow.losses.weights import load_state_dict_file, require_weights_path

log = logging.getLogger(__name__)

WHAT = "DINOv2 weights for the REPA teacher"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DINOv2Teacher(nn.Module):
    """Frozen ViT teacher returning normalised patch tokens (DINOv2 ``x_norm_patchtokens``; method §6.1).

    Call ``teacher(x)``: ``x`` float ``(B, 3, H, W)`` images in ``[-1, 1]`` -> ``(B, N, C)`` float32 patch tokens
    (final LayerNorm applied; class and register tokens removed; ``N = (resolution / patch)^2``, 256 for ViT-B/14
    at 224 px). Preprocessing: ``x / 2 + 0.5`` -> bicubic resize to ``resolution`` (if needed) -> ImageNet
    mean/std. Runs under ``torch.no_grad`` (the features are regression targets) and always in eval mode.
    """

    def __init__(self, vit: nn.Module, resolution: int):
        super().__init__()
        self.vit = vit
        self.resolution = int(resolution)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.vit.eval()

    @property
    def grid_size(self) -> tuple:
        """Patch grid ``(rows, cols)`` of the teacher at its resolution."""
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def embed_dim(self) -> int:
        """Token width ``C`` (768 for ViT-B)."""
        return int(self.vit.embed_dim)

    def train(self, mode: bool = True) -> "DINOv2Teacher":
        """Stays in eval mode whatever ``mode`` says (frozen teacher)."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DINOv2Teacher expects (B, 3, H, W) images in [-1, 1]; got {tuple(x.shape)}")
        x = x.float() / 2 + 0.5
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        tokens = self.vit.forward_features(x)
        return tokens[:, self.vit.num_prefix_tokens :].float()


def _create_vit(cfg: REPAConfig) -> nn.Module:
    import timm

    try:
        return timm.create_model(
            cfg.teacher_arch, pretrained=False, img_size=cfg.teacher_resolution, **dict(cfg.teacher_kwargs)
        )
    except Exception as e:
        raise ValueError(
            f"loss.repa.teacher_arch={cfg.teacher_arch!r} / teacher_kwargs={dict(cfg.teacher_kwargs)!r}: "
            f"timm cannot build it: {e}"
        ) from None


def build_teacher(cfg: REPAConfig) -> Optional[DINOv2Teacher]:
    """Build the frozen DINOv2 teacher from ``loss.repa`` (method §6.1), or ``None`` when ``cfg.enabled`` is false.

    ``timm.create_model(cfg.teacher_arch, pretrained=False, img_size=cfg.teacher_resolution, **cfg.teacher_kwargs)``,
    then the weights from ``cfg.teacher_weights`` (``.pth``/``.safetensors``; timm or original DINOv2 key names),
    strictly (every model tensor must be present; only ``head.*`` extras are tolerated). The teacher's token width
    must equal ``cfg.teacher_dim`` (the projector's output width).
    ``cfg.random_init=true`` keeps timm's random initialisation and logs a warning (tests only).

    Raises:
        WeightsNotFoundError (a ``FileNotFoundError``): the path is unset or missing and ``random_init`` is false;
            the message names the file and says "DINOv2 weights".
        ValueError: unknown architecture, unreadable file, tensors missing / mismatched (names the file), or
            ``loss.repa.teacher_dim`` differing from the teacher's width.
    """
    if not cfg.enabled:
        return None
    if cfg.random_init:
        vit = _create_vit(cfg)
        log.warning(
            "loss.repa.random_init=true: the REPA teacher is a RANDOMLY initialised %s (tests only)", cfg.teacher_arch
        )
    else:
        path = require_weights_path(cfg.teacher_weights, WHAT, "loss.repa.teacher_weights", "loss.repa.random_init")
        sd = load_state_dict_file(path, WHAT)
        vit = _create_vit(cfg)
        load_teacher_weights(vit, sd, source=path)
        log.info("REPA teacher %s: loaded weights from %s", cfg.teacher_arch, path)
    if vit.embed_dim != cfg.teacher_dim:
        raise ValueError(
            f"loss.repa.teacher_dim={cfg.teacher_dim}: the teacher {cfg.teacher_arch} produces {vit.embed_dim}-dim "
            f"tokens (the REPA projector's output width must match)"
        )
    return DINOv2Teacher(vit, cfg.teacher_resolution)


def load_teacher_weights(vit: nn.Module, state_dict: dict, source: str = "<state dict>") -> None:
    """Load ``state_dict`` into a timm ViT in place, through the architecture's ``checkpoint_filter_fn`` when timm
    defines one (key conversion, positional-embedding resampling to ``vit``'s grid).

    Raises:
        ValueError: missing tensors, shape mismatches, or unexpected non-``head`` tensors (names ``source``).
    """
    filt = getattr(importlib.import_module(type(vit).__module__), "checkpoint_filter_fn", None)
    if filt is not None:
        try:
            state_dict = filt(dict(state_dict), vit)
        except Exception as e:
            raise ValueError(f"{WHAT}: {source}: cannot convert for {type(vit).__name__}: {e}") from None
    own = vit.state_dict()
    bad_shape = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if bad_shape:
        k = bad_shape[0]
        raise ValueError(
            f"{WHAT}: {source}: {k} has shape {tuple(state_dict[k].shape)}, model expects {tuple(own[k].shape)} "
            f"(check loss.repa.teacher_arch / teacher_kwargs)"
        )
    result = vit.load_state_dict(state_dict, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith("head.")]
    if result.missing_keys or unexpected:
        raise ValueError(
            f"{WHAT}: {source} does not match loss.repa.teacher_arch: missing {result.missing_keys[:6]}, "
            f"unexpected {unexpected[:6]}"
        )


def resample_token_grid(tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resample tokens on a square ``n x n`` grid (raster order) to a square ``m x m`` grid, ``m^2 = num_tokens``,
    by bilinear interpolation (``align_corners=False``). Identity (any token count) when ``n*n == num_tokens``.

    Shapes: ``(B, n*n, C)`` -> ``(B, m*m, C)``. Raises ``ValueError`` for non-square token counts.
    """
    b, n_tok, c = tokens.shape
    if n_tok == num_tokens:
        return tokens
    n, m = math.isqrt(n_tok), math.isqrt(num_tokens)
    if n * n != n_tok or m * m != num_tokens:
        raise ValueError(f"resample_token_grid needs square grids; got {n_tok} -> {num_tokens} tokens")
    grid = tokens.transpose(1, 2).reshape(b, c, n, n)
    grid = F.interpolate(grid, size=(m, m), mode="bilinear", align_corners=False)
    return grid.reshape(b, c, m * m).transpose(1, 2)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA alignment loss ``-mean_{b,t} cos(projected_{b,t}, target_{b,t})`` (method §6.1; REPA, arXiv 2410.06940).

    Args:
        projected: ``(B, T, C)`` projector outputs for the flow's tokens in raster order.
        target: ``(B, N, C)`` teacher patch tokens (no grad needed). If ``N != T``, both are taken as square grids
            and ``target`` is bilinearly resampled to the flow's ``sqrt(T) x sqrt(T)`` grid first.

    Returns:
        scalar float32 tensor in ``[-1, 1]`` (-1 = perfectly aligned).
    """
    if (
        projected.dim() != 3
        or target.dim() != 3
        or projected.shape[0] != target.shape[0]
        or projected.shape[2] != target.shape[2]
    ):
        raise ValueError(
            f"repa_loss expects projected (B, T, C) and target (B, N, C); "
            f"got {tuple(projected.shape)} and {tuple(target.shape)}"
        )
    target = resample_token_grid(target.float(), projected.shape[1])
    cos = F.cosine_similarity(projected.float(), target, dim=-1, eps=1e-8)
    return -cos.mean()


__all__ = [
    "DINOv2Teacher",
    "build_teacher",
    "load_teacher_weights",
    "resample_token_grid",
    "repa_loss",
]
