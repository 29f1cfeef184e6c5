"""Convolutional autoencoder of the LDM / REPA-E family with a fixed-variance (or learned) Gaussian posterior.

Architecture (method §3.1, LDM ``AutoencoderKL`` family, written from the method spec):

* **Encoder**: ``conv_in`` (3x3) -> one level per entry of ``ch_mult``; level ``i`` has ``num_res_blocks``
  :class:`ResnetBlock` s with ``base_channels * ch_mult[i]`` output channels, each followed by an
  :class:`AttnBlock` when the level's feature-map side (in pixels) is listed in ``attn_resolutions``; a
  :class:`Downsample` after every level but the last -> mid (ResBlock, Attn, ResBlock) -> GroupNorm -> SiLU ->
  ``conv_out`` 3x3 to the *moments*, then a 1x1 ``quant_conv``.
* **Decoder**: 1x1 ``post_quant_conv`` -> ``conv_in`` 3x3 to ``base_channels * ch_mult[-1]`` -> mid (ResBlock, Attn,
  ResBlock) -> levels in reverse order with ``num_res_blocks + 1`` ResBlocks each (attention as in the encoder) and
  an :class:`Upsample` after every level but the finest -> GroupNorm -> SiLU -> ``conv_out`` 3x3 to RGB, no output
  activation.

The downsampling factor is ``f = 2 ** (len(ch_mult) - 1)``: f16 for SimFlow-XL's ``[1, 1, 2, 2, 4]`` (latents
``(64, 16, 16)`` at 256 px), f4 for the tiny ``[1, 2, 2]`` (``(C, 8, 8)`` at 32 px).

Posterior (method §3.2, §5.1):

* ``posterior="fixed"`` (SimFlow): the encoder head outputs ``latent_channels`` channels, the mean only;
  ``q(z|x) = N(mu(x), s^2 I)`` with the constant ``s = posterior_std`` (default 0.5).
* ``posterior="learned"`` (the paper's learnable-variance ablation, method §10.3): the head outputs
  ``2 * latent_channels`` channels ``(mean, log-variance)``; the log-variance is clamped to ``[-30, 20]`` as in LDM.

Randomness: :meth:`VAE.reparameterize` takes ``eps`` from the caller, who draws it per sample from seeded
generators (design: per-sample randomness derives from (seed, global sample index, epoch)).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from simflow.config import VAEConfig
from simflow.models.layers import attention

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM DiagonalGaussianDistribution clamp


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with LDM's eps 1e-6 (affine)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(drop(SiLU(GN(conv(SiLU(GN(x)))))))`` (method §3.1).

    The skip is the identity when ``in_channels == out_channels`` and a 1x1 convolution otherwise.

    Shapes: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.norm1 = _norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``H*W`` positions of a feature map, with a residual connection.

    ``q, k, v`` are 1x1 convolutions of ``GN(x)``; attention weights ``softmax(q k^T / sqrt(C))``
    (:func:`simflow.models.layers.attention`); the result goes through a 1x1 ``proj_out`` and is added to ``x``.

    Shapes: ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = _norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1 head, H*W, C)
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        out = attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the spatial size: zero-pad right/bottom by one pixel (asymmetric ``(0, 1, 0, 1)``), then a stride-2
    3x3 convolution without padding (LDM). Shapes: ``(B, C, H, W)`` -> ``(B, C, H/2, W/2)`` for even ``H, W``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour x2 then a 3x3 convolution (LDM).
    Shapes: ``(B, C, H, W)`` -> ``(B, C, 2H, 2W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ResBlocks (each optionally followed by attention) and an optional resampler."""

    def __init__(self, blocks: nn.ModuleList, attns: nn.ModuleList, resample: Optional[nn.Module]):
        super().__init__()
        self.blocks = blocks
        self.attns = attns  # empty, or one AttnBlock per ResBlock
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.attns):
                x = self.attns[i](x)
        return self.resample(x)


