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
from simflow import storage
from simflow.checkpoint.lock import RunLock, RunLockError, pid_start_time
from simflow.checkpoint.sharded import FlatShard, flat_range_boxes, zero3_range
from simflow.checkpoint.store import (
    MARKER,
    CheckpointError,
    find_latest_with_report,
    list_steps,
    load_checkpoint,
    save_checkpoint,
    verify,
)
from simflow.config import ConfigError, load_config
from simflow.train.signals import REQUEUE_EXIT_CODE, WATCHDOG_EXIT_CODE, RequeueExit, StepBoundary
from simflow.train.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(demo_npz, out, *extra):
    return load_config(TINY, small_overrides(demo_npz, str(out), *extra))


# ----------------------------------------------------------------------------------------------------------------
# format
def test_flat_range_boxes_and_single_process_roundtrip(tmp_path):
    # a ZeRO-3 range of a row-major tensor is a few rectangles, in flat order (hand-worked: shape (3, 4), [2, 11))
    assert flat_range_boxes((3, 4), 2, 11) == [((0, 2), (1, 2)), ((1, 0), (1, 4)), ((2, 0), (1, 3))]
    assert flat_range_boxes((3, 4), 4, 12) == [((1, 0), (2, 4))] and flat_range_boxes((5,), 3, 3) == []
    full = torch.arange(2 * 3 * 5).view(2, 3, 5)
    for a, b in [(0, 30), (1, 29), (7, 8), (4, 21), (15, 30)]:
        boxes = flat_range_boxes(full.shape, a, b)
        got = torch.cat([full[tuple(slice(o, o + n) for o, n in zip(off, sz))].reshape(-1) for off, sz in boxes])
        assert torch.equal(got, torch.arange(a, b)) and len(boxes) <= 5
    assert [zero3_range(5, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]  # ceil(5/4) = 2 per rank
    # full tensors in one process: values, dtypes and structure survive; the manifest lists every file
    gen = {"module": {"w": torch.randn(3, 4), "n": torch.tensor(3)}, "ema": {"w": torch.ones(3, 4)},
           "optimizer": {"state": {"w": {"exp_avg": torch.ones(3, 4), "exp_avg_sq": torch.zeros(3, 4),
                                         "step": torch.tensor(7.0)}}}, "steps": 7}
    d = save_checkpoint(str(tmp_path / "c"), 7, {"generator": gen, "loader": {"consumed_samples": 28}}, {"run_id": "r"})
    parts, manifest = load_checkpoint(d)
    assert manifest["step"] == 7 and manifest["world_size"] == 1 and manifest["format"] == "simflow-checkpoint/3"
    assert {"common.json", ".metadata", "__0_0.distcp"} <= set(manifest["files"])
    g = parts["generator"]
    assert torch.equal(g["module"]["w"], gen["module"]["w"]) and g["module"]["n"].dtype == torch.int64
    assert torch.equal(g["optimizer"]["state"]["w"]["exp_avg"], torch.ones(3, 4)) and g["steps"] == 7
    assert parts["loader"] == {"consumed_samples": 28}
    with pytest.raises(CheckpointError, match="no part"):
        load_checkpoint(d, parts=["discriminator"])


def test_flat_shard_box_is_one_dcp_chunk(tmp_path):
    """FlatShard.wrap_box (a DTensor's local shard, as the FSDP2 engine saves it): a whole-tensor box saved by DCP
    loads into another rank's box (rows 1-2, the TP half of the columns), an empty box has no chunk, and a box
    outside the tensor is refused."""
    import torch.distributed.checkpoint as dcp

    full = torch.arange(12, dtype=torch.float32).view(3, 4)
    dcp.save({"w": FlatShard.wrap_box(full.reshape(-1).clone(), (3, 4), (0, 0), (3, 4))},
             checkpoint_id=str(tmp_path / "c"), no_dist=True)
    part = torch.zeros(4)
    dcp.load({"w": FlatShard.wrap_box(part, (3, 4), (1, 2), (2, 2))}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    assert torch.equal(part.view(2, 2), full[1:3, 2:4])
    assert FlatShard.wrap_box(torch.zeros(0), (3, 4), (3, 0), (0, 4)).boxes == []
    with pytest.raises(ValueError, match="outside a tensor of shape"):
        FlatShard.wrap_box(torch.zeros(8), (3, 4), (2, 0), (2, 4))


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
    shard = os.path.join(s6, "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with open(os.path.join(s4, "rng-00000.pt"), "r+b") as f:  # same size, one byte flipped
        f.seek(40)
        b = f.read(1)
        f.seek(40)
        f.write(bytes([b[0] ^ 0xFF]))
    d, skipped = find_latest_with_report(root)
    assert d == os.path.join(root, "step-0000002")
    assert skipped[0][0] == s6 and "truncated" in skipped[0][1] and "__0_0.distcp" in skipped[0][1]
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
# asynchronous save
def test_async_save_equals_sync_and_training_continues_during_the_write(tmp_path, demo_npz):
    """``checkpoint.async_save``: every loss and final weight equals the synchronous run bit for bit, the same steps
    are committed with the same tensors, and each background write finished only after ``save`` had returned (the
    next training step was already running), while a synchronous save returns after its write and its commit."""
    runs = {}
    for mode in ("false", "true"):
        t = Trainer(cfg_for(demo_npz, tmp_path / mode, "train.steps=6", "checkpoint.every_steps=2",
                            "checkpoint.keep=3", f"checkpoint.async_save={mode}", "train.run_id=a"))
        t.fit()
        runs[mode] = t
    sync, asyn = runs["false"], runs["true"]
    assert [h["loss"] for h in sync.history] == [h["loss"] for h in asyn.history]
    ws, wa = weights_of(sync), weights_of(asyn)
    assert all(torch.equal(ws[k], wa[k]) for k in ws)
    for mode in runs:
        assert [s for s, _ in list_steps(os.path.join(tmp_path, mode, "checkpoints"))] == [2, 4, 6]
    a, _ = load_checkpoint(os.path.join(tmp_path, "false", "checkpoints", "step-0000004"))
    b, _ = load_checkpoint(os.path.join(tmp_path, "true", "checkpoints", "step-0000004"))
    for part in ("generator", "discriminator"):
        for kind in ("module", "ema"):
            assert all(torch.equal(a[part][kind][k], b[part][kind][k]) for k in a[part][kind])
    assert a["loader"] == b["loader"] and a["trainer"] == b["trainer"] == {"step": 4, "skipped_steps": 0}
    assert all(s["written"] <= s["committed"] <= s["returned"] for s in sync.checkpointer.saves)
    background = [s for s in asyn.checkpointer.saves if s["step"] < 6]  # the final save is waited for
    assert background and all(s["returned"] < s["written"] <= s["committed"] for s in background)


@pytest.mark.slow
def test_sigkill_during_a_background_write_resumes_from_the_previous_step(tmp_path, demo_npz):
    """A training process with ``checkpoint.async_save=true`` is SIGKILLed while a step directory holds its staged
    files (RNG file, common.json) but no marker: the background write is in flight. Resume takes the previous
    committed step and names the killed one as interrupted."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    ov = small_overrides(demo_npz, str(out), "train.steps=400", "checkpoint.every_steps=1", "checkpoint.keep=2",
                         "checkpoint.async_save=true")
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "simflow.train", "--config", TINY, *ov], env=child_env(),
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    killed_in = None
    deadline = time.time() + 240
    try:
        while killed_in is None and time.time() < deadline and proc.poll() is None:
            names = sorted(n for n in (os.listdir(root) if root.is_dir() else []) if n.startswith("step-"))
            committed = [n for n in names if (root / n / MARKER).exists()]
            cand = [n for n in names if n not in committed and committed and n > committed[-1]]
            if cand and (root / cand[-1] / "common.json").exists() and (root / cand[-1] / "rng-00000.pt").exists():
                os.kill(proc.pid, signal.SIGSTOP)
                if not (root / cand[-1] / MARKER).exists():
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_in = root / cand[-1]
                else:
                    os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_in is not None, f"never caught a write in progress: {(tmp_path / 'train.log').read_text()[-2000:]}"
    killed_step = int(killed_in.name.split("-")[1])
    d, skipped = find_latest_with_report(str(root))
    assert d is not None and int(os.path.basename(d).split("-")[1]) == killed_step - 1
    assert skipped == [(str(killed_in), "no commit marker (the write was interrupted)")]
    t = Trainer(load_config(TINY, ov + [f"train.steps={killed_step + 1}"]))
    t.fit()
    assert t.resume_report["loaded"] == d and t.step == killed_step + 1


# ----------------------------------------------------------------------------------------------------------------
# non-finite state and the export
def test_non_finite_state_is_never_committed_or_exported(tmp_path, demo_npz):
    """The export is streamed tensor by tensor and reads back (``safetensors``) as the full EMA state; a
    NaN in the EMA refuses both the checkpoint commit (the step directory is removed, the newest committed step is
    the finite one and survives retention) and the export (no file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from simflow.checkpoint.export import NonFiniteExportError

    t = Trainer(cfg_for(demo_npz, tmp_path, "train.steps=2", "checkpoint.every_steps=1", "checkpoint.keep=2"))
    t.fit()
    streamed = t.export(str(tmp_path / "streamed.safetensors"))
    full, got = t.gen.full_state_dict(ema=True), load_file(streamed)
    assert set(full) == set(got) and all(torch.equal(full[k], got[k]) for k in full)
    assert any(not torch.equal(t.gen.ema[k], t.model.state_dict()[k]) for k in t.gen.ema)  # EMA != raw: a real check
    with safe_open(streamed, framework="pt") as f:
        assert f.metadata() == {"run_id": t.run_id, "step": "2"}
    root = os.path.join(tmp_path, "checkpoints")
    name = sorted(t.gen.ema)[0]
    t.gen.ema[name].view(-1)[0] = float("nan")
    for step in (3, 4):  # two refused saves: with keep=2, retention would otherwise have dropped step 1 and 2
        t.step = step
        t.save(block=True)
    assert [s for s, _ in list_steps(root)] == [1, 2] and verify(os.path.join(root, "step-0000002"))[0]
    with pytest.raises(NonFiniteExportError, match=rf"{name} holds non-finite values"):
        t.export(str(tmp_path / "nan.safetensors"))
    assert not os.path.exists(tmp_path / "nan.safetensors")


@pytest.mark.parametrize("async_save", [True, False])
def test_a_save_refused_for_non_finite_state_stops_the_run_with_status_3(tmp_path, demo_npz, monkeypatch, async_save):
    """NaN reaches the EMA after step 3 (the step guard only sees losses and gradients): the save of step 4 is
    refused, and since no later save could commit, fit() stops with NonFiniteExit (status 3) once the save is
    finalized (step 4 when synchronous; in the background at the next step's poll, or at the latest before the next
    save starts), naming step, rank and tensor; step 2 stays the newest, no other step directory is left."""
    from simflow.train.signals import NONFINITE_EXIT_CODE, NonFiniteExit

    t = Trainer(cfg_for(demo_npz, tmp_path, "train.steps=8", "checkpoint.every_steps=2",
                        f"checkpoint.async_save={str(async_save).lower()}"))
    name = sorted(t.gen.ema)[0]
    update = t.gen.ema_update

    def poisoned_update():
        update()
        if t.gen.steps == 3:
            t.gen.ema[name].view(-1)[0] = float("nan")

    monkeypatch.setattr(t.gen, "ema_update", poisoned_update)
    with pytest.raises(NonFiniteExit) as e:
        t.fit()
    assert e.value.code == NONFINITE_EXIT_CODE == 3 and t.step in ((5, 6) if async_save else (4,))
    assert f"checkpoint of step 4 refused (rank 0: non-finite values in generator/ema/{name})" in e.value.message
    root = os.path.join(tmp_path, "checkpoints")
    assert [s for s, _ in list_steps(root)] == [2] and verify(os.path.join(root, "step-0000002"))[0]


def test_a_failed_write_only_logs_and_the_final_step_is_retried(tmp_path, demo_npz, monkeypatch, caplog):
    """Storage errors are not the state's fault: the write of step 2 fails (logged, not committed, training goes
    on), the first write of the final step 4 fails too and is retried once at the end; the run ends normally with
    step 4 committed."""
    import simflow.checkpoint.manager as manager

    real, calls = manager.write_tensors, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(manager, "write_tensors", flaky)
    t = Trainer(cfg_for(demo_npz, tmp_path, "train.steps=4", "checkpoint.every_steps=2"))
    with caplog.at_level(logging.WARNING, logger="simflow"):
        t.fit()
    assert t.step == 4 and len(calls) == 3
    text = caplog.text
    assert "checkpoint of step 2 NOT committed (rank 0: write failed: OSError: disk on fire)" in text
    assert "retrying the save of the final step 4 (rank 0: write failed: OSError: disk on fire)" in text
    root = os.path.join(tmp_path, "checkpoints")
    assert [s for s, _ in list_steps(root)] == [4] and verify(os.path.join(root, "step-0000004"))[0]
    assert t.checkpointer.refused is None


def test_only_written_elements_count_as_non_finite():
    """A FlatShard's ZeRO-3 padding tail is never written (DeepSpeed allocates it uninitialised): NaN/Inf there does
    not refuse a commit, NaN/Inf in its data range (or in a plain tensor) does."""
    from simflow.checkpoint.manager import _first_nonfinite

    start, stop = zero3_range(5, 1, 2)  # DP rank 1 of 2 owns elements 3 and 4 of a 3-element partition
    flat = torch.tensor([1.0, 2.0, float("nan")])
    padded = {"ok": torch.ones(4), "w": FlatShard.wrap(flat, (5,), None, 0, 1, start, stop)}
    assert _first_nonfinite(padded) is None
    flat[0] = float("inf")
    assert _first_nonfinite(padded) == "w"
    assert _first_nonfinite({"plain": torch.tensor([0.0, float("nan")]).to(torch.bfloat16)}) == "plain"


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
    shard = f"{url}/step-0000006/__0_0.distcp"
    storage.write_bytes(shard, storage.read_bytes(shard)[:100])
    d, skipped = find_latest_with_report(url)
    assert d == f"{url}/step-0000004" and "truncated" in skipped[0][1]


@pytest.mark.s3
def test_sampling_from_an_s3_checkpoint_equals_the_local_copy(tmp_path, demo_npz, s3_bucket):
    """``python -m simflow.sample --weights s3://.../checkpoints`` (config from the manifest on S3) writes the same
    images as from the local checkpoint it was copied from; an exported file on S3 works too."""
    import numpy as np

    from simflow.sample import main as sample_main

    t = Trainer(cfg_for(demo_npz, tmp_path / "run", "train.steps=2", "checkpoint.every_steps=0"))
    t.fit()
    local_root = os.path.join(tmp_path, "run", "checkpoints")
    url = f"s3://{s3_bucket}/runs/run/checkpoints"
    step = "step-0000002"
    for name in os.listdir(os.path.join(local_root, step)):
        with open(os.path.join(local_root, step, name), "rb") as f:
            storage.write_bytes(f"{url}/{step}/{name}", f.read())
    storage.write_bytes(f"{url}/weights.safetensors", open(t.export(str(tmp_path / "w.safetensors")), "rb").read())
    args = ["--num-samples", "8", "--range-size", "4", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    images = {}
    for tag, weights in [("local", local_root), ("s3", url), ("s3-export", f"{url}/weights.safetensors")]:
        out = str(tmp_path / f"samples-{tag}")
        cfg = [] if tag != "s3-export" else ["--config", TINY, "model.flow.width=32", "model.flow.layers_per_block=[1,1,1,1]"]
        assert sample_main(["--weights", weights, "--out", out, *args, *cfg]) == 0
        images[tag] = np.load(os.path.join(out, "samples.npz"))["arr_0"]
    assert images["local"].shape[0] == 8 and images["local"].std() > 0
    assert np.array_equal(images["local"], images["s3"])
    assert np.array_equal(images["local"], images["s3-export"])  # the export holds the EMA flow, as use_ema does


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


# ----------------------------------------------------------------------------------------------------------------
# the previous format
def _write_v2_step(root: str, step: int, parts: dict, meta: dict) -> str:
    """A ``simflow-checkpoint/2`` step as the previous code wrote it: tensors replaced by placeholders in
    ``common.pt``, all tensors in one ``shard-00000-of-00001.pt``, manifest with sha256s, marker naming its hash."""
    import hashlib
    import io

    tensors = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().clone()
            return {"__tensor__": path}
        if isinstance(x, dict):
            return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, f"{path}/{i}") for i, v in enumerate(x))
        return x

    skeleton = walk(parts, "")
    d = os.path.join(root, f"step-{step:07d}")
    os.makedirs(d)
    files = {}
    for name, obj in [("shard-00000-of-00001.pt", tensors),
                      ("common.pt", {"skeleton": skeleton, "index": {k: "shard-00000-of-00001.pt" for k in tensors}})]:
        buf = io.BytesIO()
        torch.save(obj, buf)
        open(os.path.join(d, name), "wb").write(buf.getvalue())
        files[name] = {"bytes": len(buf.getvalue()), "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    text = json.dumps({**meta, "format": "simflow-checkpoint/2", "step": step, "world_size": 1, "rng_files": False,
                       "parts": sorted(parts), "files": files}).encode()
    open(os.path.join(d, "manifest.json"), "wb").write(text)
    open(os.path.join(d, MARKER), "w").write(json.dumps({"step": step, "manifest_sha256":
                                                          hashlib.sha256(text).hexdigest()}))
    return d


def test_old_format_is_refused_naming_the_converter_which_converts_it(tmp_path, demo_npz):
    """A run directory holding a ``simflow-checkpoint/2`` step is refused (never silently restarted) with the
    format and the converter command; the converted step resumes the run with the losses of an uninterrupted one."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from convert_checkpoint import main as convert_main

    ref = Trainer(cfg_for(demo_npz, tmp_path / "ref", "train.steps=4", "checkpoint.every_steps=0"))
    ref.fit()
    a = Trainer(cfg_for(demo_npz, tmp_path / "old", "train.steps=2", "checkpoint.every_steps=0",
                        "checkpoint.resume=false", "checkpoint.dir=" + str(tmp_path / "scratch")))
    a.fit()
    from simflow.config import to_dict

    parts = {"generator": a.gen.state_dict(), "discriminator": a.disc.state_dict(),
             "loader": a.loader.state_dict(), "trainer": {"step": 2}}
    old_root = str(tmp_path / "old" / "checkpoints")
    src = _write_v2_step(old_root, 2, parts, {"run_id": "old", "config": to_dict(a.cfg)})
    with pytest.raises(CheckpointError, match=r"format 'simflow-checkpoint/2'.*python tools/convert_checkpoint\.py"):
        Trainer(cfg_for(demo_npz, tmp_path / "old", "train.steps=4", "checkpoint.every_steps=0")).fit()
    new_root = str(tmp_path / "old" / "checkpoints-v3")
    assert convert_main([src, new_root]) == 0
    assert verify(os.path.join(new_root, "step-0000002"))[0]
    b = Trainer(cfg_for(demo_npz, tmp_path / "old", "train.steps=4", "checkpoint.every_steps=0",
                        f"checkpoint.dir={new_root}", "train.run_id=old"))
    b.fit()
    assert b.resume_report["loaded"] == os.path.join(new_root, "step-0000002")
    assert [h["loss"] for h in a.history + b.history] == [h["loss"] for h in ref.history]
    assert convert_main([os.path.join(new_root, "step-0000002"), str(tmp_path / "x")]) == 2  # not a v2 step


def _legacy_qkv_state(state: dict, head_dim: int) -> dict:
    """A generator engine state as the code before the fused QKV projection (aa244c8) saved it: every
    ``attn.qkv.{weight,bias}`` split back into ``attn.q/k/v`` (module, EMA, Adam moments) in registration order
    q.weight, q.bias, k.weight, ..., and the optimizer state re-indexed by that parameter order."""

    def split(t):  # inverse of simflow.models.flow.fuse_qkv
        heads = t.shape[0] // (3 * head_dim)
        return t.reshape(heads, 3, head_dim, *t.shape[1:]).transpose(0, 1).reshape(3, t.shape[0] // 3, *t.shape[1:])

    def expand(d):
        out = {}
        for k, v in d.items():
            if ".attn.qkv." not in k:
                out[k] = v
            elif k.endswith("weight"):
                base = k[: -len("qkv.weight")]
                w, b = split(v), split(d[base + "qkv.bias"])
                for i, x in enumerate("qkv"):
                    out[f"{base}{x}.weight"], out[f"{base}{x}.bias"] = w[i].clone(), b[i].clone()
        return out

    names = list(state["module"])  # parameters in registration order (the generator has no buffers)
    by_name = {names[i]: st for i, st in state["optimizer"]["state"].items()}
    legacy_opt = {}
    for n in names:
        if ".attn.qkv.weight" not in n and ".attn.qkv.bias" not in n:
            legacy_opt[n] = by_name[n]
        elif n.endswith("weight"):
            base = n[: -len("qkv.weight")]
            for i, x in enumerate("qkv"):
                for kind in ("weight", "bias"):
                    st = by_name[f"{base}qkv.{kind}"]
                    legacy_opt[f"{base}{x}.{kind}"] = {"step": st["step"], **{m: split(st[m])[i].clone()
                                                                             for m in ("exp_avg", "exp_avg_sq")}}
    group = {**state["optimizer"]["param_groups"][0], "params": list(range(len(legacy_opt)))}
    return {"module": expand(state["module"]), "ema": expand(state["ema"]), "steps": state["steps"],
            "optimizer": {"state": dict(enumerate(legacy_opt.values())), "param_groups": [group]}}


def test_converter_fuses_a_step_saved_before_the_fused_qkv_projection(tmp_path, demo_npz):
    """A ``simflow-checkpoint/2`` step with separate q/k/v attention layers (weights, EMA and Adam moments, the
    optimizer indexed by the old parameter order) converts and resumes with the losses of an uninterrupted run."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from convert_checkpoint import main as convert_main

    from simflow.config import to_dict

    ref = Trainer(cfg_for(demo_npz, tmp_path / "ref", "train.steps=4", "checkpoint.every_steps=0"))
    ref.fit()
    a = Trainer(cfg_for(demo_npz, tmp_path / "old", "train.steps=2", "checkpoint.every_steps=0",
                        "checkpoint.resume=false", "checkpoint.dir=" + str(tmp_path / "scratch")))
    a.fit()
    gen = _legacy_qkv_state(a.gen.state_dict(), a.cfg.model.flow.head_dim)
    assert any(k.endswith(".attn.q.weight") for k in gen["module"]) and not any(".qkv." in k for k in gen["ema"])
    parts = {"generator": gen, "discriminator": a.disc.state_dict(), "loader": a.loader.state_dict(),
             "trainer": {"step": 2}}
    src = _write_v2_step(str(tmp_path / "old" / "checkpoints"), 2, parts, {"run_id": "old", "config": to_dict(a.cfg)})
    new_root = str(tmp_path / "old" / "checkpoints-v3")
    assert convert_main([src, new_root]) == 0
    b = Trainer(cfg_for(demo_npz, tmp_path / "old", "train.steps=4", "checkpoint.every_steps=0",
                        f"checkpoint.dir={new_root}", "train.run_id=old"))
    b.fit()
    assert [h["loss"] for h in a.history + b.history] == [h["loss"] for h in ref.history]
