"""Run identity and the run lock: one live job per checkpoint directory.

``run.json`` (in the checkpoint root) records the run id the first time a job starts there. Every later start,
restart or requeue must present the same id (``train.run_id``, or the default, the basename of ``train.out_dir``),
so a job pointed at another run's directory stops with a clear error instead of resuming someone else's weights.

``run.lock`` (same place) is held by global rank 0 of the live job, as JSON::

    {"run_id", "host", "pid", "pid_start", "job", "jobs", "acquired", "heartbeat"}

A background thread rewrites ``heartbeat`` (Unix seconds) every ``heartbeat_s``. **A lock held by a live process is
never taken over**, whatever rendezvous id, run id or command line the newcomer uses. A new job may take it only when

* the holder is provably dead: on this host its ``pid`` is gone or reused (its start time in ``/proc/<pid>/stat``
  differs from ``pid_start``); on another host its heartbeat is older than ``stale_s``; or the file is unreadable;
* or the newcomer is **the same job**, restarted: one of its *job tokens* is in the holder's ``jobs``. The tokens
  (:func:`job_tokens`) are things two separate jobs cannot share by accident:

  - ``slurm:<SLURM_CLUSTER_NAME>:<SLURM_JOB_ID>`` -- a Slurm job id is unique on its cluster and survives
    ``scontrol requeue``, so a requeued job takes its own lock back at once;
  - ``torchrun:<host>:<agent pid>:<agent start time>`` -- the torchrun agent that started this worker (the nearest
    ancestor process running ``torch.distributed.run``; pid *and* start time, so a reused pid does not match). An
    agent outlives its workers' restarts, so a restarted worker group (``--max-restarts``, a node leaving or
    joining) presents the same agent token. Rank 0 records the tokens of *all* ranks' agents (gathered over the
    process group, :func:`claim_run_dir`), so the restarted group matches as long as one agent survived, even when
    rank 0 now runs under another agent.

  ``--rdzv-id`` (``TORCHELASTIC_RUN_ID``) is deliberately *not* a token: two jobs started with the README's example
  id would otherwise take each other's live lock.

Otherwise :meth:`RunLock.acquire` waits up to ``wait_s`` for the lock to go stale, then raises
:class:`RunLockError` naming the holder (host, pid, run, job, heartbeat age); the launcher turns it into exit status
73 (``simflow.train.signals.LOCKED_EXIT_CODE``) before the engines are built. The lock is released (deleted) on every
orderly exit, including a requeue exit; a SIGKILL leaves it behind, stale by one of the rules above.

Locally the lock file is created with ``O_CREAT | O_EXCL`` (atomic); on S3 there is no exclusive create, so the
lock is written and read back (best effort: two jobs starting within the same second can both win).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from simflow import storage
from simflow.checkpoint.store import CheckpointError

log = logging.getLogger("simflow")

LOCK_NAME = "run.lock"
RUN_FILE = "run.json"


class RunLockError(CheckpointError):
    """Another live job holds the run directory's lock."""


class RendezvousClashError(CheckpointError):
    """The ranks of one world come from different scheduler jobs (two jobs' agents met in one rendezvous)."""


def job_key(environ=None) -> Optional[str]:
    """The scheduler's part of this process's job identity: ``slurm:<cluster>:<SLURM_JOB_ID>``, else None."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env.get('SLURM_CLUSTER_NAME', '')}:{env['SLURM_JOB_ID']}"
    return None


def _parent_pid(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def process_cmdline(pid: int) -> str:
    """The command line of process ``pid`` (arguments joined by spaces), or "" if it is gone or /proc is absent."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def torchrun_agent_pid(pid: Optional[int] = None) -> Optional[int]:
    """PID of the nearest ancestor of ``pid`` (default: this process) that runs the torchrun agent
    (``torch.distributed.run`` / ``torchrun`` in its command line), or None (not under torchrun, or no /proc)."""
    p = _parent_pid(pid or os.getpid())
    while p and p > 1:
        cmd = process_cmdline(p)
        if "torch.distributed.run" in cmd or "/torchrun " in cmd or cmd.startswith("torchrun "):
            return p
        p = _parent_pid(p)
    return None


