"""The training step (issues 11 and 14): no device-to-host syncs outside log steps, non-finite steps skipped bit for
bit on the local engine, repeated non-finite steps stop the run with exit status 3, fp32 latents under bf16.

Counting syncs on CPU: :func:`count_syncs` patches the ``torch.Tensor`` methods that read a value on the host
(``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``cpu``, ``numpy``) and records
every call, except those made inside :meth:`Trainer.host_inputs` (per-sample noise and label dropout computed on
CPU batch tensors that never were on the device). Batches are drawn from the loader before counting: the loader is
host data too (worker processes in a real run).
"""

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch

from simflow.config import ConfigError, load_config
from simflow.train.signals import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE, NonFiniteExit
from simflow.train.step_stats import poisoned_steps
from simflow.train.trainer import POISON_ENV, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.fixture(scope="module")
def demo_npz(tmp_path_factory):
    from simflow.data.demo import build_demo

    train, _, _ = build_demo(str(tmp_path_factory.mktemp("demo")), limit=512)
    return train


def tiny_cfg(tmp_path, demo_npz, *overrides):
    return load_config(TINY, ["data.source=npz", f"data.path={demo_npz}", f"train.out_dir={tmp_path}/run",
                              "logging.wandb=disabled", "train.sample_every=0", "train.micro_batch_size=8",
                              "loss.gan.start_step=0", "model.flow.layers_per_block=[1,1,1,1]", *overrides])


@contextlib.contextmanager
def count_syncs():
    """Yield a list that collects ``(method, file:line)`` for every host read of a tensor value (module docstring)."""
    calls = []
    host_code = Trainer.host_inputs.__code__
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            f = sys._getframe(1)
            caller = f"{f.f_code.co_filename}:{f.f_lineno}"
            while f is not None and f.f_code is not host_code:
                f = f.f_back
            if f is None:
                calls.append((name, caller))
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_sync_counter_sees_a_sync():
    with count_syncs() as calls:
        t = torch.ones(2)
        t.sum().item()
        bool(t[0] > 0)
        float(t[1])
    assert [c[0] for c in calls] == ["item", "__bool__", "__float__"]


def test_no_host_sync_outside_log_steps(tmp_path, demo_npz):
    """Two training steps (generator + GAN discriminator, clipping, fused AdamW, EMA, skip counters): zero host
    reads; the log step that follows reads the metrics back (> 0 allowed there) and they are finite."""
    tr = Trainer(tiny_cfg(tmp_path, demo_npz, "train.log_every=100", "optim.grad_clip=1.0"))
    it = iter(tr.loader)
    batches = [next(it) for _ in range(2)]
    with count_syncs() as calls:
        for b in batches:
            tr.train_step(iter([b]))
    assert calls == [], calls
    with count_syncs() as calls:
        rows = tr.flush_metrics()
        tr.check_skips()
    assert len(calls) >= 2
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "nll", "rec", "gan", "d_loss", "grad_norm"))
    assert tr.skipped_steps == 0


def _snapshot(tr):
    """Deep copies of the generator's and discriminator's weights, AdamW state (moments and step) and EMA."""
    def copy(x):
        if torch.is_tensor(x):
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items() if k != "param_groups"}
        return x
    return {"gen": copy(tr.gen.state_dict()), "disc": copy(tr.disc.state_dict())}


def _bit_equal(a, b, path=""):
    """Names of the tensors of a that differ from b bit for bit (equal bytes, so -0.0 != 0.0 and NaN == NaN)."""
    if torch.is_tensor(a):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dim() else
                                                                          a.reshape(1).view(torch.uint8),
                                                                          b.view(torch.uint8) if b.dim() else
                                                                          b.reshape(1).view(torch.uint8))
        return [] if same else [path]
    if isinstance(a, dict):
        return [d for k in a for d in _bit_equal(a[k], b[k], f"{path}.{k}")]
    return []


def test_local_nonfinite_step_is_skipped_bit_exactly(tmp_path, demo_npz, monkeypatch, caplog):
    """A NaN loss at step index 3 (SIMFLOW_TEST_POISON_LOSS): weights, AdamW moments and step count and the EMA of
    both engines equal their values before that step bit for bit; the LR schedule and the trainer's step counter
    advance (attempted steps); the following steps train with finite losses; the skip is counted and named."""
    monkeypatch.setenv(POISON_ENV, "3")
    tr = Trainer(tiny_cfg(tmp_path, demo_npz, "train.log_every=100", "train.ema_decay=0.5", "optim.warmup_steps=10"))
    it = iter(tr.loader)
    for _ in range(3):
        tr.train_step(it)
    before = _snapshot(tr)
    lr_before = tr.gen.optimizer.param_groups[0]["lr"]
    tr.train_step(it)
    after = _snapshot(tr)
    assert _bit_equal(before["gen"]["module"], after["gen"]["module"]) == []
    assert _bit_equal(before["gen"]["optimizer"], after["gen"]["optimizer"]) == []
    assert _bit_equal(before["gen"]["ema"], after["gen"]["ema"]) == []
    assert _bit_equal(before["disc"], after["disc"]) == []
    assert len(before["gen"]["ema"]) > 0 and len(before["gen"]["optimizer"]["state"]) > 0
    assert all(float(s["step"]) == 3.0 for s in after["gen"]["optimizer"]["state"].values())  # AdamW: not advanced
    assert tr.gen.steps == 4 and tr.step == 4  # attempted steps
    assert tr.gen.optimizer.param_groups[0]["lr"] > lr_before  # warm-up goes on: LR is a function of attempted steps
    assert all(p.grad is None for p in tr.gen.module.parameters())  # the NaN gradients were dropped
    for _ in range(2):
        tr.train_step(it)
    moved = _snapshot(tr)
    assert _bit_equal(after["gen"]["module"], moved["gen"]["module"]) != []  # training continues
    caplog.set_level("WARNING", logger="simflow")
    rows = tr.flush_metrics()
    tr.check_skips()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert math.isnan(rows[3]["loss"]) and math.isnan(rows[3]["d_loss"]) and not math.isfinite(rows[3]["grad_norm"])
    for r in rows[:3] + rows[4:]:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
    from simflow.checkpoint.store import load_checkpoint

    saved, _ = load_checkpoint(tr.save(block=True), parts=["trainer"])  # the count is part of the trainer state
    assert tr.skipped_steps == 1 and saved["trainer"]["skipped_steps"] == 1
    text = caplog.text
    assert "skipped step 4" in text and "generator loss" in text and "discriminator loss" in text
    assert "generator grad norm" in text  # the NaN loss gives NaN gradients too
    assert all(float(s["step"]) == 5.0 for s in moved["gen"]["optimizer"]["state"].values())