class _Mid(nn.Module):
    """Mid block: ResBlock -> AttnBlock -> ResBlock at constant width."""

    def __init__(self, channels: int, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image -> encoder moments. Shapes: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H/f, W/f)``,
    ``f = 2 ** (len(ch_mult) - 1)``. ``out_channels`` is ``latent_channels`` (fixed posterior: mean only) or
    ``2 * latent_channels`` (learned posterior: mean and log-variance)."""

    def __init__(self, cfg: VAEConfig, resolution: int, out_channels: int):
        super().__init__()
        ch, mult, groups = cfg.base_channels, list(cfg.ch_mult), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, kernel_size=3, padding=1)
        levels = []
        res, block_in = resolution, ch
        for i, m in enumerate(mult):
            block_out = ch * m
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout, groups))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, groups))
            last = i == len(mult) - 1
            levels.append(_Level(blocks, attns, None if last else Downsample(block_in)))
            if not last:
                res //= 2
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in, cfg.dropout, groups)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image. Shapes: ``(B, latent_channels, h, w)`` -> ``(B, in_channels, h*f, w*f)``; no output
    activation (LDM), the reconstruction is compared with images in ``[-1, 1]``."""

    def __init__(self, cfg: VAEConfig, resolution: int):
        super().__init__()
        ch, mult, groups = cfg.base_channels, list(cfg.ch_mult), cfg.norm_groups
        block_in = ch * mult[-1]
        res = resolution // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, kernel_size=3, padding=1)
        self.mid = _Mid(block_in, cfg.dropout, groups)
        levels = []
        for i in reversed(range(len(mult))):  # coarsest level first
            block_out = ch * mult[i]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout, groups))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, groups))
            levels.append(_Level(blocks, attns, Upsample(block_in) if i != 0 else None))
            if i != 0:
                res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """LDM/REPA-E KL-autoencoder with a fixed-std (SimFlow) or learned diagonal Gaussian posterior (method §3).

    Args:
        cfg: ``model.vae`` section (:class:`simflow.config.VAEConfig`).
        resolution: image side in pixels (``model.resolution``); decides where attention sits (``attn_resolutions``
            are feature-map sides in pixels) and must be divisible by the downsampling factor.

    Raises:
        ValueError: naming the ``model.vae.*`` key when the configuration cannot build a network.
    """

    def __init__(self, cfg: VAEConfig, resolution: int):
        super().__init__()
        _check(cfg, resolution)
        self.cfg = cfg
        self.resolution = int(resolution)
        self.learned = cfg.posterior == "learned"
        moments = 2 * cfg.latent_channels if self.learned else cfg.latent_channels
        self.encoder = Encoder(cfg, resolution, moments)
        self.quant_conv = nn.Conv2d(moments, moments, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, kernel_size=1)
        self.decoder = Decoder(cfg, resolution)

    # ------------------------------------------------------------------ shapes
    @property
    def downsample_factor(self) -> int:
        """Spatial reduction ``f = 2 ** (len(ch_mult) - 1)`` (16 for ``[1, 1, 2, 2, 4]``)."""
        return 2 ** (len(self.cfg.ch_mult) - 1)

    def latent_shape(self, resolution: Optional[int] = None) -> Tuple[int, int, int]:
        """``(latent_channels, resolution / f, resolution / f)`` for square images of side ``resolution``
        (default: the construction resolution). Raises ``ValueError`` when ``f`` does not divide it."""
        r = self.resolution if resolution is None else int(resolution)
        f = self.downsample_factor
        if r % f != 0:
            raise ValueError(f"resolution {r} is not divisible by the VAE downsampling factor {f}")
        return (self.cfg.latent_channels, r // f, r // f)

    # ------------------------------------------------------------------ posterior
    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Posterior parameters of ``q(z|x)`` (method §3.2).

        Args:
            x: images ``(B, in_channels, H, W)``, float, values in ``[-1, 1]``; ``H, W`` divisible by ``f``.

        Returns:
            ``(mu, logvar)``: ``mu`` is ``(B, latent_channels, H/f, W/f)``; ``logvar`` is ``None`` in ``fixed``
            mode and a tensor like ``mu`` (natural-log variance, clamped to ``[-30, 20]``) in ``learned`` mode.
        """
        f = self.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"VAE.encode expects (B, {self.cfg.in_channels}, H, W) with H, W divisible by {f}; got {tuple(x.shape)}"
            )
        moments = self.quant_conv(self.encoder(x))
        if not self.learned:
            return moments, None
        mu, logvar = moments.chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def posterior_std(self, logvar: Optional[torch.Tensor] = None) -> Union[torch.Tensor, float]:
        """Posterior standard deviation: the constant ``posterior_std`` (float) in ``fixed`` mode; ``exp(logvar / 2)``
        (tensor shaped like ``logvar``) in ``learned`` mode, where ``logvar`` is required."""
        if not self.learned:
            return float(self.cfg.posterior_std)
        if logvar is None:
            raise ValueError("VAE.posterior_std: logvar is required with model.vae.posterior='learned'")
        return torch.exp(0.5 * logvar)

    def reparameterize(self, mu: torch.Tensor, logvar: Optional[torch.Tensor], eps: torch.Tensor) -> torch.Tensor:
        """Reparameterised sample ``z = mu + std * eps`` (method §3.2; ``std = 0.5`` for SimFlow).

        Args:
            mu: ``(B, C, h, w)`` posterior mean.
            logvar: ``None`` (fixed) or ``(B, C, h, w)`` log-variance (learned).
            eps: standard-normal noise shaped like ``mu``, drawn by the caller (per-sample seeded generators).

        Returns:
            ``z`` float32 with the shape of ``mu``, whatever the autocast dtype: ``mu`` and ``eps`` are cast to fp32
            before the noise is added, so under bf16 autocast the variable the flow models is not rounded to bf16's
            ~0.008 grid near |z| = 1 (the exact-likelihood floor of method §4.4 needs the fp32 sample; the decoder
            casts back as autocast decides). Differentiable w.r.t. ``mu`` (and ``logvar``).
        """
        if eps.shape != mu.shape:
            raise ValueError(f"VAE.reparameterize: eps shape {tuple(eps.shape)} != mu shape {tuple(mu.shape)}")
        with torch.autocast(device_type=mu.device.type, enabled=False):
            std = self.posterior_std(None if logvar is None else logvar.float())
            return mu.float() + std * eps.float()

    def kl(self, mu: torch.Tensor, logvar: Optional[torch.Tensor]) -> torch.Tensor:
        """``KL(q(z|x) || N(0, I))`` per sample, summed over all latent dims, in nats (LDM/REPA-E KL term, §5.2).

        Learned mode: ``0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)``.
        Fixed mode (constant ``s = posterior_std``): ``0.5 * sum(mu^2 + s^2 - 1 - ln s^2)``, i.e.
        ``0.5 * |mu|^2 + d/2 (s^2 - 1 - ln s^2)``: only the ``|mu|^2`` part carries a gradient (method §5.1).

        Returns:
            ``(B,)`` float32 tensor.
        """
        mu = mu.float()
        if self.learned:
            if logvar is None:
                raise ValueError("VAE.kl: logvar is required with model.vae.posterior='learned'")
            lv = logvar.float()
            terms = mu.pow(2) + lv.exp() - 1.0 - lv
        else:
            s2 = float(self.cfg.posterior_std) ** 2
            terms = mu.pow(2) + (s2 - 1.0 - math.log(s2))
        return 0.5 * terms.flatten(1).sum(dim=1)

    # ------------------------------------------------------------------ decoder
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, latent_channels, h, w)`` -> reconstruction ``(B, in_channels, h*f, w*f)`` (unbounded; the
        training targets are images in ``[-1, 1]``)."""
        if z.dim() != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"VAE.decode expects (B, {self.cfg.latent_channels}, h, w); got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))


