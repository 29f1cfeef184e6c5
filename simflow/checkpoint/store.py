"""Checkpoint step directories: parallel writes by all ranks, manifest + commit marker last, verified discovery.

Layout (local path or ``s3://bucket/prefix``, see :mod:`simflow.checkpoint.storage`)::

    <root>/step-0000100/
        shard-00000-of-00004.pt   tensors of the shared state assigned to rank 0 (dict: key -> tensor)
        shard-00001-of-00004.pt   ... one per rank that was assigned tensors; all ranks write at the same time
        rng-00000.pt ...          per-rank RNG states (torch CPU/CUDA, numpy, python), one per rank
        common.pt                 (rank 0) the parts' structure with tensors replaced by placeholders, and the
                                  tensor -> shard index
        manifest.json             (rank 0, after every rank finished) step, run id, config, code version, topology,
                                  and every file's size and sha256
        COMMITTED                 (rank 0, last) ``{"step", "manifest_sha256"}``: only a directory whose marker
                                  exists, names its manifest's hash, and whose files all match the manifest is valid
    <root>/latest                 a cache of the newest committed step's name; discovery never trusts it

**Shared state is topology-free**: the parts passed to :func:`save_parallel` (engine states from
``Engine.state_dict()``, which holds *full* tensors with TP slices merged and DP partitions gathered, the loader's
``consumed_samples``, trainer counters) are identical on every rank. Their tensors are spread over the ranks by size
(largest first onto the least-loaded rank), so each rank writes ~1/world of the bytes in parallel, and a checkpoint
written at any (TP, DP) is read back whole at any other: re-sharding is the engine's ``load_state_dict`` job.

**Commit protocol** (:func:`save_parallel`): rank 0 clears a stale partial directory of the same step -> broadcast ->
every rank writes its shard and its RNG file (sha256 computed while writing) -> all-gather of the file records (this
is the barrier: nothing below happens before every rank finished) -> rank 0 writes ``common.pt`` records into
``manifest.json``, then ``COMMITTED``, then ``latest``, then prunes old steps -> barrier. A writer killed at any
point leaves a directory without a valid marker, which discovery skips with the reason.

Loading uses ``torch.load(weights_only=True)``: checkpoints hold tensors and plain containers only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from simflow.checkpoint import storage

log = logging.getLogger("simflow")

STEP_RE = re.compile(r"^step-(\d{7,})$")
MARKER = "COMMITTED"
MANIFEST = "manifest.json"
COMMON = "common.pt"
LATEST = "latest"
FORMAT = "simflow-checkpoint/2"
_TENSOR = "__tensor__"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or belongs to another run/architecture."""


def step_dir(root: str, step: int) -> str:
    """Location of step ``step`` under ``root`` (``step-NNNNNNN``, 7+ digits)."""
    return storage.join(root, f"step-{step:07d}")


def shard_name(rank: int, world: int) -> str:
    """File name of rank ``rank``'s share of the shared state in a ``world``-rank checkpoint."""
    return f"shard-{rank:05d}-of-{world:05d}.pt"


def rng_name(rank: int) -> str:
    """File name of rank ``rank``'s RNG states."""
    return f"rng-{rank:05d}.pt"


