"""Batched class-conditional sampling and image grids (method §4.5, §7).

Every sample's class label and noise are derived from (seed, sample index) alone (design.md "Sample index"), so a
sample set is identical whatever the batch size, world size or split into jobs.
"""

from __future__ import annotations

from typing import Optional

import torch

from simflow.config import SampleConfig
from simflow.models.flow import Guidance
from simflow.rng import Stream, per_sample_normal, per_sample_randint


def guidance_from(cfg: SampleConfig) -> Optional[Guidance]:
    """The :class:`Guidance` of a sample config, or None when ``cfg_scale`` is 0."""
    if cfg.cfg_scale == 0:
        return None
    return Guidance(scale=cfg.cfg_scale, mode=cfg.cfg_mode, anneal=cfg.cfg_anneal)


def sample_noise(model, seed: int, indices: torch.Tensor) -> torch.Tensor:
    """Flow-side noise eps ~ N(0, I) for the given sample indices: (B, T, C) float32 on CPU."""
    flow = model.flow
    return per_sample_normal((flow.num_tokens, flow.token_dim), seed, indices, Stream.SAMPLE_NOISE)


def sample_labels(num_classes: int, seed: int, indices: torch.Tensor) -> torch.Tensor:
    """Uniform random class labels per sample index (i.i.d., as DiT and REPA sample; method §9): (B,) int64."""
    return per_sample_randint(num_classes, seed, indices, Stream.SAMPLE_LABEL)


@torch.no_grad()
def sample_images(model, indices: torch.Tensor, labels: torch.Tensor, cfg: SampleConfig,
                  device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images for the given sample indices and labels: (B, 3, H, W) float32 in [-1, 1] (clamped), on CPU.

    The flow's affine maps run in fp32; ``dtype`` is the autocast dtype of the networks (bf16 on CUDA).
    """
    noise = sample_noise(model, cfg.seed, indices).to(device)
    y = labels.to(device)
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
        x = model.sample(y, noise, guidance_from(cfg), temperature=cfg.temperature)
    return x.float().clamp(-1, 1).cpu()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, H, W, 3) as ``uint8(clamp(127.5 x + 128, 0, 255))``: DiT's
    ``sample_ddp.py`` form, i.e. 127.5 (x + 1) rounded to the nearest level (ADM's and REPA-E's scripts truncate
    ``(x + 1) * 127.5`` instead, one level lower on half the inputs); why we keep rounding: method §9."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def save_grid(x: torch.Tensor, path: str, nrow: Optional[int] = None) -> str:
    """Write a PNG grid of [-1, 1] images (B, 3, H, W); returns the path."""
    import math

    from torchvision.utils import save_image

    nrow = nrow or max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    save_image((x.float() + 1) / 2, path, nrow=nrow, padding=1)
    return path
