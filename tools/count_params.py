#!/usr/bin/env python
"""Print the parameter count of each SimFlow component for a config.

    python tools/count_params.py configs/xl.yaml [key=value ...]

Builds the model on the ``meta`` device (no memory, no initialisation), so XL is counted in about a second.
"""

import argparse
import sys

import torch

from simflow.config import load_config
from simflow.models.discriminator import NLayerDiscriminator
from simflow.models.simflow import SimFlowModel


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def component_counts(cfg) -> dict:
    """{component: parameter count} for the generator parts and the discriminator."""
    with torch.device("meta"):
        model = SimFlowModel(cfg)
        g = cfg.loss.gan
        disc = NLayerDiscriminator(3, g.ndf, g.n_layers, g.norm)
    flow = model.flow
    out = {
        "vae.encoder": count(model.vae.encoder),
        "vae.decoder": count(model.vae.decoder),
        "vae (total)": count(model.vae),
        "flow (total)": count(flow),
    }
    for k, block in enumerate(flow.blocks):
        out[f"  flow.block{k} ({len(block.layers)} layers)"] = count(block)
    out["flow.class_emb"] = count(flow.class_emb)
    if model.repa_projector is not None:
        out["repa_projector"] = count(model.repa_projector)
    out["generator (total)"] = count(model)
    out["discriminator"] = count(disc)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    counts = component_counts(cfg)
    c, h, w = (cfg.model.vae.latent_channels, *(2 * [cfg.model.resolution // 2 ** (len(cfg.model.vae.ch_mult) - 1)]))
    print(f"config {a.config}: {cfg.model.resolution}px, latent {c}x{h}x{w}, "
          f"{(h // cfg.model.flow.patch_size) ** 2} tokens")
    print(f"{'component':<34}{'parameters':>16}")
    for k, v in counts.items():
        print(f"{k:<34}{v:>16,}  ({v / 1e6:,.1f}M)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
