"""Read trained weights (and the config that describes them) from an export file or a checkpoint.

Used by offline sampling and reconstruction (:mod:`simflow.eval.weights` builds the generator from them) and by
training (``train.init_vae_from``). Two kinds of weights are accepted, both without unpickling arbitrary objects:

* an exported weights file (``Trainer.export`` -> ``<train.out_dir>/weights.safetensors``): full fp32 weights in
  which the flow already holds its EMA values (method §8, EMA 0.9999 on the flow) and the VAE its raw ones (method
  §12 #12: non-EMA VAE + EMA flow); ``.safetensors``, or a ``.pt``/``.pth`` state dict read with
  ``torch.load(weights_only=True)``;
* a checkpoint (``simflow.checkpoint.store``): a committed step directory, or a checkpoint root whose newest valid
  step is used. Its ``generator`` part holds ``module`` (raw weights) and ``ema`` (EMA entries, e.g. every
  ``flow.*`` parameter); with ``use_ema`` the EMA entries replace the raw ones. The manifest carries the training
  config, so ``--config`` may be omitted (or point at the checkpoint).

The config (architecture) comes from a YAML file or a checkpoint manifest, plus ``key=value`` overrides; the
weights must match it key for key and shape for shape, otherwise the error names the first mismatches.

Both kinds are read through the checkpoint storage layer (:mod:`simflow.storage`), so a local path and an
``s3://bucket/...`` location work alike; from a checkpoint only the weights and EMA tensors are read (not the
optimizer moments), and every file read is checked against the manifest's sha256.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from simflow import storage
from simflow.checkpoint.store import (MANIFEST, MARKER, CheckpointError, find_latest, list_steps,
                                      load_checkpoint, read_manifest)
from simflow.config import ConfigError, SimFlowConfig, from_dict, load_config, validate

STATE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class WeightsError(ValueError):
    """Weights are missing, unreadable, or do not fit the config. The message names the file and the key."""


@dataclass
class WeightsSource:
    """Where the generator weights came from (recorded in sample-set sidecars).

    Attributes:
        path: absolute path of the weights file or checkpoint step directory.
        kind: ``"export"`` (a state-dict file) or ``"checkpoint"``.
        sha256: SHA-256 of the weights file (for a checkpoint: of its manifest, as named by the commit marker).
        ema: True when the flow runs with EMA weights (exports always hold the EMA flow).
        step: training step, when known (checkpoint manifest or export metadata).
        run_id: training run id, when known.
    """

    path: str
    kind: str
    sha256: str
    ema: bool
    step: Optional[int] = None
    run_id: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> Dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "sha256": self.sha256, "ema": self.ema, "step": self.step,
                "run_id": self.run_id, **self.extra}


def _where(path: str) -> str:
    """Absolute path for a local location, the URL itself for object storage."""
    return os.path.abspath(path) if storage.is_local(path) else path


def resolve_checkpoint_dir(path: str) -> Optional[str]:
    """A committed step directory for ``path`` (a step directory or a checkpoint root), or None if ``path`` is not a
    checkpoint directory. Raises :class:`WeightsError` for a checkpoint root without a valid step."""
    if storage.is_local(path) and not os.path.isdir(path):
        return None
    if not storage.is_local(path) and path.endswith(STATE_SUFFIXES):
        return None
    if storage.exists(storage.join(path, MANIFEST)):
        return path
    if list_steps(path):
        d = find_latest(path)
        if d is None:
            raise WeightsError(f"{path}: no committed, verified checkpoint step (see the warnings above)")
        return d
    return None


def resolve_config(config: Optional[str], weights: Optional[str] = None,
                   overrides: Sequence[str] = ()) -> SimFlowConfig:
    """The generator's config.

    Args:
        config: a YAML file, a checkpoint directory (its manifest's config is used), or None to take the config of
            ``weights`` when that is a checkpoint.
        weights: the weights path (used only when ``config`` is None).
        overrides: ``key=value`` strings merged on top (e.g. ``sample.cfg_scale=1.5``).

    Raises:
        ConfigError: no config could be found, or a key/value is invalid (names the key).
    """
    source = config if config is not None else weights
    step_dir = resolve_checkpoint_dir(source) if source else None
    if step_dir is None:
        if config is None:
            raise ConfigError(
                f"no config for {weights!r}: pass --config with the YAML used for training (or a checkpoint "
                f"directory, whose manifest holds the config)"
            )
        return load_config(config, overrides)
    try:
        stored = read_manifest(step_dir).get("config")
    except CheckpointError as e:
        raise WeightsError(str(e)) from None
    if not isinstance(stored, dict):
        raise ConfigError(f"{step_dir}: the checkpoint manifest has no 'config' entry")
    source = f"{step_dir}/{MANIFEST}"
    cfg = from_dict(stored, overrides, source=source)
    validate(cfg, source=source)
    return cfg


def _read_state_file(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    if not storage.is_local(path):  # object storage: stream into a temporary local file, then read it as usual
        fs, key = storage.split(path)
        with tempfile.TemporaryDirectory(prefix="simflow-weights-") as tmp:
            local = os.path.join(tmp, os.path.basename(key))
            fs.get_file(key, local)
            return _read_state_file(local)
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(path, device="cpu"), meta
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated files, non-tensor pickles
        raise WeightsError(f"{path}: cannot load as a tensor state dict (torch.load weights_only=True): {e}") from None
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        raise WeightsError(f"{path}: looks like a checkpoint part (has 'module'); pass the checkpoint step directory")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of parameter name -> tensor")
    return obj, {}


def _checkpoint_state(step_dir: str, use_ema: bool) -> Tuple[Dict[str, torch.Tensor], WeightsSource]:
    try:
        parts, manifest = load_checkpoint(step_dir, parts=["generator"], verify_all=False,
                                          prefixes=("module",) + (("ema",) if use_ema else ()))
    except CheckpointError as e:
        raise WeightsError(str(e)) from None
    gen = parts["generator"]
    if not isinstance(gen, dict) or not isinstance(gen.get("module"), dict):
        raise WeightsError(f"{step_dir}: its 'generator' part has no full 'module' state dict; export full weights "
                           f"first (Trainer.export -> weights.safetensors) and pass that file")
    state = dict(gen["module"])
    ema = gen.get("ema") or {}
    if use_ema:
        if not ema:
            raise WeightsError(f"{step_dir}: the generator holds no EMA weights; set sample.use_ema=false to use the "
                               f"raw ones")
        unknown = sorted(set(ema) - set(state))
        if unknown:
            raise WeightsError(f"{step_dir}: EMA entries without a parameter: {unknown[:5]}")
        state.update(ema)
    # The commit marker names the manifest's sha256, and the manifest the sha256 of every file: one digest that
    # identifies the whole (verified) checkpoint.
    marker = json.loads(storage.read_bytes(storage.join(step_dir, MARKER)))
    src = WeightsSource(_where(step_dir), "checkpoint", marker["manifest_sha256"], bool(use_ema),
                        int(manifest.get("step", -1)), manifest.get("run_id"),
                        {"ema_entries": len(ema) if use_ema else 0})
    return state, src


def load_state(weights: str, use_ema: bool = True) -> Tuple[Dict[str, torch.Tensor], WeightsSource]:
    """Read generator weights from an export file or a checkpoint (see the module docstring).

    Args:
        weights: path to ``*.safetensors`` / ``*.pt`` / ``*.pth``, a checkpoint step directory or checkpoint root.
        use_ema: run the flow with EMA weights. Export files always hold the EMA flow, so ``False`` is refused for
            them (the raw flow weights are only in checkpoints).

    Returns:
        (state dict name -> CPU tensor, :class:`WeightsSource`).

    Raises:
        WeightsError: missing/unreadable file, or ``use_ema=False`` with an export file.
    """
    if not weights or not storage.exists(weights):
        raise WeightsError(
            f"weights not found: {weights!r} (expected an exported weights.safetensors or a checkpoint directory)")
    step_dir = resolve_checkpoint_dir(weights)
    if step_dir is not None:
        return _checkpoint_state(step_dir, use_ema)
    if storage.is_local(weights) and os.path.isdir(weights):
        raise WeightsError(f"{weights}: a directory, but not a checkpoint (no manifest.json, no step-* folders)")
    if not weights.endswith(STATE_SUFFIXES):
        raise WeightsError(
            f"{weights}: unknown weights format; expected one of {list(STATE_SUFFIXES)} or a checkpoint directory")
    if not use_ema:
        raise WeightsError(
            f"{weights}: exported weights hold the EMA flow only; sample.use_ema=false needs a checkpoint directory"
        )
    state, meta = _read_state_file(weights)
    step = meta.get("step")
    src = WeightsSource(_where(weights), "export", storage.sha256_file(weights), True,
                        int(step) if step is not None and str(step).lstrip("-").isdigit() else None, meta.get("run_id"))
    return state, src


def check_state_fits(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], where: str, what: str,
                     target: str) -> None:
    """The one weights-vs-config check: ``state`` must have exactly the keys of ``own`` (a module's
    ``state_dict()``), each with the same shape.

    Args:
        state / own: name -> tensor, the weights read and the module built from the config.
        where: what the message starts with (the file, or ``key=value`` of the setting that named it).
        what / target: the message's words, e.g. ``"VAE weights"`` / ``"model.vae"``.

    Raises:
        WeightsError: naming ``where``, the first shape mismatches, missing and unexpected keys (with counts).
    """
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    wrong = [f"{k}: weights {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        problems = []
        if wrong:
            problems.append(f"shape mismatches ({len(wrong)}): {wrong[:3]}")
        if missing:
            problems.append(f"missing keys ({len(missing)}): {missing[:3]}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:3]}")
        raise WeightsError(f"{where}: the {what} do not fit {target}: " + "; ".join(problems))


def load_vae_weights(vae: torch.nn.Module, path: str) -> Dict[str, Any]:
    """Load the ``vae.*`` entries of an exported weights file or a checkpoint into ``vae`` (strict;
    ``train.init_vae_from``, method §10.3 "Frozen VAE" variants).

    Args:
        vae: the :class:`~simflow.models.vae.VAE` to fill.
        path: ``weights.safetensors`` (``Trainer.export``) or a checkpoint step/root directory.

    Returns:
        the source description (path, SHA-256, step) of :func:`load_state`.

    Raises:
        WeightsError: missing file, no ``vae.*`` entries, or entries that do not fit the config's VAE (names the
            file, the key ``train.init_vae_from`` and the mismatching tensors).
    """
    where = f"train.init_vae_from={path!r}"
    try:
        state, src = load_state(path, use_ema=True)
    except WeightsError as e:
        raise WeightsError(f"{where}: {e}") from None
    vae_state = {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}
    if not vae_state:
        raise WeightsError(f"{where}: no 'vae.*' entries in the weights")
    own = vae.state_dict()
    check_state_fits(vae_state, own, where, "VAE weights", "model.vae")
    vae.load_state_dict({k: v.to(own[k].dtype) for k, v in vae_state.items()}, strict=True)
    return src.describe()


__all__ = [
    "STATE_SUFFIXES",
    "WeightsError",
    "WeightsSource",
    "resolve_checkpoint_dir",
    "resolve_config",
    "load_state",
    "check_state_fits",
    "load_vae_weights",
]
