"""Checkpoints and fault tolerance in one process (issue 5): exact resume (twice), corrupt and partial steps,
SIGKILL during a write, stop signals, S3, run id / architecture / lock refusals, the watchdog on a hung collective.

The multi-process cases (other topologies, torchrun elastic, signals to one rank) are in test_checkpoint_dist.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from ckpt_helpers import ROOT, TINY, child_env, small_overrides, weights_of
from simflow.checkpoint import storage
from simflow.checkpoint.lock import RunLock, RunLockError, pid_start_time
from simflow.checkpoint.store import (
    MARKER,
    CheckpointError,
    assign,
    find_latest_with_report,
    flatten,
    list_steps,
    load_checkpoint,
    save_checkpoint,
    unflatten,
    verify,
)
from simflow.config import ConfigError, load_config
from simflow.train.signals import REQUEUE_EXIT_CODE, WATCHDOG_EXIT_CODE, RequeueExit, StepBoundary
from simflow.train.trainer import Trainer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from more, and CI's 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo_npz(tmp_path_factory):
    from simflow.data.demo import build_demo

    train, _, _ = build_demo(str(tmp_path_factory.mktemp("demo")), limit=2000)
    return train


def cfg_for(demo_npz, out, *extra):
    return load_config(TINY, small_overrides(demo_npz, str(out), *extra))


# ----------------------------------------------------------------------------------------------------------------
# format
def test_flatten_roundtrip_and_balanced_plan(tmp_path):
    state = {"a": {"w": torch.arange(12.0).view(3, 4)[:, 1], "n": 3, "t": (1.5, None, "x")},
             "opt": {0: {"exp_avg": torch.ones(5)}, 1: {"exp_avg": torch.zeros(7, dtype=torch.float64)}},
             "l": [torch.tensor(2), "s"]}
    skel, tensors = flatten(state)
    assert set(tensors) == {"a/w", "opt/0/exp_avg", "opt/1/exp_avg", "l/0"}
    assert tensors["a/w"].untyped_storage().nbytes() == 3 * 4  # the view was copied, not its 12-element base
    back = unflatten(skel, tensors)
    assert torch.equal(back["a"]["w"], torch.tensor([1.0, 5.0, 9.0])) and back["a"]["t"] == (1.5, None, "x")
    assert back["opt"][1]["exp_avg"].dtype == torch.float64 and back["l"][1] == "s"
    sizes = {f"k{i}": torch.zeros(n) for i, n in enumerate([100, 60, 50, 40, 10, 5])}
    plan = assign(sizes, 3)
    assert plan == [["k0"], ["k1", "k4", "k5"], ["k2", "k3"]]  # 100 | 75 | 90 elements
    # a round trip through storage keeps values, dtypes and structure
    d = save_checkpoint(str(tmp_path / "c"), 7, {"x": state}, {"run_id": "r"})
    parts, manifest = load_checkpoint(d)
    assert manifest["step"] == 7 and manifest["world_size"] == 1
    assert torch.equal(parts["x"]["opt"][1]["exp_avg"], state["opt"][1]["exp_avg"])
    with pytest.raises(CheckpointError, match="no part"):
        load_checkpoint(d, parts=["generator"])


# ----------------------------------------------------------------------------------------------------------------
# exact resume
def test_exact_resume_twice(tmp_path, demo_npz):
    """20 steps straight == 10 + save/resume + 5 + save/resume + 5: every loss term and every final weight (raw,
    EMA, discriminator) bit-equal on CPU. Label dropout (p=0.5), posterior noise and the GAN are all on."""
    a = Trainer(cfg_for(demo_npz, tmp_path / "a", "train.steps=20", "checkpoint.every_steps=0"))
    a.fit()
    hist = []
    for steps in (10, 15, 20):
        t = Trainer(cfg_for(demo_npz, tmp_path / "b", f"train.steps={steps}", "checkpoint.every_steps=0"))
        t.fit()
        assert t.resume_report["loaded"] == (None if steps == 10 else
                                             os.path.join(tmp_path, "b", "checkpoints", f"step-{steps - 5:07d}"))
        hist += t.history
    assert [h["step"] for h in hist] == list(range(1, 21))
    assert sum("gan" in h for h in hist) == 19  # the GAN starts at step index 1
    for x, y in zip(a.history, hist):
        assert set(x) == set(y)
        for k in set(x) - {"img_per_s"}:
            assert x[k] == y[k], (x["step"], k, x[k], y[k])
    assert a.history[-1]["loss"] != a.history[0]["loss"]
    wa, wb = weights_of(a), weights_of(t)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------------------------------------
# partial and corrupt checkpoints
def test_truncated_and_corrupt_steps_are_skipped_with_reason(tmp_path, demo_npz, caplog):
    cfg = cfg_for(demo_npz, tmp_path, "train.steps=6", "checkpoint.every_steps=2", "checkpoint.keep=3")
    Trainer(cfg).fit()
    root = os.path.join(tmp_path, "checkpoints")
    assert [s for s, _ in list_steps(root)] == [2, 4, 6]
    s6, s4 = os.path.join(root, "step-0000006"), os.path.join(root, "step-0000004")
    shard = os.path.join(s6, "shard-00000-of-00001.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with open(os.path.join(s4, "rng-00000.pt"), "r+b") as f:  # same size, one byte flipped
        f.seek(40)
        b = f.read(1)
        f.seek(40)
        f.write(bytes([b[0] ^ 0xFF]))
    d, skipped = find_latest_with_report(root)
    assert d == os.path.join(root, "step-0000002")
    assert skipped[0][0] == s6 and "truncated" in skipped[0][1] and "shard-00000-of-00001.pt" in skipped[0][1]
    assert skipped[1][0] == s4 and "sha256 mismatch" in skipped[1][1] and "rng-00000.pt" in skipped[1][1]
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(s6)
    cfg.train.steps = 8
    t = Trainer(cfg)
    with caplog.at_level(logging.WARNING, logger="simflow"):
        assert t.maybe_resume()
    assert t.step == 2 and t.loader.consumed_samples == 2 * 4
    assert "skipping checkpoint" in caplog.text and "truncated" in caplog.text


def test_sigkill_during_checkpoint_write(tmp_path, demo_npz):
    """A real training process is frozen (SIGSTOP) the moment a new step directory appears; if its marker is not
    there yet the process is SIGKILLed mid-write. Resume then takes the previous committed step and says why."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    ov = small_overrides(demo_npz, str(out), "train.steps=400", "checkpoint.every_steps=1", "checkpoint.keep=2",
                         "model.flow.width=64")
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "simflow.train", "--config", TINY, *ov], env=child_env(),
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    seen, killed_in = set(), None
    deadline = time.time() + 240
    try:
        while killed_in is None and time.time() < deadline and proc.poll() is None:
            names = set(os.listdir(root)) if root.is_dir() else set()
            new = sorted(n for n in names - seen if n.startswith("step-"))
            if not new:
                time.sleep(0.0005)
                continue
            os.kill(proc.pid, signal.SIGSTOP)
            d = root / new[-1]
            committed_before = any((root / n / MARKER).exists() for n in names if n.startswith("step-") and n < d.name)
            if committed_before and not (d / MARKER).exists():
                os.kill(proc.pid, signal.SIGKILL)
                killed_in = d
            else:
                os.kill(proc.pid, signal.SIGCONT)
            seen |= set(new)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_in is not None, f"never caught a write in progress: {(tmp_path / 'train.log').read_text()[-2000:]}"
    assert not (killed_in / MARKER).exists() and not (killed_in / "manifest.json").exists()
    d, skipped = find_latest_with_report(str(root))
    killed_step = int(killed_in.name.split("-")[1])
    assert d is not None and int(os.path.basename(d).split("-")[1]) == killed_step - 1
    assert skipped == [(str(killed_in), "no commit marker (the write was interrupted)")]
    # the killed job's lock is stale (its pid is gone) and the next job takes it over and resumes
    cfg = load_config(TINY, ov + [f"train.steps={killed_step + 1}"])
    t = Trainer(cfg)
    t.fit()
    assert t.resume_report["loaded"] == d and t.step == killed_step + 1
    assert verify(str(root / f"step-{killed_step:07d}"))[0]  # the same step, now rewritten and committed


