"""Pre-emption and hang handling for the training loop: stop flags, the step-boundary vote, the watchdog.

* **Signals** (:class:`StopFlag`): SIGTERM (scheduler pre-emption, ``scancel``, torchrun stopping its workers) and
  SIGUSR1 (Slurm ``--signal=USR1@<seconds>`` before the time limit) only *set a flag*; the handler does nothing
  else, so it cannot interrupt a collective or a file write half-way.
* **The vote** (:meth:`StepBoundary.vote`): at every step boundary each rank contributes ``[stop requested,
  periodic save due]`` and one ``all_reduce(MAX)`` combines them, so a signal that reached a single rank, or a
  timer that expired on one rank's clock, makes *every* rank save the same step. The flags are host values, so the
  vote runs over a CPU (gloo) process group (:func:`host_group`): it never waits for the CUDA stream. The trainer then saves and every
  rank exits with :data:`REQUEUE_EXIT_CODE` ("requeue me"), by raising :class:`RequeueExit`.
* **The watchdog** (:class:`Watchdog`): the loop calls :meth:`Watchdog.beat` at every step boundary and around
  checkpoint I/O; if no beat arrives for ``timeout_s`` (a collective waiting for a peer that hangs rather than dies),
  a daemon thread prints every thread's stack and ends the process with :data:`WATCHDOG_EXIT_CODE`
  (``os._exit``: a hung collective cannot be interrupted any other way). Under ``torchrun`` the agent then restarts
  the workers, which resume from the newest valid checkpoint.

Exit codes (``sysexits.h`` conventions):

======================= ====  ===========================================================================
``REQUEUE_EXIT_CODE``   75    EX_TEMPFAIL: state saved at a step boundary after SIGTERM/SIGUSR1; run again
``WATCHDOG_EXIT_CODE``  70    EX_SOFTWARE: no step finished for ``checkpoint.watchdog_s``; forced exit
``LOCKED_EXIT_CODE``    73    EX_CANTCREAT: the run directory's lock is held by another live job; refused
                              before any training (not requeued by ``slurm/train.sh``)
``CONFIG_EXIT_CODE``    2     bad config, layout or ``data.path``: named in the message, before any process group
``NONFINITE_EXIT_CODE`` 3     ``train.max_skipped_steps`` consecutive non-finite steps; not requeued (a
                              restart would replay the same data and diverge again): lower the LR or fix the data
======================= ====  ===========================================================================

Once a rank has committed its stop-step checkpoint, *any* later signal still ends it with 75
(:meth:`StopFlag.hold`).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

log = logging.getLogger("simflow")

REQUEUE_EXIT_CODE = 75
WATCHDOG_EXIT_CODE = 70
LOCKED_EXIT_CODE = 73
CONFIG_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 3


class RequeueExit(SystemExit):
    """Raised by the trainer after the stop-step checkpoint is committed; the process exits with
    :data:`REQUEUE_EXIT_CODE` through any launcher (``SystemExit`` is not caught as an error).

    Attributes:
        step: the step that was saved.
    """

    def __init__(self, step: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step


class NonFiniteExit(SystemExit):
    """Raised by the trainer on every rank alike when ``train.max_skipped_steps`` consecutive steps were skipped as
    non-finite, or when a save was refused because the state held NaN/Inf; the process exits with
    :data:`NONFINITE_EXIT_CODE` (nothing more is saved: the newest checkpoint holds the last good state).

    Attributes:
        step: the trainer step at which the run stopped; message: what was non-finite, and where.
    """

    def __init__(self, step: int, message: str):
        super().__init__(NONFINITE_EXIT_CODE)
        self.step = step
        self.message = message


_HOST_GROUP: Dict[int, object] = {}


def host_group():
    """The process group for host-side control flags: ``None`` (the default group) when it is gloo already, else one
    gloo group over all ranks, created on first use and cached per default group. Collective on first use: every
    rank must call it at the same point (the trainer does, at the first step boundary)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _HOST_GROUP:
        _HOST_GROUP.clear()  # a group of a destroyed default group is unusable
        _HOST_GROUP[key] = dist.new_group(backend="gloo")
    return _HOST_GROUP[key]


def _signal_number(name: str) -> int:
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"checkpoint.signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
    return int(sig)


_HOLD_AFTER_REQUEUE = False


def hold_handlers_after_requeue(on: bool = True) -> None:
    """Process-wide policy, set by the process entry point (:func:`simflow.launch.entry`): after a committed stop
    step, keep the flag-only handlers until the process ends (:meth:`StopFlag.hold`) instead of restoring the
    previous ones. Off by default, so an in-process caller (tests, a notebook) gets its handlers back."""
    global _HOLD_AFTER_REQUEUE
    _HOLD_AFTER_REQUEUE = bool(on)


