"""PatchGAN discriminator (pix2pix ``NLayerDiscriminator`` as used by taming/LDM and REPA-E; method §5.3).

Layout for ``n_layers = 3``, ``ndf = 64`` (receptive field 70x70 pixels):

``conv4x4/s2 (3->64) -> LReLU`` | ``conv4x4/s2 (64->128) -> norm -> LReLU`` | ``conv4x4/s2 (128->256) -> norm -> LReLU``
| ``conv4x4/s1 (256->512) -> norm -> LReLU`` | ``conv4x4/s1 (512->1)`` -> patch logits.

Channel multipliers are ``min(2**n, 8)``; LeakyReLU slope 0.2; convolutions followed by a normalisation carry no
bias (the norm's affine shift replaces it) unless ``norm="none"``. Initialisation as taming ``weights_init``: conv
weights ``N(0, 0.02)``, norm scales ``N(1, 0.02)``, all biases 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_NORMS = ("batch", "group", "none")


def _make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class NLayerDiscriminator(nn.Module):
    """PatchGAN: image ``(B, in_channels, H, W)`` float in ``[-1, 1]`` -> logits ``(B, 1, h, w)``, one per patch
    (``h = H/8 - 2`` for ``n_layers=3`` and ``H`` divisible by 8; e.g. 256 -> 30, 32 -> 2).

    Args:
        in_channels: image channels.
        ndf: width of the first layer.
        n_layers: number of stride-2 convolutions (the input is reduced by ``2**n_layers``).
        norm: ``"batch"`` (taming/REPA-E default), ``"group"`` (GroupNorm with ``gcd(32, C)`` groups; batch-size
            independent) or ``"none"``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"loss.gan.norm={norm!r}: must be one of {list(_NORMS)}")
        if n_layers < 1 or ndf < 1 or in_channels < 1:
            raise ValueError(
                f"NLayerDiscriminator: bad sizes in_channels={in_channels}, ndf={ndf}, n_layers={n_layers} (need >= 1)"
            )
        bias = norm == "none"
        layers = [nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=bias),
                _make_norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """taming ``weights_init``: conv ``N(0, 0.02)``, norm scale ``N(1, 0.02)``, biases zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits ``(B, 1, h, w)`` (real: large, fake: small under the hinge loss)."""
        return self.main(x)


__all__ = ["NLayerDiscriminator"]