# ----------------------------------------------------------------------------------------------------------------
# process group helper (works without torch.distributed)
class Group:
    """Rank, world size and the three collectives the checkpoint code needs, over the default process group, or a
    trivial group of one when ``torch.distributed`` is not initialised."""

    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (picklable objects only)."""
        if not self.on:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, obj: Any) -> List[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.on:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


# ----------------------------------------------------------------------------------------------------------------
# structure <-> tensors
def flatten(obj: Any) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, scalars) into a tensor-free skeleton and a flat
    ``{key: tensor}`` dict. Keys are ``/``-joined paths (e.g. ``generator/module/flow.head.weight``); the skeleton
    holds ``{"__tensor__": key}`` where each tensor was. Tensors are moved to CPU; views are copied so that only
    their own elements are saved."""
    tensors: Dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = path
            n = 1
            while key in tensors:
                key, n = f"{path}#{n}", n + 1
            t = x.detach().cpu()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
                t = t.clone(memory_format=torch.contiguous_format)
            tensors[key] = t
            return {_TENSOR: key}
        if isinstance(x, dict):
            if _TENSOR in x:
                raise CheckpointError(f"state at {path!r} uses the reserved key {_TENSOR!r}")
            return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            out = [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
            return tuple(out) if isinstance(x, tuple) else out
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise CheckpointError(f"state at {path!r} has a {type(x).__name__}; checkpoints hold tensors, containers "
                              f"and Python scalars only")

    return walk(obj, ""), tensors


def unflatten(skeleton: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(unflatten(v, tensors) for v in skeleton)
    return skeleton


def _tensor_keys(skeleton: Any) -> List[str]:
    out: List[str] = []

    def walk(x):
        if isinstance(x, dict):
            if set(x) == {_TENSOR}:
                out.append(x[_TENSOR])
            else:
                for v in x.values():
                    walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(skeleton)
    return out


def assign(tensors: Dict[str, torch.Tensor], world: int) -> List[List[str]]:
    """Deterministic balanced split of tensor keys over ``world`` writers: largest first (ties by key) onto the rank
    with the fewest bytes so far (ties: lowest rank). Every rank computes the same plan from the same state."""
    load = [0] * world
    plan: List[List[str]] = [[] for _ in range(world)]
    for key in sorted(tensors, key=lambda k: (-tensors[k].numel() * tensors[k].element_size(), k)):
        r = min(range(world), key=lambda i: (load[i], i))
        plan[r].append(key)
        load[r] += tensors[key].numel() * tensors[key].element_size()
    return plan


def _save_obj(obj: Any, location: str) -> Dict[str, Any]:
    with storage.open_atomic(location) as w:
        torch.save(obj, w)
    return {"bytes": w.bytes, "sha256": w.sha256.hexdigest()}


def _load_obj(location: str, expect: Optional[Dict[str, Any]] = None) -> Any:
    """``torch.load`` a file, checking its size and sha256 against the manifest record ``expect``."""
    data = storage.read_bytes(location)
    if expect is not None:
        if len(data) != expect["bytes"]:
            raise CheckpointError(f"{location}: {len(data)} bytes, manifest says {expect['bytes']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != expect["sha256"]:
            raise CheckpointError(f"{location}: sha256 differs from the manifest (corrupt)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------------
# save
def save_parallel(
    root: str,
    step: int,
    shared: Dict[str, Any],
    meta: Dict[str, Any],
    rank_state: Optional[Any] = None,
    keep: int = 2,
    group: Optional[Group] = None,
) -> str:
    """Collective: write step ``step`` under ``root`` from every rank and commit it; returns the step location.

    Args:
        root: checkpoint root (local path or ``s3://bucket/prefix``).
        step: optimizer step count of the state.
        shared: ``{part name: state}``, **identical on every rank** (engine states, loader, trainer counters).
        meta: JSON-serialisable run metadata for the manifest (``run_id``, ``config``, ``code_version``, ...).
        rank_state: this rank's own state (RNG), saved as ``rng-<rank>.pt``; None to skip.
        keep: committed steps to keep (older ones are deleted after the commit).
        group: :class:`Group` (default: the default process group, or one process).

    If ``step`` is already committed and verifies, nothing is written (idempotent re-save after a resume).
    """
    g = group or Group()
    d = step_dir(root, step)
    status = None
    if g.rank == 0:
        status = "write"
        if storage.exists(storage.join(d, MARKER)) and verify(d)[0]:
            status = "exists"
        elif storage.exists(d):
            log.warning("removing incomplete checkpoint %s before rewriting step %d", d, step)
            storage.rmtree(d)
        storage.makedirs(d)
    status = g.broadcast(status)
    if status == "exists":
        return d
    skeleton, tensors = flatten(shared)
    plan = assign(tensors, g.world)
    index = {k: shard_name(r, g.world) for r, keys in enumerate(plan) for k in keys}
    records: Dict[str, Dict[str, Any]] = {}
    if plan[g.rank]:
        name = shard_name(g.rank, g.world)
        records[name] = _save_obj({k: tensors[k] for k in plan[g.rank]}, storage.join(d, name))
    if rank_state is not None:
        records[rng_name(g.rank)] = _save_obj(rank_state, storage.join(d, rng_name(g.rank)))
    if g.rank == 0:
        records[COMMON] = _save_obj({"skeleton": skeleton, "index": index}, storage.join(d, COMMON))
    gathered = g.all_gather(records)  # every rank has finished writing past this point
    if g.rank == 0:
        files: Dict[str, Dict[str, Any]] = {}
        for rec in gathered:
            files.update(rec)
        manifest = {
            **meta,
            "format": FORMAT,
            "step": int(step),
            "time": time.time(),
            "world_size": g.world,
            "parts": sorted(shared),
            "rng_files": rank_state is not None,
            "files": files,
        }
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        msha = storage.write_bytes(storage.join(d, MANIFEST), text)
        storage.write_bytes(storage.join(d, MARKER), json.dumps({"step": int(step), "manifest_sha256": msha}).encode())
        storage.write_bytes(storage.join(root, LATEST), f"{storage.basename(d)}\n".encode())
        prune(root, keep)
    g.barrier()
    return d


def save_checkpoint(root: str, step: int, parts: Dict[str, Any], meta: Dict[str, Any], keep: int = 2) -> str:
    """Single-writer form of :func:`save_parallel` (one process, no RNG file); returns the step location."""
    return save_parallel(root, step, parts, meta, None, keep, group=_SingleGroup())


class _SingleGroup(Group):
    def __init__(self):
        self.on, self.rank, self.world = False, 0, 1


# ----------------------------------------------------------------------------------------------------------------
# discovery and verification
def read_manifest(d: str) -> Dict[str, Any]:
    """The manifest of step directory ``d`` after checking the marker names its sha256. Raises CheckpointError."""
    try:
        marker = json.loads(storage.read_bytes(storage.join(d, MARKER)))
    except FileNotFoundError:
        if not storage.exists(d):
            raise CheckpointError(f"{d}: no such checkpoint directory") from None
        raise CheckpointError(f"{d}: no commit marker (the write was interrupted)") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{d}: commit marker unreadable: {e}") from None
    try:
        raw = storage.read_bytes(storage.join(d, MANIFEST))
    except FileNotFoundError:
        raise CheckpointError(f"{d}: marker present but no {MANIFEST}") from None
    if hashlib.sha256(raw).hexdigest() != marker.get("manifest_sha256"):
        raise CheckpointError(f"{d}: {MANIFEST} does not match the sha256 in {MARKER} (corrupt)")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{d}: {MANIFEST} unreadable: {e}") from None


def verify(d: str) -> Tuple[bool, str]:
    """(ok, reason): marker present and naming the manifest's hash, every listed file present with the manifest's
    size and sha256."""
    try:
        manifest = read_manifest(d)
    except CheckpointError as e:
        return False, str(e).split(": ", 1)[-1]
    for name, info in sorted(manifest.get("files", {}).items()):
        loc = storage.join(d, name)
        try:
            n = storage.size(loc)
        except FileNotFoundError:
            return False, f"missing file {name}"
        if n != info["bytes"]:
            return False, f"{name} has {n} bytes, manifest says {info['bytes']} (truncated?)"
        h = hashlib.sha256(storage.read_bytes(loc)).hexdigest()
        if h != info["sha256"]:
            return False, f"{name} sha256 mismatch (corrupt)"
    return True, "ok"


def list_steps(root: str) -> List[Tuple[int, str]]:
    """All step directories under ``root`` (committed or not), oldest first."""
    out = []
    for name in storage.listdir(root):
        m = STEP_RE.match(name)
        if m:
            out.append((int(m.group(1)), storage.join(root, name)))
    return sorted(out)


def find_latest_with_report(root: str) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """(newest valid step location or None, [(skipped location, reason), ...] for newer invalid ones)."""
    skipped: List[Tuple[str, str]] = []
    for _, d in reversed(list_steps(root)):
        ok, why = verify(d)
        if ok:
            return d, skipped
        skipped.append((d, why))
    return None, skipped


def find_latest(root: str) -> Optional[str]:
    """The newest valid step location, or None. Invalid newer ones are reported (warning) and skipped."""
    d, skipped = find_latest_with_report(root)
    for s, why in skipped:
        log.warning("skipping checkpoint %s: %s", s, why)
    return d


def prune(root: str, keep: int) -> None:
    """Delete all but the newest ``keep`` committed step directories, and uncommitted ones older than the newest
    committed one (leftovers of killed writes)."""
    steps = list_steps(root)
    committed = [(s, d) for s, d in steps if storage.exists(storage.join(d, MARKER))]
    if not committed:
        return
    newest = committed[-1][0]
    cutoff = committed[-keep][0] if len(committed) > keep else committed[0][0]
    for s, d in steps:
        is_committed = any(s == c for c, _ in committed)
        if (is_committed and s < cutoff) or (not is_committed and s < newest):
            storage.rmtree(d)


# ----------------------------------------------------------------------------------------------------------------
# load
def load_checkpoint(d: str, parts: Optional[Sequence[str]] = None,
                    verify_all: bool = True) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(parts, manifest)`` of a committed step directory.

    Args:
        d: step location.
        parts: part names to load (default: all); only the shards holding their tensors are read.
        verify_all: check every file of the step first (:func:`verify`); otherwise only the files read are
            checked against the manifest (size and sha256), as they are read.

    Raises:
        CheckpointError: the step does not verify, or a requested part is not in it.
    """
    if verify_all:
        ok, why = verify(d)
        if not ok:
            raise CheckpointError(f"{d}: {why}")
    manifest = read_manifest(d)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{d}: format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    files = manifest["files"]
    common = _load_obj(storage.join(d, COMMON), files[COMMON])
    skeleton, index = common["skeleton"], common["index"]
    names = list(parts) if parts is not None else sorted(skeleton)
    missing = [n for n in names if n not in skeleton]
    if missing:
        raise CheckpointError(f"{d}: no part(s) {missing}; it holds {sorted(skeleton)}")
    want = {k for n in names for k in _tensor_keys(skeleton[n])}
    tensors: Dict[str, torch.Tensor] = {}
    for shard in sorted({index[k] for k in want}):
        loaded = _load_obj(storage.join(d, shard), files.get(shard) or _missing(d, shard))
        tensors.update({k: v for k, v in loaded.items() if k in want})
    return {n: unflatten(skeleton[n], tensors) for n in names}, manifest


def _missing(d: str, name: str):
    raise CheckpointError(f"{d}: {name} is not listed in the manifest")


def load_rank_state(d: str, manifest: Dict[str, Any], rank: int, world: int) -> Tuple[Optional[Any], bool]:
    """(this rank's saved RNG state, exact) where exact means it is the state of the same rank at the same world
    size. At another world size, rank ``r`` takes saved rank ``r % saved_world`` (so rank 0 keeps rank 0's)."""
    if not manifest.get("rng_files"):
        return None, False
    saved = int(manifest["world_size"])
    src = rank if saved == world else rank % saved
    name = rng_name(src)
    return _load_obj(storage.join(d, name), manifest["files"][name]), saved == world


__all__ = [
    "CheckpointError", "Group", "MARKER", "MANIFEST", "COMMON", "FORMAT", "STEP_RE", "step_dir", "flatten",
    "unflatten", "assign", "save_parallel", "save_checkpoint", "read_manifest", "verify", "list_steps",
    "find_latest", "find_latest_with_report", "prune", "load_checkpoint", "load_rank_state",
]
