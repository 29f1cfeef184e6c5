"""The plan of the variant study (method §10.3): which configs under ``configs/ablate/`` are trained, with which
overrides, and which need a VAE pretraining stage first."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class Variant:
    """One row of the study.

    Attributes:
        name: short id (``a``, ``b``, ``c``, ``d``, ``a_std0.25``, ...).
        config: YAML file (``configs/ablate/*.yaml``).
        overrides: extra ``key=value`` overrides (the posterior_std sweep).
        label: what the row is, for the table.
        pretrain: for frozen-VAE variants, the (YAML, overrides) of the VAE pretraining stage that runs first with the
            same step budget; its exported weights feed ``train.init_vae_from`` of the main stage.
        group: ``main`` (the four variants of method §10.3) or ``sweep`` (posterior_std sweep of variant a).
    """

    name: str
    config: str
    overrides: List[str] = field(default_factory=list)
    label: str = ""
    pretrain: Optional[Tuple[str, List[str]]] = None
    group: str = "main"


STD_SWEEP = (0.25, 0.5, 0.75, 1.0)


def default_plan(config_dir: str) -> List[Variant]:
    """The four variants of issue 8 (a-d) and the ``posterior_std`` sweep of (a) (0.5 is (a) itself)."""
    c = lambda name: os.path.join(config_dir, name)  # noqa: E731
    plan = [
        Variant("a", c("a_e2e_fixed.yaml"), [], "end-to-end, fixed std 0.5 (SimFlow)"),
        Variant("b", c("b_e2e_learned.yaml"), [], "end-to-end, learned variance + KL"),
        Variant("c", c("c_e2e_noise.yaml"), [], "end-to-end, learned variance + latent noise 0.3 (STARFlow-style)"),
        Variant("d", c("d_frozen_vae.yaml"), [], "frozen VAE (learned variance, pretrained), then flow",
                pretrain=(c("d_vae_pretrain.yaml"), [])),
    ]
    for s in STD_SWEEP:
        if s != 0.5:
            plan.append(Variant(f"a_std{s:g}", c("a_e2e_fixed.yaml"), [f"model.vae.posterior_std={s}"],
                                f"end-to-end, fixed std {s:g}", group="sweep"))
    return plan
