"""Checkpoint directories with a manifest and a commit marker (design.md "Checkpoint contents").

Layout::

    <dir>/step-0000100/
        <part>.pt            one file per named stateful part (engine states, loader, trainer counters, RNG, ...)
        manifest.json        file names, sizes and sha256, step, config, code version
        COMMITTED            written last: a step directory without it (or whose manifest does not verify) is
                             never loaded
    <dir>/latest             a cache of the newest committed step; discovery never trusts it

Resume = the newest step directory whose marker exists and whose manifest verifies; partial or corrupt ones are
skipped with a warning that says why. Files are written to a temporary name and renamed (atomic on POSIX).
Loading uses ``torch.load(weights_only=True)``: checkpoints hold tensors and plain containers only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

log = logging.getLogger("simflow")

STEP_RE = re.compile(r"^step-(\d{7,})$")
MARKER = "COMMITTED"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or belongs to another run/architecture."""


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:07d}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str, step: int, parts: Dict[str, Any], meta: Dict[str, Any], keep: int = 2) -> str:
    """Write ``parts`` (name -> picklable-with-weights_only state) as step ``step``; returns the step directory.

    ``meta`` (JSON-serialisable: config dict, run id, code version) goes into the manifest. After the marker is
    written, step directories beyond the newest ``keep`` committed ones are deleted.
    """
    d = step_dir(root, step)
    if os.path.isdir(d):
        shutil.rmtree(d)  # a stale partial write of the same step
    os.makedirs(d)
    files = {}
    for name, state in parts.items():
        path = os.path.join(d, f"{name}.pt")
        _atomic_torch_save(state, path)
        files[f"{name}.pt"] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    manifest = {"step": step, "time": time.time(), "files": files, **meta}
    _atomic_write_text(json.dumps(manifest, indent=1, sort_keys=True), os.path.join(d, MANIFEST))
    _atomic_write_text(f"{step}\n", os.path.join(d, MARKER))
    _atomic_write_text(f"{os.path.basename(d)}\n", os.path.join(root, "latest"))
    prune(root, keep)
    return d


def verify(d: str) -> Tuple[bool, str]:
    """(ok, reason): marker present, manifest readable, every listed file present with the right size and sha256."""
    if not os.path.isfile(os.path.join(d, MARKER)):
        return False, "no commit marker (write was interrupted)"
    try:
        with open(os.path.join(d, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return False, f"manifest unreadable: {e}"
    for name, info in manifest["files"].items():
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            return False, f"missing file {name}"
        if os.path.getsize(path) != info["bytes"]:
            return False, f"{name} has {os.path.getsize(path)} bytes, manifest says {info['bytes']} (truncated?)"
        if _sha256(path) != info["sha256"]:
            return False, f"{name} sha256 mismatch (corrupt)"
    return True, "ok"


def list_steps(root: str) -> List[Tuple[int, str]]:
    """All step directories under ``root`` (committed or not), oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def find_latest(root: str) -> Optional[str]:
    """The newest valid step directory, or None. Invalid newer ones are reported (warning) and skipped."""
    for step, d in reversed(list_steps(root)):
        ok, why = verify(d)
        if ok:
            return d
        log.warning("skipping checkpoint %s: %s", d, why)
    return None


def load_checkpoint(d: str, parts: Optional[List[str]] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(parts, manifest) of a verified step directory. Raises :class:`CheckpointError` if it does not verify."""
    ok, why = verify(d)
    if not ok:
        raise CheckpointError(f"{d}: {why}")
    with open(os.path.join(d, MANIFEST)) as f:
        manifest = json.load(f)
    names = parts or [n[:-3] for n in manifest["files"]]
    out = {}
    for n in names:
        out[n] = torch.load(os.path.join(d, f"{n}.pt"), map_location="cpu", weights_only=True)
    return out, manifest


def prune(root: str, keep: int) -> None:
    """Delete all but the newest ``keep`` committed step directories (and uncommitted ones older than them)."""
    steps = list_steps(root)
    committed = [(s, d) for s, d in steps if os.path.isfile(os.path.join(d, MARKER))]
    if len(committed) <= keep:
        return
    cutoff = committed[-keep][0]
    for s, d in steps:
        if s < cutoff:
            shutil.rmtree(d, ignore_errors=True)
