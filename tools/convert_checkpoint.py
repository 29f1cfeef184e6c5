#!/usr/bin/env python
"""Convert a ``simflow-checkpoint/2`` step (full tensors pickled into ``shard-*.pt`` + ``common.pt``) into a
``simflow-checkpoint/3`` step (DCP-sharded, :mod:`simflow.checkpoint.store`) that training resumes from.

    python tools/convert_checkpoint.py runs/x/checkpoints/step-0001000 runs/x/checkpoints-v3
    # then train with checkpoint.dir=runs/x/checkpoints-v3 (or move it in place of the old root)

The old optimizer state is indexed by the position of each trainable parameter in ``module.parameters()``; the
converter rebuilds the model on the ``meta`` device from the config in the old manifest (no memory, no weights) to
name them. Per-rank RNG files are not carried over (the data order, posterior noise and label dropout are functions of
the seed and the sample index, not of RNG state). Reads only with ``torch.load(weights_only=True)``; exits 2 naming the
problem when the input is not a committed ``simflow-checkpoint/2`` step.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from typing import Any, Dict

import torch

from simflow import storage
from simflow.checkpoint.store import CheckpointError, read_manifest, save_checkpoint

OLD = "simflow-checkpoint/2"
_TENSOR = "__tensor__"


def _unflatten(skeleton: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        return {k: _unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_unflatten(v, tensors) for v in skeleton)
    return skeleton


def _load(d: str, name: str) -> Any:
    return torch.load(io.BytesIO(storage.read_bytes(storage.join(d, name))), map_location="cpu", weights_only=True)


def read_old(d: str) -> tuple:
    """(parts with full tensors, manifest) of an old step directory."""
    manifest = read_manifest(d)
    if manifest.get("format") != OLD:
        raise CheckpointError(f"{d}: format {manifest.get('format')!r}, expected {OLD!r}")
    common = _load(d, "common.pt")
    tensors: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(common["index"].values())):
        tensors.update(_load(d, shard))
    return {k: _unflatten(v, tensors) for k, v in common["skeleton"].items()}, manifest


def trainable_names(cfg, part: str) -> list:
    """Names of the parameters an engine optimises, in ``module.parameters()`` order (built on the meta device)."""
    from simflow.models.discriminator import NLayerDiscriminator
    from simflow.models.simflow import build_generator

    with torch.device("meta"):
        if part == "generator":
            model = build_generator(cfg)  # no vae_init: names only, no weights file is needed
        else:
            g = cfg.loss.gan
            model = NLayerDiscriminator(3, g.ndf, g.n_layers, g.norm)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def legacy_names(names: list) -> list:
    """``names`` with every fused ``attn.qkv.weight, attn.qkv.bias`` pair expanded back into the ``attn.q/k/v``
    weight and bias entries the model had before the fused QKV projection (commit aa244c8), in their registration
    order (q.weight, q.bias, k.weight, ...): the parameter order an old optimizer state is indexed by."""
    out = []
    for n in names:
        m = re.fullmatch(r"(.*attn\.)qkv\.(weight|bias)", n)
        if not m:
            out.append(n)
        elif m.group(2) == "weight":
            out += [f"{m.group(1)}{x}.{kind}" for x in ("q", "k", "v") for kind in ("weight", "bias")]
    return out


def _fuse_optimizer(named: Dict[str, Any], head_dim: int) -> Dict[str, Any]:
    """Adam moments of legacy q/k/v parameters fused like the weights (:func:`simflow.models.flow.fuse_qkv`); the
    moments are elementwise, so the fused state is the exact state of the fused parameter."""
    from simflow.models.flow import convert_legacy_qkv

    if not any(re.search(r"attn\.q\.(weight|bias)$", n) for n in named):
        return named
    out = {n: st for n, st in named.items() if not re.search(r"attn\.[qkv]\.(weight|bias)$", n)}
    for key in ("exp_avg", "exp_avg_sq"):
        legacy = {n: st[key] for n, st in named.items() if re.search(r"attn\.[qkv]\.(weight|bias)$", n)}
        for n, t in convert_legacy_qkv(legacy, head_dim).items():
            q = n.replace("qkv.", "q.")
            out.setdefault(n, {k: v for k, v in named[q].items() if k not in ("exp_avg", "exp_avg_sq")})[key] = t
    return out


def convert(src: str, dst_root: str) -> str:
    from simflow.config import from_dict
    from simflow.models.flow import convert_legacy_qkv

    parts, manifest = read_old(src)
    cfg = from_dict(manifest["config"])
    head_dim = int(cfg.model.flow.head_dim)
    new: Dict[str, Any] = {}
    for name, state in parts.items():
        if name in ("generator", "discriminator"):
            names = trainable_names(cfg, name)
            opt = state.get("optimizer", {})
            if name == "generator" and len(opt.get("state", {})) > len(names):
                names = legacy_names(names)  # saved before the fused QKV projection
                params = [k for k in state["module"] if k in set(names)]
                if params != names:
                    raise CheckpointError(f"{src}: generator parameters {params[:4]}... are not the legacy q/k/v "
                                          f"layout of today's model {names[:4]}...")
            if len(opt.get("state", {})) > len(names):
                raise CheckpointError(f"{src}: {name} optimizer state has {len(opt['state'])} entries, the model "
                                      f"{len(names)} trainable parameters")
            named = {names[int(i)]: st for i, st in opt.get("state", {}).items()}
            module, ema = state["module"], state.get("ema", {})
            if name == "generator":
                named = _fuse_optimizer(named, head_dim)
                module, ema = convert_legacy_qkv(module, head_dim), convert_legacy_qkv(ema, head_dim)
            group = {k: v for k, v in (opt.get("param_groups") or [{}])[0].items() if k != "params"}
            new[name] = {"module": module, "ema": ema, "steps": state["steps"],
                         "optimizer": {"state": named, "param_group": {k: v for k, v in group.items()
                                                                       if isinstance(v, (int, float, str, bool))}}}
        else:
            new[name] = state
    meta = {k: v for k, v in manifest.items() if k not in ("files", "format", "step", "time", "world_size",
                                                            "rng_files", "parts")}
    meta["converted_from"] = {"location": src, "format": OLD}
    return save_checkpoint(dst_root, int(manifest["step"]), new, meta, keep=1 << 30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a committed simflow-checkpoint/2 step directory (local or s3://)")
    p.add_argument("dst", help="checkpoint root to write the converted step into")
    a = p.parse_args(argv)
    try:
        d = convert(a.src, a.dst)
    except (CheckpointError, KeyError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"converted": a.src, "to": d}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
