"""Issue 11 "Must show", multi-process on CPU/gloo with the real entry point (``torchrun ... -m simflow.launch`` /
``python -m simflow.launch``), tiny config at flow width 32:

* two elastic agents (``--nnodes=1:2``, c10d on 127.0.0.1): agent b (a "node") leaves mid-run and a new agent b
  rejoins later; the job finishes by itself; the global batches of all steps sum to the final ``consumed_samples``;
  with ``train.global_batch_size`` set every step's batch is the uninterrupted run's (same positions, same losses),
  under both sharded engines (DeepSpeed ZeRO-3 and FSDP2: the engine re-shards its checkpoint at every world size);
* two live torchrun jobs on one run directory with the same ``--rdzv-id`` and different endpoints: the second is
  refused within seconds naming the holder, the first finishes untouched;
* a stop signal to one rank, while every rank is also hit by SIGTERM during its shutdown (what torchrun does once
  one worker exits): every rank exits 75, 10 times out of 10;
* a nonexistent ``data.path`` under ``torchrun --nproc-per-node=2``: every worker exits 2 before any process group.

The tests of the launcher rather than the engine (global-batch accounting without ``train.global_batch_size``, the
stop signal) run under one engine, :data:`LAUNCHER_ENGINE`: FSDP2, whose workers start without importing DeepSpeed
(about half of a worker's start time on a loaded 2-core machine; this file starts ~30 workers).

Helpers (``_start_agents``' pattern, ``ckpt_helpers.kill_tree``) follow tests/test_checkpoint_dist.py; every agent runs with
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a fresh worker store per rendezvous round, pytorch/pytorch#135712).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ckpt_helpers import ROOT, TINY, child_env, kill_tree, launch_ranks, read_logs, small_overrides
from helpers import metrics_by_step
from simflow.checkpoint.store import MARKER, list_steps, load_checkpoint, read_manifest
from simflow.parallel.topology import free_port
from simflow.train.signals import LOCKED_EXIT_CODE, REQUEUE_EXIT_CODE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# Agent a hosts the c10d store (is_host=1) and the others are its clients (is_host=0), as in slurm/train.sh.
# Keep-alive 2 s x 5: a dead agent is dropped after ~10 s, but a live one whose heartbeat thread is slow on a loaded
# 2-core machine is not (with 1 s x 2, a late joiner declared the busy host agent dead and formed a world of its own).
RDZV_CONF = "--rdzv-conf=last_call_timeout=1,keep_alive_interval=2,keep_alive_max_attempt=5,is_host={}"

ENGINES = ["deepspeed", "fsdp2"]
LAUNCHER_ENGINE = "fsdp2"  # module docstring
# the global-batch test: accumulation 1 at world 2, 2 at world 1
FIXED_BATCH = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=14", "train.run_id=fixed"]


# A torchrun agent that imports torch first and joins only once its gate file exists: on a loaded 2-core machine
# the imports alone take longer than the run's world-size-1 phase, so the "node comes back" moment is the gate.
GATED = ("import os, sys, time\n"
         "import torch.distributed.run as run\n"
         "gate = sys.argv.pop(1)\n"
         "while not os.path.exists(gate):\n"
         "    time.sleep(0.05)\n"
         "sys.exit(run.main(sys.argv[1:]))\n")


def _agent(out: str, name: str, ov, port: int, rdzv_id: str, nnodes: str = "1:2", nproc: int = 1,
           max_restarts: int = 3, extra=(), gate: str = "") -> subprocess.Popen:
    """One torchrun agent of the job at 127.0.0.1:port; its log is ``out/agent_<name>.log``. With ``gate``, the
    agent waits (torch already imported) until that file exists before it joins the rendezvous."""
    os.makedirs(out, exist_ok=True)
    args = [f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
            "--monitor-interval=0.2", *extra, "-m", "simflow.launch", "--config", TINY, *ov]
    if gate:
        cmd = [sys.executable, "-c", GATED, gate, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    log = open(os.path.join(out, f"agent_{name}.log"), "a")
    return subprocess.Popen(cmd, env=child_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"), cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _committed(ckpt: str):
    return [s for s, d in list_steps(ckpt) if os.path.exists(os.path.join(d, MARKER))]


def _wait(pred, procs, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if procs and not all(p.poll() is None for p in procs):
            break
        time.sleep(0.1)
    assert pred(), f"timed out / a process ended while waiting for {what}"


def _world_of(ckpt: str, step: int) -> int:
    return read_manifest(os.path.join(ckpt, f"step-{step:07d}"))["topology"]["world_size"]


def _leave_and_rejoin(out: str, ov, steps: int):
    """Agents a and b; b's whole process tree is SIGKILLed after step 2 is committed (the node leaves); once a
    step was committed at world size 1, a fresh agent b joins (the node comes back). Returns (agent a's exit code,
    new agent b's exit code, logs)."""
    ckpt = os.path.join(out, "checkpoints")
    port = free_port()
    a = _agent(out, "a", ov, port, "elastic-c", extra=[RDZV_CONF.format(1)])
    time.sleep(1.0)  # a hosts the c10d store
    b = _agent(out, "b", ov, port, "elastic-c", extra=[RDZV_CONF.format(0)])
    gate = os.path.join(out, "rejoin")
    b2 = _agent(out, "b2", ov, port, "elastic-c", extra=[RDZV_CONF.format(0)], gate=gate)
    try:
        _wait(lambda: 2 in _committed(ckpt), [a, b], 400, "step 2")
        kill_tree(b.pid)
        b.wait()
        _wait(lambda: any(_world_of(ckpt, s) == 1 for s in _committed(ckpt)), [a], 400, "a step at world size 1")
        open(gate, "w").close()  # the node comes back
        left_at = max(_committed(ckpt))
        assert left_at < steps - 3, "the run got too far before the node came back; raise the step count"
        ca = a.wait(timeout=500)
        cb = b2.wait(timeout=120)
    finally:
        for p in (a, b, b2):
            if p is not None and p.poll() is None:
                kill_tree(p.pid)
                p.wait()
    text = "".join(open(os.path.join(out, f"agent_{n}.log"), errors="replace").read() for n in ("a", "b", "b2"))
    return ca, cb, text


def _global_batches(ckpt: str, steps: int):
    """Per committed step: (world size, global batch micro x accumulation x DP as that step's job ran it,
    consumed_samples after it)."""
    out = []
    for s in range(1, steps + 1):
        d = os.path.join(ckpt, f"step-{s:07d}")
        m = read_manifest(d)
        t = m["config"]["train"]
        g = t["micro_batch_size"] * t["grad_accumulation"] * m["topology"]["dp_size"]
        consumed = load_checkpoint(d, parts=["loader"])[0]["loader"]["consumed_samples"]
        out.append((m["topology"]["world_size"], g, consumed))
    return out


def test_elastic_leave_and_rejoin_without_global_batch_size(demo_npz, tmp_path):
    """The global batch follows the world size (4 per rank): 8 at world 2, 4 at world 1, 8 again after the rejoin.
    The rejoin resumes at a consumed_samples that is no multiple of 8 when the world-1 phase ran an odd number of
    steps: the loader deals on from that position. Every step is checkpointed, so the sum of the global batches
    of steps 1..N (from each step's own config and topology) must equal consumed_samples after step N. This is the
    launcher's and the loader's accounting, the same under either engine: one engine (:data:`LAUNCHER_ENGINE`);
    both engines' resume at another world size is the next test's."""
    steps = 16
    out = str(tmp_path / "free")
    ov = small_overrides(demo_npz, out, f"parallel.engine={LAUNCHER_ENGINE}", "train.micro_batch_size=4",
                         f"train.steps={steps}", "checkpoint.every_steps=1", "checkpoint.keep=100",
                         "train.run_id=free")
    ca, cb, text = _leave_and_rejoin(out, ov, steps)
    assert (ca, cb) == (0, 0), text[-8000:]
    assert f"done: step {steps}" in text
    ckpt = os.path.join(out, "checkpoints")
    rows = _global_batches(ckpt, steps)
    worlds = [w for w, _, _ in rows]
    assert 1 in worlds and worlds[0] == 2 and worlds[-1] == 2, worlds  # left, then came back
    assert all(g == 4 * w for w, g, _ in rows)
    assert [c for _, _, c in rows] == [sum(g for _, g, _ in rows[: i + 1]) for i in range(steps)]
    assert rows[-1][2] == sum(g for _, g, _ in rows)
    assert not os.path.exists(os.path.join(ckpt, "run.lock"))


@pytest.fixture(scope="module")
def fixed_batch_reference(demo_npz, tmp_path_factory):
    """Per-step metrics of the global-batch test's run without interruption, in one process (local engine,
    accumulation 2: the same global batches of 8 as 2 ranks x 4; the same global batch gives the same loss on any
    number of processes, README "Reproducibility"). Shared by both engines' elastic runs."""
    out = str(tmp_path_factory.mktemp("fixed_reference"))
    r = subprocess.run([sys.executable, "-m", "simflow.launch", "--config", TINY,
                        *small_overrides(demo_npz, out, "parallel.engine=local", *FIXED_BATCH)],
                       env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return metrics_by_step(out)


@pytest.mark.parametrize("engine", ENGINES)
def test_elastic_leave_and_rejoin_with_global_batch_size_keeps_the_data_order(engine, demo_npz, tmp_path,
                                                                               fixed_batch_reference):
    """train.global_batch_size=8 with micro-batch 4: accumulation 1 at world 2, 2 at world 1 (derived by the
    launcher at every restart, no bash). consumed_samples after step s is 8 s at every step, as in the
    uninterrupted run, and every step's losses equal that run's (same samples, same per-sample noise; the weights
    differ only by reduction order, within 1e-4 relative). The uninterrupted run is one process of the local engine
    (:func:`fixed_batch_reference`), so this also holds each sharded engine to the local engine's numbers."""
    steps = 14
    common = [f"parallel.engine={engine}", *FIXED_BATCH, "checkpoint.every_steps=1", "checkpoint.keep=100"]
    out = str(tmp_path / "elastic")
    ca, cb, text = _leave_and_rejoin(out, small_overrides(demo_npz, out, *common), steps)
    assert (ca, cb) == (0, 0), text[-8000:]
    rows = _global_batches(os.path.join(out, "checkpoints"), steps)
    assert 1 in [w for w, _, _ in rows]
    assert [(g, c) for _, g, c in rows] == [(8, 8 * s) for s in range(1, steps + 1)]
    ref, got = fixed_batch_reference, metrics_by_step(out)
    assert sorted(ref) == sorted(got) == list(range(1, steps + 1))
    for s in got:
        for key in ("loss", "nll", "rec"):
            a, b = ref[s][key], got[s][key]
            assert abs(a - b) <= 1e-4 * max(abs(a), abs(b), 0.1), (s, key, a, b)


def test_second_live_job_on_the_run_dir_is_refused_and_the_first_finishes(demo_npz, tmp_path):
    """Job 1 (torchrun, 2 workers) and job 2 (torchrun, 1 worker) use the same --rdzv-id on different endpoints
    and the same run directory. Job 2's worker exits 73 within seconds, before building its engines, naming job
    1's lock holder and both jobs' tokens (with --max-restarts=K torchrun would retry it K more times). Job 1 is
    untouched:
    it exits 0, every step was logged once and committed by it, its lock is gone at the end."""
    steps = 60
    out = str(tmp_path / "run")
    ov = small_overrides(demo_npz, out, "parallel.engine=deepspeed", "train.micro_batch_size=4",
                         f"train.steps={steps}", "checkpoint.every_steps=5", "checkpoint.keep=2")
    ckpt = os.path.join(out, "checkpoints")
    job1 = _agent(out, "job1", ov, free_port(), "simflow-run", nnodes="1", nproc=2, max_restarts=0)
    job2 = None
    try:
        _wait(lambda: os.path.exists(os.path.join(ckpt, "run.lock")) and os.path.exists(
            os.path.join(out, "metrics.jsonl")), [job1], 400, "job 1 training")
        holder = json.load(open(os.path.join(ckpt, "run.lock")))
        t0 = time.time()
        job2 = _agent(out, "job2", ov, free_port(), "simflow-run", nnodes="1", nproc=1, max_restarts=0)
        c2 = job2.wait(timeout=180)
        refused_in = time.time() - t0
        assert job1.poll() is None, "job 1 ended before job 2 was refused; raise train.steps"
        c1 = job1.wait(timeout=500)
    finally:
        for p in (job1, job2):
            if p is not None and p.poll() is None:
                kill_tree(p.pid)
                p.wait()
    t1 = open(os.path.join(out, "agent_job1.log"), errors="replace").read()
    t2 = open(os.path.join(out, "agent_job2.log"), errors="replace").read()
    assert c1 == 0 and f"done: step {steps}" in t1, t1[-6000:]
    assert c2 != 0, t2[-4000:]
    assert t2.count("run lock: ") == 1 and f"exitcode  : {LOCKED_EXIT_CODE}" in t2, t2[-4000:]
    assert (f"in use by a live job (host {holder['host']}, pid {holder['pid']}, run 'run', job "
            f"{', '.join(holder['jobs'])}") in t2
    assert "global batch" not in t2 and "resumed from" not in t2  # refused before the engines and any resume
    assert refused_in < 90, refused_in  # python + torch + deepspeed imports on a loaded 2-core machine
    recs = [json.loads(l)["step"] for l in open(os.path.join(out, "metrics.jsonl"))]
    assert recs == list(range(1, steps + 1))  # one writer, each step once
    assert _committed(ckpt)[-1] == steps and not os.path.exists(os.path.join(ckpt, "run.lock"))


def test_stop_signal_to_one_rank_exits_75_everywhere_10_of_10(demo_npz, tmp_path):
    """10 stop-and-resume rounds of one 2-rank job: each round signals one rank (SIGUSR1 / SIGTERM alternating,
    rank 0 / 1 alternating); as soon as any rank exits, the others get SIGTERM every 20 ms until they exit (what
    torchrun does to the surviving workers, only harder). Every rank exits 75 every time, each round resumes the
    previous round's stop step. What is under test is the launcher's signal path (the stop flag, the step-boundary
    vote, the exit code under torchrun's SIGTERMs; simflow/train/signals.py), the same code under either engine
    (both save through the one Checkpointer), so one engine is enough: :data:`LAUNCHER_ENGINE`, whose workers start
    fastest."""
    out = str(tmp_path / "run")
    ov = small_overrides(demo_npz, out, f"parallel.engine={LAUNCHER_ENGINE}", "train.micro_batch_size=2",
                         "train.steps=1000", "checkpoint.every_steps=0", "checkpoint.watchdog_s=120",
                         "train.log_every=1")
    ckpt = os.path.join(out, "checkpoints")
    results = []
    for rep in range(10):
        logs = os.path.join(out, f"logs{rep}")
        os.makedirs(logs)
        before = max(_committed(ckpt), default=0)
        procs = launch_ranks(2, ov, logs, free_port())
        try:
            _wait(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")) and
                  max(json.loads(l)["step"] for l in open(os.path.join(out, "metrics.jsonl"))) > before,
                  procs, 300, f"round {rep} training")
            os.kill(procs[rep % 2].pid, signal.SIGUSR1 if rep % 2 == 0 else signal.SIGTERM)
            deadline = time.time() + 240
            while any(p.poll() is None for p in procs) and time.time() < deadline:
                if any(p.poll() is not None for p in procs):
                    for p in procs:
                        if p.poll() is None:
                            try:
                                os.kill(p.pid, signal.SIGTERM)
                            except ProcessLookupError:
                                pass
                time.sleep(0.02)
            codes = [p.poll() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results.append(codes)
        assert codes == [REQUEUE_EXIT_CODE] * 2, f"round {rep}: {codes}\n{read_logs(logs)}"
        assert max(_committed(ckpt)) > before
        if rep:
            assert f"resumed from {os.path.join(ckpt, f'step-{before:07d}')} at step {before}" in read_logs(logs)
    assert results == [[75, 75]] * 10


def test_missing_data_path_under_torchrun_exits_2_before_any_process_group(tmp_path):
    """torchrun --nproc-per-node=2 with data.path pointing nowhere: both workers print the path and exit 2, without
    starting a process group (no topology table, no DeepSpeed), in seconds."""
    missing = str(tmp_path / "nowhere" / "demo.npz")
    out = str(tmp_path / "run")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=0",
                        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "simflow.launch",
                        "--config", TINY, "data.source=npz", f"data.path={missing}", f"train.out_dir={out}",
                        "parallel.engine=deepspeed"], env=child_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    text = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"config error: data.path={missing!r}: no such file (data.source=npz)" in text, text[-4000:]
    assert "exitcode  : 2" in text and "exitcode  : 1 " not in text, text[-4000:]  # torchrun's failure summary
    assert "world size" not in text and "ZeRO" not in text
    assert not os.path.exists(out)
    assert time.time() - t0 < 120
