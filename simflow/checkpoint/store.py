"""Checkpoint step directories: DCP-sharded state written by every rank, manifest + commit marker last, discovery.

Layout (local path or ``s3://bucket/prefix``, see :mod:`simflow.storage`), format ``simflow-checkpoint/3``::

    <root>/step-0000100/
        __0_0.distcp ...          torch.distributed.checkpoint (DCP) data: each rank writes only the chunks it owns
                                  (its ZeRO-3 partitions of weights, AdamW moments and EMA; :mod:`.sharded`)
        .metadata                 (DCP, rank 0) which chunk of which full tensor lies where
        rng-00000.pt ...          per-rank RNG states (torch CPU/CUDA, numpy, python), one per rank
        common.json               (rank 0) everything that is not a tensor: loader position, trainer counters,
                                  engine step counts and optimizer hyper-parameters
        manifest.json             (rank 0, after every rank finished) step, run id, config, code version, topology,
                                  and every file's size and sha256 (each rank hashes its own files as it finishes)
        COMMITTED                 (rank 0, last) ``{"step", "manifest_sha256"}``: only a directory whose marker
                                  exists, names its manifest's hash, and whose files all match the manifest is valid
    <root>/latest                 a cache of the newest committed step's name; discovery never trusts it

**Topology-free**: every tensor is stored as its full (TP=1) tensor, in chunks; DCP's load planner reads, for each
rank of the new (TP, DP) layout, only the bytes that overlap what that rank owns (or whole tensors in one process).

**Commit protocol** (:class:`simflow.checkpoint.manager.Checkpointer`): rank 0 clears a stale partial directory of
the same step -> every rank writes its DCP chunks and its RNG file, then hashes its own files (streamed) -> the file
records are gathered (nothing below happens before every rank finished, and none if any tensor is non-finite) ->
rank 0 writes ``manifest.json``, then ``COMMITTED``, then ``latest``, then prunes old steps. A writer killed at any
point leaves a directory without a valid marker, which discovery skips with the reason.

Loading never unpickles objects: DCP tensors and RNG files through ``torch.load(weights_only=True)``, the rest JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import time
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from simflow import storage

log = logging.getLogger("simflow")

STEP_RE = re.compile(r"^step-(\d{7,})$")
MARKER = "COMMITTED"
MANIFEST = "manifest.json"
COMMON = "common.json"
DCP_METADATA = ".metadata"
LATEST = "latest"
FORMAT = "simflow-checkpoint/3"
CONVERT_COMMAND = "python tools/convert_checkpoint.py {src} {dst}"
ENGINE_PARTS = ("generator", "discriminator")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or belongs to another run/architecture."""


def step_dir(root: str, step: int) -> str:
    """Location of step ``step`` under ``root`` (``step-NNNNNNN``, 7+ digits)."""
    return storage.join(root, f"step-{step:07d}")


def rng_name(rank: int) -> str:
    """File name of rank ``rank``'s RNG states."""
    return f"rng-{rank:05d}.pt"


def rank_file_prefix(rank: int) -> str:
    """Prefix of the DCP data files rank ``rank`` writes (``FileSystemWriter`` names them ``__<rank>_<n>.distcp``)."""
    return f"__{rank}_"


# ----------------------------------------------------------------------------------------------------------------
# process group helper (works without torch.distributed)
class Group:
    """Rank, world size and the collectives the checkpoint code needs, over ``pg`` (default: the default process
    group), or a trivial group of one when ``torch.distributed`` is not initialised."""

    def __init__(self, pg: Optional[Any] = None):
        self.on = dist.is_available() and dist.is_initialized()
        self.pg = pg
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier(group=self.pg)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (picklable objects only)."""
        if not self.on:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.pg)
        return box[0]

    def all_gather(self, obj: Any) -> List[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.on:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is true on every rank (one small all-reduce)."""
        if not self.on:
            return bool(flag)
        t = torch.tensor([0 if flag else 1], dtype=torch.int32)
        dist.all_reduce(t, group=self.pg)
        return int(t.item()) == 0


class _SingleGroup(Group):
    def __init__(self):
        self.on, self.pg, self.rank, self.world = False, None, 0, 1


