"""The REPA projector: a trainable head of the generator (its weights are ``repa_projector.*`` in the
generator's state), mapping flow tokens to the frozen teacher's feature width (method §6.1; REPA, arXiv 2410.06940;
REPA-E, arXiv 2504.10483). The teacher and the alignment loss are in :mod:`simflow.losses.teacher`.
"""

from __future__ import annotations

import torch
from torch import nn


class REPAProjector(nn.Module):
    """REPA projector MLP applied per token (method §6.1): ``(B, T, in_dim)`` -> ``(B, T, out_dim)``.

    ``Linear(in_dim, hidden) -> SiLU -> Linear(hidden, hidden) -> SiLU -> Linear(hidden, out_dim)``; hidden 2048 in
    REPA/REPA-E (``loss.repa.projector_dim``), ``out_dim`` is the teacher width (768 for DINOv2 ViT-B).
    """

    def __init__(self, in_dim: int, hidden: int = 2048, out_dim: int = 768):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


__all__ = ["REPAProjector"]
