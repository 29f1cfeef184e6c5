"""SimFlow = fixed-variance VAE + class-conditional transformer flow (+ optional REPA projector), method §1.

Training pass (method §5.4 steps 3-4)::

    mu, logvar = vae.encode(x)                 # mean only in the fixed-posterior mode
    z = mu + posterior_std * eps               # fresh eps each step, drawn per sample by the caller
    x_hat = vae.decode(z)                      # reconstruction from the *noisy* latent
    z_K, log_det = flow(z, y_dropped)          # exact NLL of the same z; gradients reach the encoder

There is no stop-gradient anywhere (method §5.1). Sampling (method §4.5): noise -> flow inverse with CFG ->
decoder, no denoising step.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from simflow.config import SimFlowConfig
from simflow.models.flow import Guidance, TransformerFlow
from simflow.models.repa import REPAProjector
from simflow.models.vae import VAE


class SimFlowModel(nn.Module):
    """The generator: ``vae`` + ``flow`` (+ ``repa_projector`` when ``loss.repa.enabled``).

    Args:
        cfg: full config (uses ``model``, ``loss.repa``).
        linear_factory: linear-layer factory for the flow transformer (tensor parallelism enters here).
    """

    def __init__(self, cfg: SimFlowConfig, linear_factory=None):
        super().__init__()
        self.cfg = cfg
        self.vae = VAE(cfg.model.vae, cfg.model.resolution)
        c, h, w = self.vae.latent_shape(cfg.model.resolution)
        if h != w:
            raise ValueError(f"model.resolution={cfg.model.resolution} gives a non-square latent {h}x{w}")
        self.latent_shape = (c, h, w)
        self.flow = TransformerFlow(cfg.model.flow, in_channels=c, latent_size=h, linear_factory=linear_factory)
        self.repa_projector = None
        if cfg.loss.repa.enabled:
            r = cfg.loss.repa
            self.repa_projector = REPAProjector(cfg.model.flow.width, r.projector_dim, r.teacher_dim)

    @property
    def null_class(self) -> int:
        return self.flow.num_classes

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, latent_noise: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """One joint training pass.

        Args:
            x: images (B, 3, H, W) float in [-1, 1].
            y: labels (B,) int64, already label-dropped (null class = ``num_classes``).
            eps: posterior noise (B, C_lat, h, w) ~ N(0, I), drawn per sample by the caller.
            latent_noise: extra noise (B, C_lat, h, w) ~ N(0, I), required when ``model.flow.noise_std > 0``:
                ``z <- z + noise_std * latent_noise`` (STARFlow-style noise augmentation, method §5.5 / §10.3);
                the flow and the decoder both see the noisy ``z``. Ignored when ``noise_std == 0``.
        Returns:
            dict with ``mu``, ``logvar`` (None in fixed mode), ``z`` (B, C_lat, h, w), ``x_hat`` (B, 3, H, W),
            ``flow_z`` (B, T, C) float32, ``log_det`` (B,) nats, ``nll`` (B,) L_NF in nats/dim without the
            constant (method §4.4), ``block_outputs`` (list), and ``repa_pred`` (B, T, D_teacher) when enabled.
        """
        mu, logvar = self.vae.encode(x)
        z = self.vae.reparameterize(mu, logvar, eps)
        noise_std = self.cfg.model.flow.noise_std
        if noise_std > 0:
            if latent_noise is None or latent_noise.shape != z.shape:
                got = None if latent_noise is None else tuple(latent_noise.shape)
                raise ValueError(f"model.flow.noise_std={noise_std}: forward needs latent_noise of shape "
                                 f"{tuple(z.shape)}; got {got}")
            z = z + noise_std * latent_noise.to(z.dtype)
        x_hat = self.vae.decode(z)
        hidden_layer = self.cfg.loss.repa.layer if self.repa_projector is not None else None
        flow_z, log_det, aux = self.flow(z, y, hidden_layer=hidden_layer)
        out = {
            "mu": mu,
            "logvar": logvar,
            "z": z,
            "x_hat": x_hat,
            "flow_z": flow_z,
            "log_det": log_det,
            "nll": self.flow.nll_loss(flow_z, log_det),
            "block_outputs": aux["block_outputs"],
        }
        if self.repa_projector is not None:
            out["repa_pred"] = self.repa_projector(aux["hidden"])
        return out

    @torch.no_grad()
    def sample(
        self,
        y: torch.Tensor,
        noise: torch.Tensor,
        guidance: Optional[Guidance] = None,
        temperature: float = 1.0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Class-conditional samples (method §4.5): noise (B, T, C) -> images (B, 3, H, W) float, roughly [-1, 1]
        (not clamped). ``temperature`` multiplies the noise (method §4.5 step 1)."""
        latent = self.flow.inverse(noise * temperature, y, guidance, use_cache=use_cache)
        return self.vae.decode(latent.to(next(self.vae.parameters()).dtype))


def build_generator(cfg: SimFlowConfig, linear_factory=None,
                    vae_init: Optional[Callable[[nn.Module], object]] = None) -> SimFlowModel:
    """``SimFlowModel(cfg, linear_factory)`` as a training run starts it: ``vae_init(model.vae)`` fills the VAE
    (the trainer passes the ``train.init_vae_from`` loader, :func:`simflow.checkpoint.weights.load_vae_weights`),
    and with ``train.freeze_vae`` the VAE's ``requires_grad`` is off, so it gets no optimizer state and no updates
    (method §10.3 "Frozen VAE" variants)."""
    model = SimFlowModel(cfg, linear_factory)
    if vae_init is not None:
        vae_init(model.vae)
    if cfg.train.freeze_vae:
        model.vae.requires_grad_(False)
    return model