# ----------------------------------------------------------------------------------------------------------------
# files: streamed hashing, JSON and RNG files
def hash_file(location: str) -> Dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file (a manifest record), the hash streamed (:func:`simflow.storage.sha256_file`)."""
    return {"bytes": storage.size(location), "sha256": storage.sha256_file(location)}


def check_file(location: str, expect: Dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless the file has the manifest record's size and sha256 (streamed)."""
    name = storage.basename(location)
    try:
        got = hash_file(location)
    except FileNotFoundError:
        raise CheckpointError(f"{location}: missing file {name}") from None
    if got["bytes"] != expect["bytes"]:
        raise CheckpointError(f"{location}: {name} has {got['bytes']} bytes, manifest says {expect['bytes']} "
                              f"(truncated?)")
    if got["sha256"] != expect["sha256"]:
        raise CheckpointError(f"{location}: {name} sha256 mismatch (corrupt)")


def save_torch(obj: Any, location: str) -> Dict[str, Any]:
    """``torch.save`` atomically; returns the file record (sha256 computed while writing)."""
    with storage.open_atomic(location) as w:
        torch.save(obj, w)
    return {"bytes": w.bytes, "sha256": w.sha256.hexdigest()}


def save_json(obj: Any, location: str) -> Dict[str, Any]:
    """JSON file written atomically; returns its file record."""
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    return {"bytes": len(data), "sha256": storage.write_bytes(location, data)}


