"""Run identity and the run lock: one live job per checkpoint directory.

``run.json`` (in the checkpoint root) records the run id the first time a job starts there. Every later start,
restart or requeue must present the same id (``train.run_id``, or the default, the basename of ``train.out_dir``),
so a job pointed at another run's directory stops with a clear error instead of resuming someone else's weights.

``run.lock`` (same place) is held by global rank 0 of the live job, as JSON::

    {"run_id", "host", "pid", "pid_start", "job", "acquired", "heartbeat"}

A background thread rewrites ``heartbeat`` (Unix seconds) every ``heartbeat_s``. A new job may take the lock when
it is *stale*, that is:

* it belongs to the same scheduler job (``job``: ``SLURM_JOB_ID``, else torchrun's ``--rdzv-id`` when it is not the
  default ``none``): an elastic restart or a Slurm requeue of this very job, whose previous workers are gone; or
* it was taken on this host by a process that no longer exists (``pid`` absent, or reused: its start time in
  ``/proc/<pid>/stat`` differs from ``pid_start``); or
* its heartbeat is older than ``stale_s`` (a holder on another host that died without releasing it).

Otherwise the lock is *live* and :meth:`RunLock.acquire` waits up to ``wait_s`` for it to go stale, then raises
:class:`RunLockError` naming the holder. The lock is released (deleted) on every orderly exit, including a requeue
exit; a SIGKILL leaves it behind, stale by one of the rules above.

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
from typing import Any, Dict, Optional

from simflow.checkpoint import storage
from simflow.checkpoint.store import CheckpointError

log = logging.getLogger("simflow")

LOCK_NAME = "run.lock"
RUN_FILE = "run.json"


class RunLockError(CheckpointError):
    """Another live job holds the run directory's lock."""


def job_key(environ=None) -> Optional[str]:
    """Identity of the scheduler job this process belongs to, stable across elastic restarts and requeues:
    ``slurm:<SLURM_JOB_ID>``, else ``torchrun:<TORCHELASTIC_RUN_ID>`` (unless it is torchrun's default ``none``),
    else None."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    rid = env.get("TORCHELASTIC_RUN_ID")
    if rid and rid != "none":
        return f"torchrun:{rid}"
    return None


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
    """

    def __init__(self, root: str, run_id: str, heartbeat_s: float = 30.0, stale_s: float = 300.0,
                 wait_s: float = 0.0, host: Optional[str] = None, pid: Optional[int] = None):
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
        self.job = job_key()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._acquired_at = 0.0
        self.held = False

    # ------------------------------------------------------------------------------------------------------------
    def _record(self) -> Dict[str, Any]:
        return {"run_id": self.run_id, "host": self.host, "pid": self.pid, "pid_start": pid_start_time(self.pid),
                "job": self.job, "acquired": self._acquired_at, "heartbeat": time.time()}

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
        if self.job is not None and rec.get("job") == self.job:
            return f"same scheduler job {self.job} (restart or requeue)"
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
                    f"{rec.get('pid')}, run {rec.get('run_id')!r}, heartbeat {age:.0f} s ago). Two jobs must not "
                    f"write one run directory; if that job is dead, its lock goes stale after "
                    f"checkpoint.lock_stale_s={self.stale_s:g} s (or delete the file)")
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


__all__ = ["RunLock", "RunLockError", "ensure_run_id", "job_key", "pid_start_time", "LOCK_NAME", "RUN_FILE"]