# ----------------------------------------------------------------------------------------------------------------
# signals (one process; the multi-rank vote is in test_checkpoint_dist.py)
def test_stop_signal_saves_and_requeues_then_resume_is_exact(tmp_path, demo_npz):
    ref = Trainer(cfg_for(demo_npz, tmp_path / "ref", "train.steps=8", "checkpoint.every_steps=0"))
    ref.fit()
    cfg = cfg_for(demo_npz, tmp_path / "run", "train.steps=8", "checkpoint.every_steps=0")
    t = Trainer(cfg)
    step_at_signal = []
    orig = t.train_step

    def train_step(it):  # deliver SIGUSR1 to this process in the middle of step 3 (from a thread, as a scheduler)
        m = orig(it)
        if t.step == 3:
            step_at_signal.append(t.step)
            threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGUSR1)).start()
            time.sleep(0.2)
        return m

    t.train_step = train_step
    with pytest.raises(RequeueExit) as e:
        t.fit()
    assert e.value.code == REQUEUE_EXIT_CODE == 75 and e.value.step == 3
    root = os.path.join(tmp_path, "run", "checkpoints")
    assert [s for s, _ in list_steps(root)] == [3]
    assert not os.path.exists(os.path.join(root, "run.lock"))  # released on the requeue exit
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    r = Trainer(cfg)
    r.fit()
    assert [h["loss"] for h in t.history + r.history] == [h["loss"] for h in ref.history]


