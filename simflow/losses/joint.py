"""The joint generator objective of SimFlow (method §5.2) and the discriminator objective (method §5.3).

    L_G = w_rec ||x - x_hat||_1 + w_lpips LPIPS(x, x_hat) + w_gan (-E[D(x_hat)]) + lambda_NF L_NF(z, y)
          (+ w_kl KL(q || N(0, I)) in the learned-posterior mode) (+ lambda_align L_REPA) (+ latent-norm reg.)

with x_hat = Dec(mu + sigma * eps) and L_NF the per-dim flow NLL in nats without the 1/2 log 2 pi constant
(method §4.4). All terms are means over the batch; every term is also returned separately for logging, as a
detached 0-dim fp32 tensor on the loss's device: nothing here reads a value on the host (no device-to-host sync in
the step; the trainer reduces the metrics once per ``train.log_every`` steps, as torchtitan and nanoGPT do).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from simflow.config import SimFlowConfig
from simflow.losses.gan import generator_adv_loss, hinge_d_loss
from simflow.models.flow import TransformerFlow


def nll_lower_bound(posterior_std: float) -> float:
    """Lower bound of L_NF (nats/dim, without the 1/2 log 2 pi constant) for a fixed posterior std (method §4.4):
    the latent carries fresh Gaussian noise of variance s^2, so its entropy bounds any model's cross-entropy:
    L_NF >= 1/2 (1 + ln s^2) (= -0.193 for s = 0.5). A loss below this means causal leakage or a log-det bug."""
    return 0.5 * (1.0 + math.log(posterior_std**2))


def generator_loss(
    cfg: SimFlowConfig,
    model: nn.Module,
    out: Dict[str, torch.Tensor],
    x: torch.Tensor,
    step: int,
    perceptual: Optional[nn.Module] = None,
    discriminator: Optional[nn.Module] = None,
    teacher_features: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total generator loss for one micro-batch and its separately logged terms.

    Args:
        cfg: config (``loss`` section).
        model: the :class:`~simflow.models.simflow.SimFlowModel` (for ``vae.kl``).
        out: the model's forward dict.
        x: target images (B, 3, H, W) in [-1, 1].
        step: optimizer step (the GAN term starts at ``loss.gan.start_step``).
        perceptual: LPIPS module or None; discriminator: PatchGAN or None (its params must be frozen by the caller).
        teacher_features: DINOv2 patch features (B, T, C) for REPA, or None.
    Returns:
        (loss, metrics): scalar fp32 loss; metrics as detached 0-dim fp32 device tensors (no host sync): ``rec`` (L1), ``lpips``, ``gan``, ``kl``
        (nats/sample), ``repa``, ``nll`` (L_NF, nats/dim), ``nll_nats`` (with constant), ``bits_per_dim``,
        ``log_det`` (nats/dim), ``z2`` (mean z_K^2), ``loss``.
    """
    lc = cfg.loss
    x_hat = out["x_hat"].float()
    rec = (x.float() - x_hat).abs().mean()
    nll = out["nll"].mean()
    loss = lc.rec_weight * rec + lc.nll_weight * nll
    d = model.flow.num_dims
    metrics = {
        "rec": rec,
        "nll": nll,
        "nll_nats": TransformerFlow.nll_nats_per_dim(nll),
        "bits_per_dim": TransformerFlow.bits_per_dim(nll),
        "log_det": out["log_det"].float().mean() / d,
        "z2": out["flow_z"].float().pow(2).mean(),
    }
    if perceptual is not None and lc.perceptual.weight > 0:
        lp = perceptual(x.float(), x_hat).mean()
        loss = loss + lc.perceptual.weight * lp
        metrics["lpips"] = lp
    if cfg.model.vae.posterior == "learned":
        kl = model.vae.kl(out["mu"], out["logvar"]).mean()
        loss = loss + lc.kl_weight * kl
        metrics["kl"] = kl
    if discriminator is not None and lc.gan.weight > 0 and step >= lc.gan.start_step:
        gan = generator_adv_loss(discriminator(x_hat))
        loss = loss + lc.gan.weight * gan
        metrics["gan"] = gan
    if teacher_features is not None and "repa_pred" in out:
        from simflow.losses.teacher import repa_loss

        repa = repa_loss(out["repa_pred"], teacher_features)
        loss = loss + lc.repa.weight * repa
        metrics["repa"] = repa
    if cfg.model.flow.latent_norm_reg > 0:
        reg = sum(o.float().pow(2).mean() for o in out["block_outputs"])
        loss = loss + cfg.model.flow.latent_norm_reg * reg
    metrics["loss"] = loss
    return loss, _detached(metrics)


def _detached(metrics: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Metrics as detached fp32 0-dim tensors (no host sync; the trainer stacks and reduces them at log steps)."""
    return {k: v.detach().float() for k, v in metrics.items()}


def discriminator_loss(discriminator: nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> Tuple[torch.Tensor, Dict]:
    """Hinge loss on real x and detached reconstructions (method §5.3). Returns (loss, {"d_loss", "d_real",
    "d_fake"}) with the mean logits for logging, as detached 0-dim fp32 device tensors (no host sync)."""
    real = discriminator(x.float())
    fake = discriminator(x_hat.detach().float())
    loss = hinge_d_loss(real, fake)
    return loss, _detached({"d_loss": loss, "d_real": real.mean(), "d_fake": fake.mean()})