def holding_after_requeue() -> bool:
    """Whether :func:`hold_handlers_after_requeue` is on."""
    return _HOLD_AFTER_REQUEUE


class StopFlag:
    """Installs handlers for ``signals`` that only record the signal (see the module docstring).

    Attributes:
        received: name of the last signal received, or None.
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1")):
        self.signals = [_signal_number(s) for s in signals]
        self.received: Optional[str] = None
        self._previous: Dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = signal.Signals(signum).name  # a flag only: no I/O, no locks, no collectives

    def install(self) -> bool:
        """Install the handlers (main thread only); False (with a warning) elsewhere."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("stop signals not handled: the trainer is not running in the main thread")
            return False
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return True

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def hold(self) -> None:
        """Keep the flag-only handlers installed until the process ends (instead of :meth:`uninstall`).

        Called once the stop-step checkpoint is committed: the process is on its way out with
        :data:`REQUEUE_EXIT_CODE`, and a later stop signal (``torchrun`` sends SIGTERM to the surviving workers as
        soon as one of them exits; ``srun`` relays signals to every task) must not turn that into death by signal
        (-15). The launcher's process entry point (:func:`simflow.launch.entry`) then leaves with ``os._exit(75)``,
        so no signal can land in interpreter finalization either, after Python restored the default handlers."""
        self._previous.clear()


class StepBoundary:
    """The per-step vote (see the module docstring): stop flag and periodic-save timer, combined across ranks.

    Args:
        every_minutes: wall-clock save period in minutes (0 disables the timer).
        signals: names of the stop signals.
        device: ignored (kept for callers of the old signature): the vote is a CPU tensor on :func:`host_group`.
    """

    def __init__(self, every_minutes: float = 0.0, signals: Sequence[str] = ("SIGTERM", "SIGUSR1"),
                 device: torch.device = torch.device("cpu")):
        self.flag = StopFlag(signals)
        self.every_s = 60.0 * float(every_minutes)
        self.device = device
        self._last_save = time.monotonic()

    def saved(self) -> None:
        """Restart the periodic-save timer (call after each checkpoint)."""
        self._last_save = time.monotonic()

    def vote(self) -> Tuple[bool, bool]:
        """``(stop, time_due)`` agreed by all ranks: each is True if it is True on *any* rank (all-reduce MAX over
        the gloo :func:`host_group`: CPU tensors, no CUDA stream sync). Collective when ``torch.distributed`` is
        initialised: every rank must call it at every step boundary."""
        due = self.every_s > 0 and time.monotonic() - self._last_save >= self.every_s
        local = [1.0 if self.flag.received else 0.0, 1.0 if due else 0.0]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor(local, dtype=torch.float32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
            local = t.tolist()  # a CPU tensor: a host read, not a device sync
        return local[0] > 0, local[1] > 0


class Watchdog:
    """Forces an exit when the loop stops making progress (see the module docstring).

    Args:
        timeout_s: seconds without :meth:`beat` before the forced exit (<= 0: never started).
        exit_code: process exit status (default :data:`WATCHDOG_EXIT_CODE`).
        on_expire: called (in the watchdog thread) just before the exit; for tests and extra diagnostics.
    """

    def __init__(self, timeout_s: float, exit_code: int = WATCHDOG_EXIT_CODE,
                 on_expire: Optional[Callable[[str, float], None]] = None):
        self.timeout_s = float(timeout_s)
        self.exit_code = exit_code
        self.on_expire = on_expire
        self._last = time.monotonic()
        self._what = "start"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self, what: str = "step") -> None:
        """Record progress; ``what`` names the phase that starts now (printed if it never ends)."""
        self._last = time.monotonic()
        self._what = what

    def start(self) -> "Watchdog":
        if self.timeout_s > 0 and self._thread is None:
            self.beat("start")
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="simflow-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        period = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(period):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                rank = os.environ.get("RANK", "0")
                msg = (f"watchdog: rank {rank} made no progress for {idle:.1f} s in phase {self._what!r} "
                       f"(checkpoint.watchdog_s={self.timeout_s:g}); a collective is probably hung. Stacks follow; "
                       f"exiting with status {self.exit_code}")
                print(msg, file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                if self.on_expire is not None:
                    self.on_expire(self._what, idle)
                sys.stderr.flush()
                os._exit(self.exit_code)

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["CONFIG_EXIT_CODE", "LOCKED_EXIT_CODE", "NONFINITE_EXIT_CODE", "REQUEUE_EXIT_CODE", "WATCHDOG_EXIT_CODE",
           "NonFiniteExit", "RequeueExit", "StopFlag", "StepBoundary", "Watchdog", "hold_handlers_after_requeue",
           "holding_after_requeue", "host_group"]