def load_torch(location: str, expect: Optional[Dict[str, Any]] = None) -> Any:
    """``torch.load(weights_only=True)`` of a small file, checked against its manifest record ``expect``.

    Raises:
        CheckpointError: size/sha256 differ, or the file cannot be loaded safely (names the file and the reason).
    """
    data = storage.read_bytes(location)
    if expect is not None:
        if len(data) != expect["bytes"]:
            raise CheckpointError(f"{location}: {len(data)} bytes, manifest says {expect['bytes']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != expect["sha256"]:
            raise CheckpointError(f"{location}: sha256 differs from the manifest (corrupt)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, objects that weights_only refuses
        raise CheckpointError(f"{location}: cannot be loaded safely (torch.load weights_only=True): "
                              f"{type(e).__name__}: {e}") from None


def load_json(location: str, expect: Optional[Dict[str, Any]] = None) -> Any:
    data = storage.read_bytes(location)
    if expect is not None and (len(data) != expect["bytes"] or hashlib.sha256(data).hexdigest() != expect["sha256"]):
        raise CheckpointError(f"{location}: differs from the manifest (size or sha256; corrupt or truncated)")
    try:
        return json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"{location}: unreadable JSON: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# DCP I/O
def _writer(d: str):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FileSystemWriter(d, sync_files=True) if storage.is_local(d) else FsspecWriter(d, sync_files=True)


def _verifying_reader(d: str, files: Dict[str, Dict[str, Any]], stats: Optional[Dict[str, int]] = None):
    """A DCP storage reader for ``d`` that checks, before reading them, the size and sha256 (streamed) of exactly
    the files this rank's load plan touches, and counts the bytes it reads in ``stats``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    base = FileSystemReader if storage.is_local(d) else FsspecReader

    class VerifyingReader(base):
        def read_metadata(self, *args, **kwargs):
            check_file(storage.join(d, DCP_METADATA), _record(d, files, DCP_METADATA))
            return super().read_metadata(*args, **kwargs)

        def read_data(self, plan, planner):
            names = sorted({self.storage_data[it.storage_index].relative_path for it in plan.items})
            for name in names:
                check_file(storage.join(d, name), _record(d, files, name))
            if stats is not None:
                stats["files"] = stats.get("files", 0) + len(names)
                stats["hashed_bytes"] = stats.get("hashed_bytes", 0) + sum(files[n]["bytes"] for n in names)
                stats["bytes"] = stats.get("bytes", 0) + sum(
                    self.storage_data[it.storage_index].length for it in plan.items)
            return super().read_data(plan, planner)

    return VerifyingReader(d)


def _record(d: str, files: Dict[str, Dict[str, Any]], name: str) -> Dict[str, Any]:
    if name not in files:
        raise CheckpointError(f"{d}: {name} is not listed in the manifest")
    return files[name]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process call (``no_dist``) and on every S3 stream it cannot fsync (s3fs objects
    become visible only when complete, which the commit protocol relies on instead)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="fsync not supported")
        yield


def write_tensors(d: str, tensors: Dict[str, torch.Tensor], group: Group) -> Dict[str, Dict[str, Any]]:
    """Collective over ``group``: ``dcp.save`` of this rank's tensors (plain tensors or
    :class:`~simflow.checkpoint.sharded.FlatShard` chunks) into ``d``; then each rank hashes its own files
    (streamed). Returns this rank's file records ``{name: {"bytes", "sha256"}}`` (rank 0's include ``.metadata``)."""
    import torch.distributed.checkpoint as dcp

    with _quiet():
        dcp.save(tensors, storage_writer=_writer(d), process_group=group.pg, no_dist=not group.on)
    return own_files(d, group.rank)


def own_files(d: str, rank: int) -> Dict[str, Dict[str, Any]]:
    """File records of the DCP files rank ``rank`` wrote into ``d`` (plus ``.metadata`` for rank 0)."""
    names = [n for n in storage.listdir(d) if n.startswith(rank_file_prefix(rank)) and n.endswith(".distcp")]
    if rank == 0:
        names.append(DCP_METADATA)
    return {n: hash_file(storage.join(d, n)) for n in names}


def read_tensors(d: str, targets: Dict[str, torch.Tensor], files: Dict[str, Dict[str, Any]], group: Group,
                 stats: Optional[Dict[str, int]] = None) -> None:
    """Collective over ``group``: fill ``targets`` (plain tensors or FlatShards, in place) from the DCP data in
    ``d``; each rank verifies the files it reads against the manifest records ``files`` first.

    Raises:
        CheckpointError: a file is missing, truncated or corrupt, or the data does not fit the targets.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():
            dcp.load(targets, storage_reader=_verifying_reader(d, files, stats), process_group=group.pg,
                     no_dist=not group.on)
    except CheckpointException as e:
        causes = [f"rank {r}: {type(x).__name__}: {x}" for r, x in getattr(e, "failures", {}).items()]
        raise CheckpointError(f"{d}: cannot be loaded ({'; '.join(causes) or e})") from None
    except (CheckpointError, RuntimeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{d}: cannot be loaded: {type(e).__name__}: {e}") from None


def tensor_index(d: str, files: Dict[str, Dict[str, Any]]) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """``{key: (full shape, dtype)}`` of every tensor in the DCP data of ``d`` (reads and verifies ``.metadata``)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = _verifying_reader(d, files).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


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


def verify(d: str, deep: bool = True) -> Tuple[bool, str]:
    """(ok, reason): marker present and naming the manifest's hash, the format readable by this code, every listed
    file present with the manifest's size and, when ``deep``, its sha256 (streamed). Resume uses ``deep=False``
    (sizes only, from listings) and lets each rank hash the files it reads (:func:`read_tensors`)."""
    try:
        manifest = read_manifest(d)
        check_format(d, manifest)
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
        if deep and storage.sha256_file(loc) != info["sha256"]:
            return False, f"{name} sha256 mismatch (corrupt)"
    return True, "ok"


def check_format(d: str, manifest: Dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless the manifest's format is :data:`FORMAT`; an old
    ``simflow-checkpoint/2`` step (full tensors, one pickle per rank) is refused with the command that converts it."""
    fmt = manifest.get("format")
    if fmt == FORMAT:
        return
    if fmt == "simflow-checkpoint/2":
        raise CheckpointError(
            f"{d}: format 'simflow-checkpoint/2' (full tensors in shard-*.pt files) is not read by this code, which "
            f"reads {FORMAT!r} (DCP-sharded); convert it with: "
            f"{CONVERT_COMMAND.format(src=d, dst=storage.join(storage.join(d, '..'), 'converted'))}")
    raise CheckpointError(f"{d}: format {fmt!r}, this code reads {FORMAT!r}")


def list_steps(root: str) -> List[Tuple[int, str]]:
    """All step directories under ``root`` (committed or not), oldest first."""
    out = []
    for name in storage.listdir(root):
        m = STEP_RE.match(name)
        if m:
            out.append((int(m.group(1)), storage.join(root, name)))
    return sorted(out)


def find_latest_with_report(root: str, deep: bool = True, exclude: Sequence[str] = ()
                            ) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """(newest valid step location or None, [(skipped location, reason), ...] for newer invalid ones).
    ``deep``: also check every file's sha256 (:func:`verify`); ``exclude``: locations already found invalid."""
    skipped: List[Tuple[str, str]] = []
    for _, d in reversed(list_steps(root)):
        if d in exclude:
            continue
        ok, why = verify(d, deep)
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
# full (unsharded) tensors in one process: tools, tests, offline sampling
def engine_keys(part: str, state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Flat DCP keys and the JSON meta of an engine state given as full tensors (the ``LocalEngine`` layout:
    ``{"module": {name: t}, "optimizer": {"state": {name: {"exp_avg", "exp_avg_sq", "step"}}}, "ema": {name: t},
    "steps": n}``). Keys: ``<part>/module/<name>``, ``<part>/optim/<name>/exp_avg|exp_avg_sq``, ``<part>/ema/<name>``."""
    tensors = {f"{part}/module/{k}": v for k, v in state.get("module", {}).items()}
    optim_step: Dict[str, int] = {}
    for name, st in (state.get("optimizer") or {}).get("state", {}).items():
        for k in ("exp_avg", "exp_avg_sq"):
            tensors[f"{part}/optim/{name}/{k}"] = st[k]
        optim_step[str(name)] = int(float(st.get("step", state.get("steps", 0))))
    tensors.update({f"{part}/ema/{k}": v for k, v in (state.get("ema") or {}).items()})
    meta = {"steps": int(state.get("steps", 0)), "optim_step": optim_step, "ema": sorted(state.get("ema") or {}),
            "param_group": (state.get("optimizer") or {}).get("param_group", {})}
    return tensors, meta


def prepare_step_dir(root: str, step: int, g: Group) -> Optional[str]:
    """Collective: the location of step ``step``, emptied of a stale partial write by rank 0; None (on every rank)
    when that step is already committed and verifies (an idempotent re-save after a resume)."""
    d = step_dir(root, step)
    status = None
    if g.rank == 0:
        status = "write"
        if storage.exists(storage.join(d, MARKER)) and verify(d, deep=False)[0]:
            status = "exists"
        elif storage.exists(d):
            log.warning("removing incomplete checkpoint %s before rewriting step %d", d, step)
            storage.rmtree(d)
        storage.makedirs(d)
    status = g.broadcast(status)
    return None if status == "exists" else d


def commit(root: str, d: str, step: int, records: List[Dict[str, Dict[str, Any]]], meta: Dict[str, Any],
           keep: int) -> str:
    """Rank 0, after every rank finished writing: ``manifest.json`` (all file records), then ``COMMITTED`` naming the
    manifest's sha256, then ``latest``; then retention (:func:`~simflow.checkpoint.store.prune`). Returns ``d``."""
    files: Dict[str, Dict[str, Any]] = {}
    for rec in records:
        files.update(rec)
    manifest = {**meta, "format": FORMAT, "step": int(step), "time": time.time(), "files": files}
    rec = save_json(manifest, storage.join(d, MANIFEST))
    storage.write_bytes(storage.join(d, MARKER),
                        f'{{"step": {int(step)}, "manifest_sha256": "{rec["sha256"]}"}}'.encode())
    storage.write_bytes(storage.join(root, LATEST), f"{storage.basename(d)}\n".encode())
    prune(root, keep)
    return d


def save_checkpoint(root: str, step: int, parts: Dict[str, Any], meta: Dict[str, Any], keep: int = 2) -> str:
    """Single-process save of full tensors (tools, tests, the converter): engine parts (``generator``,
    ``discriminator``) in the :func:`engine_keys` layout, other parts JSON-serialisable. Returns the step location.
    Training saves through :class:`simflow.checkpoint.manager.Checkpointer`."""
    g = _SingleGroup()
    d = prepare_step_dir(root, step, g)
    tensors: Dict[str, torch.Tensor] = {}
    common: Dict[str, Any] = {}
    for name, state in parts.items():
        if name in ENGINE_PARTS:
            t, m = engine_keys(name, state)
            tensors.update({k: v.detach().contiguous() for k, v in t.items()})
            common[name] = m
        else:
            common[name] = state
    files = write_tensors(d, tensors, g)
    files[COMMON] = save_json({"parts": common}, storage.join(d, COMMON))
    commit(root, d, step, [files], {**meta, "world_size": 1, "rng_files": False, "parts": sorted(parts)}, keep)
    return d


def load_checkpoint(d: str, parts: Optional[Sequence[str]] = None, verify_all: bool = True,
                    prefixes: Sequence[str] = ("module", "optim", "ema")) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(parts, manifest)`` of a committed step directory, with **full** tensors, in one process (no process group;
    every byte of the requested tensors is read, so use it for offline work, not for resuming a large run).

    Args:
        d: step location.
        parts: part names to load (default: all).
        verify_all: check every file of the step first (:func:`verify`); the files read are checked in any case.
        prefixes: which tensors of an engine part to read (``module``, ``optim``, ``ema``).

    Returns:
        engine parts as ``{"module": {name: t}, "optimizer": {"state": {name: {"exp_avg", "exp_avg_sq", "step"}},
        "param_group": {...}}, "ema": {name: t}, "steps": n}``; other parts as saved.

    Raises:
        CheckpointError: the step does not verify, has another format, or a requested part is not in it.
    """
    if verify_all:
        ok, why = verify(d)
        if not ok:
            raise CheckpointError(f"{d}: {why}")
    manifest = read_manifest(d)
    check_format(d, manifest)
    files = manifest["files"]
    common = load_json(storage.join(d, COMMON), _record(d, files, COMMON))["parts"]
    names = list(parts) if parts is not None else sorted(common)
    missing = [n for n in names if n not in common]
    if missing:
        raise CheckpointError(f"{d}: no part(s) {missing}; it holds {sorted(common)}")
    index = tensor_index(d, files)
    want = {k: v for k, v in index.items() if k.split("/", 1)[0] in names and k.split("/")[1] in prefixes}
    targets = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in want.items()}
    if targets:
        read_tensors(d, targets, files, _SingleGroup())
    out: Dict[str, Any] = {}
    for n in names:
        if n not in ENGINE_PARTS:
            out[n] = common[n]
            continue
        m = common[n]
        st: Dict[str, Any] = {"module": {}, "optimizer": {"state": {}, "param_group": m.get("param_group", {})},
                              "ema": {}, "steps": m["steps"]}
        for k, t in targets.items():
            pn, kind, rest = k.split("/", 2)
            if pn != n:
                continue
            if kind == "optim":
                pname, moment = rest.rsplit("/", 1)
                st["optimizer"]["state"].setdefault(pname, {"step": torch.tensor(float(m["optim_step"][pname]))})
                st["optimizer"]["state"][pname][moment] = t
            else:
                st[kind][rest] = t
        out[n] = st
    return out, manifest


def load_rank_state(d: str, manifest: Dict[str, Any], rank: int, world: int) -> Tuple[Optional[Any], bool]:
    """(this rank's saved RNG state, exact) where exact means it is the state of the same rank at the same world
    size. At another world size, rank ``r`` takes saved rank ``r % saved_world`` (so rank 0 keeps rank 0's)."""
    if not manifest.get("rng_files"):
        return None, False
    saved = int(manifest["world_size"])
    src = rank if saved == world else rank % saved
    name = rng_name(src)
    return load_torch(storage.join(d, name), _record(d, manifest["files"], name)), saved == world


__all__ = [
    "CheckpointError", "Group", "MARKER", "MANIFEST", "COMMON", "FORMAT", "STEP_RE", "step_dir", "rng_name",
    "hash_file", "check_file", "save_torch", "save_json", "load_torch", "load_json", "write_tensors", "read_tensors",
    "own_files", "tensor_index", "read_manifest", "verify", "check_format", "list_steps", "find_latest",
    "find_latest_with_report", "prune", "engine_keys", "save_checkpoint", "load_checkpoint", "load_rank_state",
]