def job_tokens(environ=None, host: Optional[str] = None) -> List[str]:
    """This process's job tokens (see the module docstring): the Slurm token and/or the torchrun agent token.
    Empty for a plain ``python`` process (then only a dead holder can be replaced)."""
    env = os.environ if environ is None else environ
    out = []
    slurm = job_key(env)
    if slurm:
        out.append(slurm)
    if env.get("TORCHELASTIC_RUN_ID") is not None:
        agent = torchrun_agent_pid()
        start = pid_start_time(agent) if agent else None
        if agent and start is not None:
            out.append(f"torchrun:{host or socket.gethostname()}:{agent}:{start}")
    return out


def pid_start_time(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None if there is
    no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces; fields after the closing parenthesis are space-separated
    return int(stat.rsplit(")", 1)[1].split()[19])


def ensure_run_id(root: str, run_id: str) -> str:
    """Record ``run_id`` in ``<root>/run.json`` on first use; afterwards check it. Returns the run id.

    Raises:
        CheckpointError: ``root`` belongs to another run id.
    """
    loc = storage.join(root, RUN_FILE)
    if storage.exists(loc):
        try:
            stored = json.loads(storage.read_bytes(loc))["run_id"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{loc}: unreadable run file ({e})") from None
        if stored != run_id:
            raise CheckpointError(
                f"{root} belongs to run {stored!r} but this job is run {run_id!r} (train.run_id); point "
                f"checkpoint.dir / train.out_dir at this run's own directory, or set train.run_id={stored}")
        return run_id
    storage.makedirs(root)
    storage.write_bytes(loc, json.dumps({"run_id": run_id, "created": time.time()}).encode())
    return run_id


class RunLock:
    """The run directory lock (see the module docstring).

    Args:
        root: checkpoint root (local path or ``s3://``).
        run_id: this job's run id (recorded in the lock).
        heartbeat_s: seconds between heartbeats.
        stale_s: a heartbeat older than this makes the lock stale.
        wait_s: how long :meth:`acquire` waits for a live lock to go stale before failing.
        host / pid: this holder's identity (defaults: this host and process).
        jobs: this job's tokens (default: :func:`job_tokens` of this process; :func:`claim_run_dir` passes those of
            every rank).
    """

    def __init__(self, root: str, run_id: str, heartbeat_s: float = 30.0, stale_s: float = 300.0,
                 wait_s: float = 0.0, host: Optional[str] = None, pid: Optional[int] = None,
                 jobs: Optional[Sequence[str]] = None):
        if heartbeat_s <= 0 or stale_s <= heartbeat_s:
            raise ValueError(f"run lock: need 0 < heartbeat_s ({heartbeat_s}) < stale_s ({stale_s})")
        self.root = root
        self.path = storage.join(root, LOCK_NAME)
        self.run_id = run_id
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.wait_s = wait_s
        self.host = host or socket.gethostname()
        self.pid = pid or os.getpid()
        self.jobs = sorted(set(job_tokens(host=self.host) if jobs is None else jobs))
        self.job = job_key()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._acquired_at = 0.0
        self.held = False

    # ------------------------------------------------------------------------------------------------------------
    def _record(self) -> Dict[str, Any]:
        return {"run_id": self.run_id, "host": self.host, "pid": self.pid, "pid_start": pid_start_time(self.pid),
                "job": self.job, "jobs": self.jobs, "acquired": self._acquired_at, "heartbeat": time.time()}

    def read(self) -> Optional[Dict[str, Any]]:
        """The current lock record, or None when there is no lock file (an unreadable one counts as stale)."""
        try:
            return json.loads(storage.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"host": "?", "pid": -1, "heartbeat": 0.0, "unreadable": True}

    def stale_reason(self, rec: Dict[str, Any]) -> Optional[str]:
        """Why the lock ``rec`` may be taken over, or None if it belongs to a live job."""
        if rec.get("unreadable"):
            return "unreadable lock file"
        theirs = rec.get("jobs") if isinstance(rec.get("jobs"), list) else []
        same = sorted(set(theirs) & set(self.jobs))
        if same:
            return f"same job ({same[0]}): a restart or requeue of the holder's own job"
        if rec.get("host") == self.host:
            pid = int(rec.get("pid", -1))
            if pid == self.pid:
                return "held by this process"
            start = pid_start_time(pid) if pid > 0 else None
            if start is None:
                return f"holder pid {pid} on {self.host} no longer exists"
            if rec.get("pid_start") is not None and start != rec["pid_start"]:
                return f"holder pid {pid} on {self.host} was reused by another process"
        age = time.time() - float(rec.get("heartbeat", 0.0))
        if age > self.stale_s:
            return f"heartbeat {age:.0f} s old (> checkpoint.lock_stale_s={self.stale_s:g})"
        return None

    def _create(self) -> bool:
        """Create the lock file if absent; True if this call created it."""
        data = json.dumps(self._record()).encode()
        fs, path = storage.split(self.path)
        if storage.is_local(self.path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        if storage.exists(self.path):
            return False
        storage.write_bytes(self.path, data)
        return (self.read() or {}).get("pid") == self.pid and (self.read() or {}).get("host") == self.host

    def acquire(self) -> "RunLock":
        """Take the lock (taking over a stale one, with a warning) and start the heartbeat thread.

        Raises:
            RunLockError: a live job holds it (after waiting ``wait_s``); the message names its host, pid and run.
        """
        deadline = time.monotonic() + self.wait_s
        self._acquired_at = time.time()
        while True:
            if self._create():
                break
            rec = self.read()
            if rec is None:
                continue  # released between our create and read: try again
            why = self.stale_reason(rec)
            if why is not None:
                log.warning("taking over the run lock %s from %s pid %s (run %s): %s", self.path, rec.get("host"),
                            rec.get("pid"), rec.get("run_id"), why)
                storage.write_bytes(self.path, json.dumps(self._record()).encode())
                break
            if time.monotonic() >= deadline:
                age = time.time() - float(rec.get("heartbeat", 0.0))
                raise RunLockError(
                    f"{self.path}: the run directory is in use by a live job (host {rec.get('host')}, pid "
                    f"{rec.get('pid')}, run {rec.get('run_id')!r}, job {', '.join(rec.get('jobs') or []) or '-'}, "
                    f"heartbeat {age:.0f} s ago); this job ({', '.join(self.jobs) or 'no job token'}) is not "
                    f"that job. Two jobs must not write one run directory; if that job is dead, its lock goes "
                    f"stale after checkpoint.lock_stale_s={self.stale_s:g} s (or delete the file)")
            time.sleep(min(self.heartbeat_s, 1.0))
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="simflow-run-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                rec = self.read()
                if rec is not None and (rec.get("host"), rec.get("pid")) != (self.host, self.pid):
                    log.error("run lock %s was taken over by %s pid %s; this job keeps running but no longer "
                              "holds it", self.path, rec.get("host"), rec.get("pid"))
                    return
                storage.write_bytes(self.path, json.dumps(self._record()).encode())
            except Exception as e:  # noqa: BLE001 - a heartbeat failure must not stop training
                log.warning("run lock heartbeat failed: %s", e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if this process still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if not self.held:
            return
        self.held = False
        rec = self.read()
        if rec is not None and (rec.get("host"), rec.get("pid")) == (self.host, self.pid):
            storage.remove(self.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunDirClaim:
    """What :func:`claim_run_dir` returns: the run lock held by this process (rank 0; None elsewhere or with
    ``checkpoint.lock=false``). Claims of the same directory in one process share one lock (reference-counted):
    the launcher claims before the engines are built and the trainer's run guard claims again."""

    def __init__(self, key: str, lock: Optional[RunLock]):
        self.key, self.lock, self._released = key, lock, False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        entry = _CLAIMS.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _CLAIMS[self.key]
            if entry[0] is not None:
                entry[0].release()


_CLAIMS: Dict[str, List[Any]] = {}  # checkpoint root -> [RunLock or None, reference count]


def run_dir_of(cfg) -> "tuple[str, str]":
    """``(checkpoint root, run id)`` of a config, as the trainer uses them: ``checkpoint.dir`` or
    ``<train.out_dir>/checkpoints``; ``train.run_id`` or the basename of ``train.out_dir``."""
    out = cfg.train.out_dir
    return cfg.checkpoint.dir or os.path.join(out, "checkpoints"), cfg.train.run_id or os.path.basename(
        os.path.normpath(out))


def claim_run_dir(root: str, run_id: str, ckpt_cfg, group=None) -> RunDirClaim:
    """Collective over the default process group (every rank calls it): check the run id and take the run lock.

    Every rank contributes its :func:`job_tokens`; rank 0 records the run id (:func:`ensure_run_id`) and acquires
    the lock with the union of the tokens (``checkpoint.lock_heartbeat_s`` / ``lock_stale_s`` / ``lock_wait_s``);
    the outcome is broadcast, so every rank raises the same error.

    Args:
        root: checkpoint root (``checkpoint.dir``, default ``<train.out_dir>/checkpoints``).
        run_id: this run's id (``train.run_id`` or the out_dir name).
        ckpt_cfg: the ``checkpoint`` config section.
        group: a :class:`simflow.checkpoint.store.Group` (default: the default process group, or one process).

    It also checks that all ranks belong to one Slurm job (when under Slurm): agents of two jobs that met in one
    rendezvous would otherwise train one job's run with the other's processes.

    Raises:
        RunLockError: another live job holds the lock (message names it).
        RendezvousClashError: ranks from different Slurm jobs (names each rank's host and job).
        CheckpointError: the directory belongs to another run id.
    """
    from simflow.checkpoint.store import Group

    group = group or Group()
    gathered = group.all_gather((job_key(), socket.gethostname(), job_tokens()))
    slurm_jobs = sorted({k for k, _, _ in gathered if k})
    if len(slurm_jobs) > 1:  # every rank sees the same list, so every rank raises the same error
        who = "; ".join(f"rank {r} on {h}: {k or 'no Slurm job'}" for r, (k, h, _) in enumerate(gathered))
        raise RendezvousClashError(
            f"the ranks of this world belong to different Slurm jobs ({who}): agents of two jobs met in one "
            f"rendezvous (same port and rendezvous id on one host?); refusing to train. Give each job its own "
            f"SIMFLOW_RDZV_PORT (or leave it unset) and rendezvous id")
    tokens = sorted({t for _, _, ts in gathered for t in ts})
    err = None
    if group.rank == 0:
        key = storage.join(root, LOCK_NAME)
        try:
            ensure_run_id(root, run_id)
            if key in _CLAIMS:
                _CLAIMS[key][1] += 1
            else:
                lock = None
                if ckpt_cfg.lock:
                    lock = RunLock(root, run_id, ckpt_cfg.lock_heartbeat_s, ckpt_cfg.lock_stale_s,
                                   ckpt_cfg.lock_wait_s, jobs=tokens).acquire()
                _CLAIMS[key] = [lock, 1]
        except CheckpointError as e:
            err = (isinstance(e, RunLockError), str(e))
    err = group.broadcast(err)
    if err is not None:
        raise (RunLockError if err[0] else CheckpointError)(err[1])
    if group.rank != 0:
        return RunDirClaim("", None)
    key = storage.join(root, LOCK_NAME)
    return RunDirClaim(key, _CLAIMS[key][0])


__all__ = ["RunLock", "RunLockError", "RendezvousClashError", "RunDirClaim", "claim_run_dir", "run_dir_of", "ensure_run_id", "job_key", "job_tokens",
           "torchrun_agent_pid", "pid_start_time", "process_cmdline", "LOCK_NAME", "RUN_FILE"]