def _check(cfg: VAEConfig, resolution: int) -> None:
    """Reject configurations that cannot build a network, naming the key."""
    if cfg.posterior not in ("fixed", "learned"):
        raise ValueError(f"model.vae.posterior={cfg.posterior!r}: must be 'fixed' or 'learned'")
    if cfg.posterior_std <= 0:
        raise ValueError(f"model.vae.posterior_std={cfg.posterior_std!r}: must be > 0")
    if len(cfg.ch_mult) < 1 or any(m < 1 for m in cfg.ch_mult):
        raise ValueError(f"model.vae.ch_mult={list(cfg.ch_mult)!r}: needs >= 1 entries, each >= 1")
    for key in ("base_channels", "num_res_blocks", "latent_channels", "norm_groups", "in_channels"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"model.vae.{key}={getattr(cfg, key)!r}: must be >= 1")
    for m in cfg.ch_mult:
        if (cfg.base_channels * m) % cfg.norm_groups:
            raise ValueError(
                f"model.vae.norm_groups={cfg.norm_groups}: must divide every level width base_channels*ch_mult "
                f"({cfg.base_channels}*{m})"
            )
    f = 2 ** (len(cfg.ch_mult) - 1)
    if resolution < f or resolution % f:
        raise ValueError(f"model.resolution={resolution}: must be a multiple of the VAE downsampling factor {f}")


__all__ = ["ResnetBlock", "AttnBlock", "Downsample", "Upsample", "Encoder", "Decoder", "VAE"]
