"""Adversarial loss terms for the PatchGAN discriminator (method §5.2, §5.3, §11.4).

* :func:`hinge_d_loss`: discriminator hinge loss (Lim & Ye, "Geometric GAN", arXiv 1705.02894; as taming/LDM and
  REPA-E use it): ``0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])``.
* :func:`generator_adv_loss`: the generator side, ``-E[D(x_hat)]`` (method §5.2, weight ``loss.gan.weight``).

The LDM/taming adaptive GAN weight (method §11.4) is not implemented: the product uses REPA-E's fixed weight, and
under ZeRO-3 the decoder's last layer is partitioned outside its forward, so ``autograd.grad`` w.r.t. it cannot work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (mean(relu(1 - logits_real)) + mean(relu(1 + logits_fake)))``
    (method §5.3; arXiv 1705.02894).

    Args:
        logits_real: discriminator logits on real images, any shape (e.g. patch logits ``(B, 1, h, w)``).
        logits_fake: logits on reconstructions (pass ``D(x_hat.detach())``), any shape.

    Returns:
        scalar tensor (0 when real logits >= 1 and fake logits <= -1 everywhere).
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator adversarial loss ``-mean(logits_fake)`` (method §5.2; taming/LDM, REPA-E). Scalar tensor."""
    return -logits_fake.mean()


__all__ = ["hinge_d_loss", "generator_adv_loss"]