def test_time_based_save_and_vote_single_process(tmp_path, demo_npz):
    b = StepBoundary(every_minutes=1e-4, signals=["SIGUSR1"])  # 6 ms
    time.sleep(0.01)
    assert b.vote() == (False, True)
    b.saved()
    assert b.vote() == (False, False)
    assert b.flag.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert b.flag.received == "SIGUSR1" and b.vote()[0]
    finally:
        b.flag.uninstall()
    cfg = cfg_for(demo_npz, tmp_path, "train.steps=3", "checkpoint.every_steps=0", "checkpoint.every_minutes=1e-6")
    Trainer(cfg).fit()
    assert [s for s, _ in list_steps(os.path.join(tmp_path, "checkpoints"))] == [2, 3]  # every step; keep=2


# ----------------------------------------------------------------------------------------------------------------
# S3
@pytest.mark.s3
def test_save_and_resume_on_s3(tmp_path, demo_npz, s3_bucket):
    url = f"s3://{s3_bucket}/runs/a"
    ref = Trainer(cfg_for(demo_npz, tmp_path / "ref", "train.steps=6", "checkpoint.every_steps=0"))
    ref.fit()
    cfg = cfg_for(demo_npz, tmp_path / "s3run", "train.steps=4", "checkpoint.every_steps=2", f"checkpoint.dir={url}")
    a = Trainer(cfg)
    a.fit()
    names = storage.listdir(url)
    assert {"step-0000002", "step-0000004", "run.json", "latest"} <= set(names) and "run.lock" not in names
    assert verify(f"{url}/step-0000004")[0]
    cfg.train.steps = 6
    b = Trainer(cfg)
    b.fit()
    assert b.resume_report["loaded"] == f"{url}/step-0000004"
    assert [h["loss"] for h in a.history + b.history] == [h["loss"] for h in ref.history]
    wa, wb = weights_of(ref), weights_of(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a truncated object on S3 is skipped like a local one
    shard = f"{url}/step-0000006/shard-00000-of-00001.pt"
    storage.write_bytes(shard, storage.read_bytes(shard)[:100])
    d, skipped = find_latest_with_report(url)
    assert d == f"{url}/step-0000004" and "truncated" in skipped[0][1]


# ----------------------------------------------------------------------------------------------------------------
# refusals
def test_other_run_id_and_architecture_change_fail_clearly(tmp_path, demo_npz):
    Trainer(cfg_for(demo_npz, tmp_path / "a", "train.steps=2")).fit()
    with pytest.raises(CheckpointError, match=r"belongs to run 'a' but this job is run 'other'"):
        Trainer(cfg_for(demo_npz, tmp_path / "a", "train.steps=4", "train.run_id=other")).fit()
    # a step directory copied into another run's directory is refused by its manifest's run id
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-0000002", tmp_path / "b" / "checkpoints" / "step-0000002")
    with pytest.raises(CheckpointError, match=r"belongs to run 'a', but this job is run 'b'"):
        Trainer(cfg_for(demo_npz, tmp_path / "b", "train.steps=4")).fit()
    with pytest.raises(CheckpointError, match=r"changes the architecture \(model\.flow\.width: checkpoint 32, "
                                              r"config 64\)"):
        Trainer(cfg_for(demo_npz, tmp_path / "a", "train.steps=4", "model.flow.width=64")).fit()
    with pytest.raises(ConfigError, match="checkpoint.keep"):
        cfg_for(demo_npz, tmp_path, "checkpoint.keep=1")
    with pytest.raises(ConfigError, match="checkpoint.signals"):
        cfg_for(demo_npz, tmp_path, "checkpoint.signals=[SIGFOO]")


def test_run_lock_live_stale_and_same_job(tmp_path, demo_npz, monkeypatch):
    root = str(tmp_path / "run" / "checkpoints")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = RunLock(root, "run", heartbeat_s=0.2, stale_s=30, pid=holder.pid).acquire()
        rec = json.load(open(os.path.join(root, "run.lock")))
        assert rec["pid"] == holder.pid and rec["pid_start"] == pid_start_time(holder.pid)
        time.sleep(0.5)
        assert json.load(open(os.path.join(root, "run.lock")))["heartbeat"] > rec["heartbeat"]  # heartbeat runs
        with pytest.raises(RunLockError, match=rf"in use by a live job \(host \S+, pid {holder.pid}"):
            Trainer(cfg_for(demo_npz, tmp_path / "run", "train.steps=1")).fit()
        live._stop.set()  # the holder "dies": its heartbeat stops and its process ends
        holder.kill()
        holder.wait()
        t = Trainer(cfg_for(demo_npz, tmp_path / "run", "train.steps=1"))
        t.fit()  # stale: pid gone on this host
        assert t.step == 1 and not os.path.exists(os.path.join(root, "run.lock"))
    finally:
        if holder.poll() is None:
            holder.kill()
    # another host: live while its heartbeat is fresh, stale when old; the same scheduler job may always take it
    other = RunLock(root, "run", heartbeat_s=0.1, stale_s=0.6, host="node-b", pid=4242).acquire()
    other._stop.set()  # no further heartbeats
    with pytest.raises(RunLockError, match="host node-b, pid 4242"):
        RunLock(root, "run", heartbeat_s=0.1, stale_s=0.6).acquire()
    time.sleep(0.8)
    mine = RunLock(root, "run", heartbeat_s=0.1, stale_s=0.6).acquire()  # heartbeat now 0.8 s old: stale
    assert json.load(open(os.path.join(root, "run.lock")))["pid"] == os.getpid()
    mine.release()
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    RunLock(root, "run", heartbeat_s=5, stale_s=60, host="node-c", pid=1).acquire()._stop.set()
    again = RunLock(root, "run", heartbeat_s=5, stale_s=60).acquire()  # requeue of slurm job 777
    assert json.load(open(os.path.join(root, "run.lock")))["job"] == "slurm::777"
    again.release()


# ----------------------------------------------------------------------------------------------------------------
# watchdog
WATCHDOG_CHILD = textwrap.dedent("""
    import os, sys, time, datetime, torch, torch.distributed as dist
    from simflow.train.signals import Watchdog
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    dist.barrier()
    if rank == 1:
        time.sleep(60)          # alive, but never joins the collective: rank 0 hangs in all_reduce
    Watchdog(2.0).start()
    t = torch.ones(1)
    dist.all_reduce(t)
    print("all_reduce returned", flush=True)
""")


def test_watchdog_forces_exit_when_a_collective_hangs(tmp_path):
    from simflow.parallel.topology import free_port

    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", WATCHDOG_CHILD, str(r), port], env=child_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    try:
        t0 = time.time()
        out, err = procs[0].communicate(timeout=90)
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == WATCHDOG_EXIT_CODE == 70, err.decode()[-2000:]
    assert b"all_reduce returned" not in out
    text = err.decode()
    assert "watchdog: rank" in text and "no progress for" in text and "all_reduce" in text  # stack of the hang
    assert waited < 60
