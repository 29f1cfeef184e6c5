"""Where and how this process runs: the environment, the device, the autocast dtype, the code version.

Pure reads (nothing here starts a process group or touches a GPU's state): the launcher, the trainer, the sampler
and the evaluators all ask these functions, so each rule exists once.

* :func:`detect_dist_env`: rank, world size, local rank and rendezvous from the environment (torchrun, srun, or a
  single process); :class:`~simflow.parallel.topology.Topology` wraps it once the process groups exist.
* :func:`rendezvous_base_port`: the one rule for a Slurm job's rendezvous port (``slurm/train.sh`` probes upward
  from the same base).
* :func:`resolve_device`: the one device rule, for ``train.device``, ``eval.device`` and ``--device``.
* :func:`autocast_dtype`: bf16 on CUDA, fp32 on CPU (method §8).
* :func:`code_version`: the git commit the package runs from.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, NoReturn, Optional, Sequence

import torch

from simflow.config import ConfigError, SimFlowConfig

# The package's checkout (the directory above simflow/): code_version reads git here.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RDZV_PORT_BASE = 20000
RDZV_PORT_SPAN = 10000  # ports 20000-29999: below Linux's ephemeral range (32768-60999), so no client socket holds one


def rendezvous_base_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job without ``MASTER_PORT``: ``20000 + job_id mod 10000``.

    ``srun`` tasks (:func:`detect_dist_env`) use it as it is, so every task of a job agrees without talking;
    ``slurm/train.sh`` starts from it and takes the first free port upward (wrapping inside [20000, 30000)).
    """
    return RDZV_PORT_BASE + int(job_id) % RDZV_PORT_SPAN


@dataclass(frozen=True)
class DistEnv:
    """What the environment says about this process (before any process group exists).

    Attributes:
        launcher: ``"torchrun"``, ``"srun"`` or ``"single"``.
        rank / world_size: global rank and number of processes.
        local_rank / local_world_size: rank and process count on this node (selects the GPU).
        node_rank / num_nodes: this node's index and the node count (informational).
        master_addr / master_port: rendezvous address for ``init_process_group``.
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int


def _int(environ: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ConfigError(f"environment variable {key} is required but not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {key}={raw!r}: not an integer") from None


def expand_slurm_tasks_per_node(spec: str) -> List[int]:
    """Expand Slurm's compressed ``SLURM_TASKS_PER_NODE`` (e.g. ``"2(x3),1"``) to one count per node
    (``[2, 2, 2, 1]``)."""
    counts: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ConfigError(f"SLURM_TASKS_PER_NODE={spec!r}: cannot parse {part!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def first_slurm_host(nodelist: str) -> str:
    """First host name of a Slurm node list such as ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"`` (zero padding kept).

    Only the first entry is needed for the rendezvous address; the grammar handled is Slurm's ``prefix[ranges]``
    with comma-separated ranges and optional numeric suffix after the bracket.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ConfigError("SLURM_JOB_NODELIST is empty")
    # split on the first top-level comma
    depth = 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", nodelist)
    if not m:
        return nodelist
    prefix, ranges, suffix = m.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (for single-process or test rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def detect_dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read rank, world size and rendezvous from the environment (torchrun, srun, or a single process).

    Torchrun-style variables win when present (``torchrun`` inside an ``srun`` step). Pure: starts nothing and
    does not modify ``environ``.

    Raises:
        ConfigError: a variable is missing or malformed, or ranks are out of range.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        local_rank = _int(env, "LOCAL_RANK", 0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        de = DistEnv(
            launcher="torchrun",
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", rank // max(1, local_world)),
            num_nodes=max(1, world // max(1, local_world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
        )
    elif "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        rank = _int(env, "SLURM_PROCID")
        node_rank = _int(env, "SLURM_NODEID", 0)
        tpn = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        if tpn:
            per_node = expand_slurm_tasks_per_node(tpn)
            local_world = per_node[node_rank] if node_rank < len(per_node) else per_node[-1]
            num_nodes = len(per_node)
        else:
            local_world, num_nodes = world, 1
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else "127.0.0.1")
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:
            port = rendezvous_base_port(_int(env, "SLURM_JOB_ID", 0))
        de = DistEnv(
            launcher="srun",
            rank=rank,
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=local_world,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=addr,
            master_port=port,
        )
    else:
        de = DistEnv("single", 0, 1, 0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 0))
    if de.world_size < 1 or not 0 <= de.rank < de.world_size:
        raise ConfigError(f"{de.launcher}: rank {de.rank} is outside world size {de.world_size}")
    if not 0 <= de.local_rank < max(1, de.local_world_size):
        raise ConfigError(f"{de.launcher}: local rank {de.local_rank} is outside local world size {de.local_world_size}")
    return de


def resolve_device(want: str, local_rank: int = 0, key: str = "device") -> torch.device:
    """The device for a setting such as ``train.device`` / ``eval.device`` / ``--device`` (the one rule).

    * ``auto``: ``cuda:<local_rank mod GPU count>`` when CUDA is available, else ``cpu``;
    * ``cuda``: ``cuda:<local_rank mod GPU count>`` (one GPU per local rank, as torchrun and srun place ranks);
    * ``cuda:N``: GPU ``N`` as given; ``cpu``: the CPU.

    Does not call ``torch.cuda.set_device`` (the caller that owns the process does).

    Raises:
        ConfigError: CUDA asked for but ``torch.cuda.is_available()`` is False, ``N`` out of range, or a value that
            is none of the above (names ``key`` and the value).
    """
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(want)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}={want!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"{key}={want!r}: only auto, cpu, cuda and cuda:N are supported")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={want!r} but torch.cuda.is_available() is False (no GPU or a CPU-only torch); "
                          f"use {key}=cpu or auto")
    count = torch.cuda.device_count()
    if dev.index is None:
        return torch.device("cuda", local_rank % count)
    if dev.index >= count:
        raise ConfigError(f"{key}={want!r}: this host has {count} CUDA device(s)")
    return dev


