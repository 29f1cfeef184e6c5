"""The trainer's checkpoint component (torchtitan's ``CheckpointManager`` role): owns the stateful parts (engines,
loader, trainer counters, per-rank RNG), saves them sharded, synchronously or in the background, commits, resumes.

One save (collective; format in :mod:`simflow.checkpoint.store`)::

    wait for the previous background save and commit it      # at most one save in flight
    rank 0 clears a stale partial directory of this step      # broadcast: every rank agrees on the directory
    stage: each engine's sharded_state() -> CPU copies of this rank's ZeRO-3 partitions only
    write rng-<rank>.pt (every rank), common.json (rank 0)
    finiteness check + dcp.save of the staged chunks  ...in a background thread when checkpoint.async_save
    finalize: every rank hashed its own files -> all-gather of records and flags -> rank 0 writes manifest.json,
              COMMITTED, latest, prunes; a non-finite written element anywhere (ZeRO-3 padding excluded) refuses
              the commit and deletes the directory (the trainer then stops: Trainer.check_refused_checkpoint)

The background write runs its DCP collectives on a process group of its own (gloo), and the main thread polls and
finalizes on another, so the two never interleave collectives on one group. :meth:`poll` (every step while a save
is pending) commits as soon as every rank's write finished; :meth:`wait` blocks (before the next save, before a
requeue exit, at the end of ``fit``). A kill at any moment leaves no marker, so resume takes the previous step.

Resume (:meth:`load_latest`): rank 0 lists the steps (marker, manifest hash, file sizes; no hashing), every rank loads
the newest one (each verifying the sha256 of exactly the files it reads, streamed) into fresh buffers; only if every
rank succeeded is the state applied, otherwise the step is reported invalid with the reason and the previous one is
tried.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from simflow import storage
from simflow.checkpoint.sharded import FlatShard
from simflow.checkpoint.store import (COMMON, CheckpointError, Group, _SingleGroup, commit, find_latest_with_report,
                                      prepare_step_dir, load_json, load_rank_state, read_manifest, rng_name,
                                      save_json, save_torch, step_dir, write_tensors, read_tensors)
from simflow.config import SimFlowConfig, from_dict, to_dict

log = logging.getLogger("simflow")


def _first_nonfinite(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """Key of the first tensor whose *written* elements hold NaN/Inf, or None. A float64 sum is an exact test for
    fp32/bf16/fp16 data (NaN and Inf propagate; finite values cannot overflow float64) and ~10x cheaper than
    ``isfinite().all()``. Of a :class:`~simflow.checkpoint.sharded.FlatShard` only the data range counts: its ZeRO-3
    padding tail is never written, and DeepSpeed allocates it with ``torch.empty`` (any bytes, NaN included)."""
    for k, t in tensors.items():
        if isinstance(t, FlatShard):
            t = t.data_range()
        if not t.is_floating_point() or not t.numel():
            continue
        if t.dtype == torch.float64:
            if not bool(torch.isfinite(t).all()):
                return k
        elif not math.isfinite(float(t.sum(dtype=torch.float64))):
            return k
    return None


def describe_refusal(refused: Dict[str, Any]) -> str:
    """``"rank 1: non-finite values in <key>; rank 0: write failed: <error>"`` for :attr:`Checkpointer.refused`."""
    return "; ".join([f"rank {r}: non-finite values in {b}" for r, b in refused["nonfinite"]] +
                     [f"rank {r}: write failed: {e}" for r, e in refused["errors"]])


class _Pending:
    """A save whose DCP write may still be running in a background thread."""

    def __init__(self, d: str, step: int, records: Dict[str, Dict[str, Any]], bad: Optional[str],
                 meta: Dict[str, Any]):
        self.d, self.step, self.records, self.bad, self.meta = d, step, records, bad, meta
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None
        self.t0 = time.perf_counter()

    def run(self, tensors: Dict[str, torch.Tensor], group: Group) -> None:
        try:
            self.bad = _first_nonfinite(tensors)  # refuses the commit (checked before the marker, at finalize)
            self.records.update(write_tensors(self.d, tensors, group))
        except BaseException as e:  # reported to every rank at finalize
            self.error = e
        finally:
            self.written_at = time.perf_counter()

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


class Checkpointer:
    """Saves and restores a run's state (see the module docstring).

    Args:
        root: checkpoint root (``checkpoint.dir``; a path or ``s3://bucket/prefix``).
        engines: ``{"generator": Engine, "discriminator": Engine}`` (the latter optional); each provides
            ``sharded_state()``, ``load_targets(meta)`` and ``apply_loaded(tensors, meta)``.
        loader: the data loader (``state_dict`` / ``load_state_dict`` of its consumed-samples position).
        rank, world_size: this process's place (default process group).
        keep: committed steps to keep (>= 2).
        async_save: write in a background thread (training continues; the commit follows when every rank finished).
        rng_get, rng_set: this rank's RNG state as weights_only-loadable containers, and its inverse.
    """

    def __init__(self, root: str, engines: Dict[str, Any], loader: Any, keep: int = 2, async_save: bool = False,
                 rng_get: Optional[Callable[[], Any]] = None, rng_set: Optional[Callable[[Any], None]] = None):
        self.root = root
        self.engines = {k: v for k, v in engines.items() if v is not None}
        self.loader = loader
        self.keep = keep
        self.async_save = async_save
        self.rng_get, self.rng_set = rng_get, rng_set
        on = dist.is_available() and dist.is_initialized()
        # two gloo groups: DCP collectives of a background write never interleave with the main thread's polls
        self.io = Group(dist.new_group(backend="gloo")) if on else _SingleGroup()
        self.ctl = Group(dist.new_group(backend="gloo")) if on else _SingleGroup()
        self.pending: Optional[_Pending] = None
        self.last_stats: Dict[str, Any] = {}
        # the newest save that was not committed, identical on every rank: {"step", "nonfinite": [(rank, key)],
        # "errors": [(rank, message)]}; None after a committed save
        self.refused: Optional[Dict[str, Any]] = None
        self.saves: List[Dict[str, Any]] = []  # per save: step, started/returned/written/committed (perf_counter s)

    # ------------------------------------------------------------------------------------------------------
    # save
    def save(self, step: int, trainer_state: Dict[str, Any], meta: Dict[str, Any], block: bool = False) -> str:
        """Collective: save step ``step`` (see the module docstring). With ``async_save`` and not ``block`` it
        returns once this rank's state is staged (CPU copies of its own shards) and the write started; otherwise once
        the step is committed. Returns the step location."""
        self.wait()
        t0 = time.perf_counter()
        d = prepare_step_dir(self.root, step, self.ctl)
        if d is None:
            return step_dir(self.root, step)
        tensors: Dict[str, torch.Tensor] = {}
        common: Dict[str, Any] = {"loader": self.loader.state_dict(), "trainer": dict(trainer_state)}
        for part, eng in self.engines.items():
            t, m = eng.sharded_state()
            tensors.update({f"{part}/{k}": v for k, v in t.items()})
            common[part] = m
        records: Dict[str, Dict[str, Any]] = {}
        if self.rng_get is not None:
            records[rng_name(self.ctl.rank)] = save_torch(self.rng_get(), storage.join(d, rng_name(self.ctl.rank)))
        if self.ctl.rank == 0:
            records[COMMON] = save_json({"parts": common}, storage.join(d, COMMON))
        full_meta = {**meta, "world_size": self.ctl.world, "parts": sorted(common),
                     "rng_files": self.rng_get is not None}
        p = _Pending(d, step, records, None, full_meta)
        staged = time.perf_counter() - t0
        rec = {"step": step, "started": t0, "pending": p}
        self.saves.append(rec)
        if self.async_save and not block:
            p.thread = threading.Thread(target=p.run, args=(tensors, self.io), name=f"ckpt-write-{step}", daemon=True)
            p.thread.start()
            self.pending = p
        else:
            p.run(tensors, self.io)
            self.pending = p
            self.wait()
        self.last_stats = {"step": step, "stall_s": time.perf_counter() - t0, "stage_s": staged,
                           "async": self.async_save and not block}
        rec["returned"] = time.perf_counter()
        return d

    def poll(self) -> bool:
        """Collective (call at every step boundary): commit the pending save if every rank's write finished.
        Returns True when nothing is pending afterwards."""
        if self.pending is None:
            return True
        if not self.ctl.all_true(self.pending.done()):
            return False
        self._finalize()
        return True

    def wait(self) -> None:
        """Collective: block until the pending save (if any) is written everywhere, then commit it."""
        if self.pending is None:
            return
        if self.pending.thread is not None:
            self.pending.thread.join()
        self.ctl.all_true(True)  # every rank's write has finished past this point
        self._finalize()

    def _finalize(self) -> None:
        p, self.pending = self.pending, None
        err = None if p.error is None else f"{type(p.error).__name__}: {p.error}"
        gathered = self.ctl.all_gather((p.records, p.bad, err))
        bad = [(r, b) for r, (_, b, _) in enumerate(gathered) if b]
        errs = [(r, e) for r, (_, _, e) in enumerate(gathered) if e]
        self.refused = {"step": p.step, "nonfinite": bad, "errors": errs} if bad or errs else None
        if self.ctl.rank == 0:
            if bad or errs:
                log.error("checkpoint of step %d NOT committed (%s); the previous committed step stays the newest",
                          p.step, describe_refusal(self.refused))
                storage.rmtree(p.d)
            else:
                commit(self.root, p.d, p.step, [g[0] for g in gathered], p.meta, self.keep)
                log.info("saved checkpoint %s (%.2f s since the save started)", p.d, time.perf_counter() - p.t0)
        self.ctl.barrier()
        self.last_stats["committed_after_s"] = time.perf_counter() - p.t0
        for rec in self.saves:
            if rec.get("pending") is p:
                rec.update(written=p.written_at, committed=time.perf_counter(), pending=None)

    # ------------------------------------------------------------------------------------------------------
    # load
    def load_latest(self, check: Callable[[Dict[str, Any], str], None]) -> Optional[Tuple[str, Dict[str, Any],
                                                                                         Dict[str, Any]]]:
        """Collective: load the newest valid checkpoint into the engines, the loader and this rank's RNG.

        Args:
            check: ``check(manifest, location)`` raises :class:`CheckpointError` to refuse a checkpoint outright
                (another run id, another architecture): that error propagates, it does not skip the step.

        Returns:
            None when there is no valid checkpoint, else ``(location, trainer_state, info)`` where ``info`` holds
            ``skipped`` ([(location, reason)] for newer invalid steps), ``manifest``, ``exact_rng``, ``read``
            (bytes and files this rank read).
        """
        invalid: List[str] = []
        skipped: List[Tuple[str, str]] = []
        while True:
            found, newer = find_latest_with_report(self.root, deep=False, exclude=invalid) if self.ctl.rank == 0 \
                else (None, [])
            found, newer = self.ctl.broadcast((found, newer))
            for d, why in newer:
                if why.startswith("format 'simflow-checkpoint/2'"):  # never silently start over past an old step
                    raise CheckpointError(f"{d}: {why}")
                if self.ctl.rank == 0:
                    log.warning("skipping checkpoint %s: %s", d, why)
            skipped += newer
            self.skipped = skipped
            if found is None:
                return None
            manifest = read_manifest(found)
            check(manifest, found)
            stats: Dict[str, int] = {}
            err, staged = None, None
            try:
                staged = self._read(found, manifest, stats)
            except CheckpointError as e:
                err = str(e)
            if self.ctl.all_true(err is None):
                break
            reasons = [e for e in self.ctl.all_gather(err) if e]
            why = reasons[0].split(": ", 1)[-1] if reasons else "unreadable"
            if self.ctl.rank == 0:
                log.warning("skipping checkpoint %s: %s", found, why)
            skipped.append((found, why))
            invalid.append(found)
        common, targets, rng, exact = staged
        for part, eng in self.engines.items():
            pre = f"{part}/"
            eng.apply_loaded({k[len(pre):]: v for k, v in targets.items() if k.startswith(pre)}, common[part])
        self.loader.load_state_dict(common["loader"])
        if rng is not None and self.rng_set is not None:
            self.rng_set(rng)
        self.last_stats = {"read": stats}
        self.refused = None  # the state in memory is the loaded one now
        return found, common["trainer"], {"skipped": skipped, "manifest": manifest, "exact_rng": exact,
                                         "read": stats}

    def _read(self, d: str, manifest: Dict[str, Any], stats: Dict[str, int]):
        files = manifest["files"]
        if COMMON not in files:
            raise CheckpointError(f"{d}: {COMMON} is not listed in the manifest")
        common = load_json(storage.join(d, COMMON), files[COMMON])["parts"]
        targets: Dict[str, torch.Tensor] = {}
        for part, eng in self.engines.items():
            if part not in common:
                raise CheckpointError(f"{d}: no {part!r} state in it (it holds {sorted(common)})")
            targets.update({f"{part}/{k}": v for k, v in eng.load_targets(common[part]).items()})
        read_tensors(d, targets, files, self.io, stats)
        rng, exact = load_rank_state(d, manifest, self.ctl.rank, self.ctl.world)
        return common, targets, rng, exact


def check_resumable(manifest: Dict[str, Any], run_id: str, cfg: SimFlowConfig, where: str) -> None:
    """Refuse to resume from a checkpoint of another run, or one whose ``model`` config differs (architecture
    change): the ``Checkpointer.load_latest`` check of the trainer.

    Raises:
        CheckpointError: naming the checkpoint, both run ids, or the differing ``model.*`` keys with both values.
    """
    if manifest.get("run_id") != run_id:
        raise CheckpointError(f"{where} belongs to run {manifest.get('run_id')!r}, but this job is run {run_id!r} "
                              f"(train.run_id); refusing to load another run's checkpoint")
    stored = to_dict(from_dict(manifest["config"]))["model"]
    now = to_dict(cfg)["model"]
    diffs: List[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}")
        elif a != b:
            diffs.append(f"{key}: checkpoint {a!r}, config {b!r}")

    walk(stored, now, "model")
    if diffs:
        raise CheckpointError(f"{where}: the config changes the architecture ({'; '.join(diffs)}); a run cannot "
                              f"resume into another model (start a new run directory instead)")


__all__ = ["Checkpointer", "check_resumable", "commit", "prepare_step_dir"]
