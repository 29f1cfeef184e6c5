"""Adversarial loss terms for the PatchGAN discriminator (method §5.2, §5.3, §11.4).

* :func:`hinge_d_loss`: discriminator hinge loss (Lim & Ye, "Geometric GAN", arXiv 1705.02894; as taming/LDM and
  REPA-E use it): ``0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])``.
* :func:`generator_adv_loss`: the generator side, ``-E[D(x_hat)]`` (method §5.2, weight ``loss.gan.weight``).
* :func:`adaptive_gan_weight`: the LDM/taming adaptive weight (method §11.4),
  ``||grad_last rec|| / (||grad_last gan|| + 1e-4)``, clamped to ``[0, 1e4]`` and detached.
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


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.nn.Parameter,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """LDM adaptive GAN weight (method §11.4): ``clamp(||d rec/d W|| / (||d gan/d W|| + eps), 0, max_weight)``,
    detached, where ``W`` is the decoder's last layer (:meth:`simflow.models.vae.VAE.last_layer`).

    Multiply the result by ``loss.gan.weight`` and the generator adversarial loss. Both losses must be scalars still
    attached to the graph; the graph is retained so the caller can backpropagate the total afterwards.

    Returns:
        0-dim float tensor on ``last_layer``'s device.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    w = g_rec.float().norm() / (g_gan.float().norm() + eps)
    return w.clamp(0.0, max_weight).detach()


__all__ = ["hinge_d_loss", "generator_adv_loss", "adaptive_gan_weight"]