def autocast_dtype(cfg: SimFlowConfig, device: torch.device) -> torch.dtype:
    """``train.precision``: ``bf16``, ``fp32``, or ``auto`` = bf16 autocast on CUDA and fp32 on CPU (method §8)."""
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def code_version(dirty_paths: Sequence[str] = ("simflow", "tools", "configs")) -> str:
    """The git commit the package runs from, with ``+dirty`` when tracked files under ``dirty_paths`` (relative to
    the checkout) differ from it; ``"unknown"`` outside a git checkout (an installed wheel) or without git."""
    try:
        head = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        if not head:
            return "unknown"
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no", "--",
                                *dirty_paths], capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def exit_now(code: int) -> NoReturn:
    """End the process with status ``code`` without interpreter finalization: run the ``atexit`` handlers (logging
    shutdown, wandb, ...), flush stdout/stderr, then ``os._exit(code)``.

    For every process that ran ``torch.distributed`` collectives. gloo's worker threads (``pt_gloo_runloop``) outlive
    ``destroy_process_group`` (they stop only when the last Python reference to the group goes, at finalization),
    and a thread that drops a finished work holding Python-owned tensors (e.g. an ``all_gather`` output list) takes
    the GIL to free them. Once finalization has begun that takes the thread down with ``pthread_exit`` through
    ``noexcept`` C++ frames: "terminate called without an active exception", SIGABRT, exit status -6 after a run
    that had finished (seen here under gdb: ``AsyncAllgatherWork::~AsyncAllgatherWork`` -> ``decref_pyobject`` ->
    ``take_gil`` -> ``PyThread_exit_thread``). Skipping finalization closes that window; files the code opened are
    closed by then (context managers), and nothing else is lost."""
    import atexit
    import sys

    try:
        atexit._run_exitfuncs()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


__all__ = [
    "DistEnv", "detect_dist_env", "rendezvous_base_port", "free_port", "first_slurm_host",
    "expand_slurm_tasks_per_node", "resolve_device", "autocast_dtype", "code_version", "exit_now",
]