def test_consecutive_nonfinite_steps_raise_in_process(tmp_path, demo_npz, monkeypatch):
    """Below the limit the run goes on; at train.max_skipped_steps consecutive skips check_skips raises
    NonFiniteExit (status 3) and the counters name the steps."""
    monkeypatch.setenv(POISON_ENV, "1,2,4,5,6")
    tr = Trainer(tiny_cfg(tmp_path, demo_npz, "train.max_skipped_steps=3", "train.log_every=100"))
    it = iter(tr.loader)
    for _ in range(4):  # steps 1..4 (1-based): 2 and 3 skipped, 4 applied
        tr.train_step(it)
    tr.check_skips()
    assert tr.skipped_steps == 2
    for _ in range(3):  # 5, 6, 7 skipped
        tr.train_step(it)
    with pytest.raises(NonFiniteExit) as e:
        tr.check_skips()
    assert e.value.code == NONFINITE_EXIT_CODE == 3 != REQUEUE_EXIT_CODE
    assert "3 consecutive non-finite steps up to step 7" in e.value.message
    assert "3 steps between 5 and 7" in e.value.message


def test_repeated_nonfinite_steps_end_the_run_with_status_3(tmp_path, demo_npz):
    """The CLI: steps 2-4 poisoned, max_skipped_steps=3, log_every=2: the log step at 4 finds 3 consecutive
    skips, the process exits 3 (not the requeue status 75) naming the limit, and commits no checkpoint."""
    out = tmp_path / "run"
    env = dict(os.environ, **{POISON_ENV: "1,2,3", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", "simflow.train", "--config", TINY, "data.source=npz", f"data.path={demo_npz}",
           f"train.out_dir={out}", "logging.wandb=disabled", "train.sample_every=0", "train.micro_batch_size=4",
           "model.flow.layers_per_block=[1,1,1,1]", "train.steps=8", "train.log_every=2",
           "train.max_skipped_steps=3", "checkpoint.every_steps=0"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == NONFINITE_EXIT_CODE, p.stderr[-3000:]
    assert "3 consecutive non-finite steps up to step 4" in p.stderr and "train.max_skipped_steps=3" in p.stderr
    assert not os.path.exists(out / "checkpoints") or not any(
        n.startswith("step-") for n in os.listdir(out / "checkpoints"))


def test_skipped_steps_survive_resume(tmp_path, demo_npz, monkeypatch):
    from simflow.train.metrics import read_metrics

    monkeypatch.setenv(POISON_ENV, "1")
    cfg = tiny_cfg(tmp_path, demo_npz, "train.steps=3", "train.log_every=1", "checkpoint.every_steps=0",
                   "train.sample_grid=10")
    Trainer(cfg).fit()
    monkeypatch.delenv(POISON_ENV)
    cfg.train.steps = 5
    Trainer(cfg).fit()
    recs = read_metrics(os.path.join(cfg.train.out_dir, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in recs] == [0, 1, 1, 1, 1]


def test_latent_is_fp32_under_bf16_autocast():
    """z = mu + s eps is formed in fp32 under CPU bf16 autocast (method §3.2), equal to the fp32 formula on the
    (bf16) encoder mean, and not rounded to bf16."""
    from simflow.models.simflow import SimFlowModel

    cfg = load_config(TINY, ["model.flow.layers_per_block=[1,1,1,1]"])
    torch.manual_seed(0)
    model = SimFlowModel(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    eps = torch.randn(2, *model.latent_shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, logvar = model.vae.encode(x)
        z = model.vae.reparameterize(mu, logvar, eps)
        out = model(x, torch.tensor([1, 2]), eps)
    assert mu.dtype == torch.bfloat16  # the encoder does run in bf16
    assert z.dtype == torch.float32 and out["z"].dtype == torch.float32
    assert torch.equal(z, mu.float() + 0.5 * eps)
    assert not torch.equal(z, z.to(torch.bfloat16).float())  # keeps bits bf16 would drop


def test_labels_checked_at_the_data_boundary(tmp_path, demo_npz):
    with pytest.raises(ValueError, match=r"has 10 classes but model.flow.num_classes=5"):
        Trainer(tiny_cfg(tmp_path, demo_npz, "model.flow.num_classes=5"))


def test_config_and_hook_errors_name_the_problem():
    with pytest.raises(ConfigError, match="train.max_skipped_steps"):
        load_config(TINY, ["train.max_skipped_steps=0"])
    assert poisoned_steps("3, 5@1,7@0", 1) == {3: None, 5: None}
    with pytest.raises(ValueError, match="SIMFLOW_TEST_POISON_LOSS: bad entry 'x@1'"):
        poisoned_steps("x@1", 0)
