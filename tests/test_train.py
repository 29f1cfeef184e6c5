"""The joint model and training loop on the real demo data (Fashion-MNIST): values, not just "it runs"."""

import math
import os
import subprocess
import sys

import pytest
import torch

from simflow.checkpoint.store import find_latest
from simflow.config import ConfigError, load_config
from simflow.losses.joint import nll_lower_bound
from simflow.models.simflow import SimFlowModel
from simflow.train.metrics import read_metrics
from simflow.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def demo_npz(tmp_path_factory):
    """A 4,000-image slice of the real demo set (Fashion-MNIST from apt, or shipped photos)."""
    from simflow.data.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    train, _, _ = build_demo(str(out), limit=4000)
    return train


def tiny_cfg(tmp_path, demo_npz, *overrides):
    return load_config(TINY, ["data.source=npz", f"data.path={demo_npz}", f"train.out_dir={tmp_path}/run", "logging.wandb=disabled", "eval.self_score_samples=0",
                              "train.sample_every=0", "train.log_every=1", *overrides])


def test_nll_bound_value():
    assert abs(nll_lower_bound(0.5) - 0.5 * (1 + math.log(0.25))) < 1e-12
    assert abs(nll_lower_bound(0.5) - (-0.1931)) < 1e-4


def test_flow_nll_gradient_reaches_encoder(tmp_path):
    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = SimFlowModel(cfg)
    with torch.no_grad():  # move the flow away from its identity init so the test is not trivial
        for p in model.flow.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    eps = torch.randn(2, *model.latent_shape)
    out = model(x, torch.tensor([1, 10]), eps)
    out["nll"].mean().backward()
    enc = [p.grad for n, p in model.vae.named_parameters() if n.startswith("encoder")]
    assert all(g is not None for g in enc)
    assert sum(g.abs().sum().item() for g in enc) > 0
    dec = [p.grad for n, p in model.vae.named_parameters() if n.startswith("decoder")]
    assert all(g is None or g.abs().sum() == 0 for g in dec), "the NLL must not depend on the decoder"


def test_fixed_posterior_noise_is_exactly_std(tmp_path):
    cfg = load_config(TINY)
    model = SimFlowModel(cfg)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    mu, logvar = model.vae.encode(x)
    assert logvar is None
    eps = torch.randn(1, *model.latent_shape)
    z = model.vae.reparameterize(mu, logvar, eps)
    assert torch.allclose(z - mu, 0.5 * eps, atol=1e-6)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=many", "train.steps"),
        ("model.flow.num_blocks=3", "model.flow.layers_per_block"),
        ("model.vae.posterior=gaussian", "model.vae.posterior"),
        ("sample.cfg_mode=foo", "sample.cfg_mode"),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, [override])


def test_bad_config_fails_before_model_is_built(tmp_path):
    """Through the CLI: the error comes out before any model, data or process group exists."""
    r = subprocess.run([sys.executable, "-m", "simflow.train", "--config", TINY, "model.flow.layers_per_block=[1,2]",
                        f"train.out_dir={tmp_path}/x"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0
    assert "model.flow.layers_per_block" in r.stderr
    assert not os.path.exists(tmp_path / "x")


def test_missing_lpips_weights_stop_the_run_at_start(tmp_path, demo_npz):
    cfg = tiny_cfg(tmp_path, demo_npz, "loss.perceptual.weight=1.0", f"loss.perceptual.weights={tmp_path}/vgg16.pth")
    with pytest.raises(FileNotFoundError, match="vgg16.pth"):
        Trainer(cfg)


def test_short_tiny_run_lowers_nll_and_reconstruction(tmp_path, demo_npz):
    """80 steps on real Fashion-MNIST: the run's own logged NLL and L1 fall; NLL stays above the §4.4 bound."""
    cfg = tiny_cfg(tmp_path, demo_npz, "train.steps=80", "loss.gan.start_step=40", "checkpoint.every_steps=40",
                   "train.sample_grid=10")
    out = Trainer(cfg).fit()
    recs = read_metrics(os.path.join(cfg.train.out_dir, "metrics.jsonl"))
    assert [r["step"] for r in recs] == list(range(1, 81))
    first, last = recs[:10], recs[-10:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "nll") < mean(first, "nll") - 0.05
    assert mean(last, "rec") < 0.7 * mean(first, "rec")
    assert min(r["nll"] for r in recs) > nll_lower_bound(0.5)
    assert all("gan" in r and "d_loss" in r for r in recs[40:]) and not any("gan" in r for r in recs[:40])
    # artefacts a person looks at
    for key in ("samples", "loss_curve", "weights"):
        assert os.path.getsize(out[key]) > 1000
    assert find_latest(os.path.join(cfg.train.out_dir, "checkpoints")).endswith("step-0000080")


def test_resume_continues_exactly(tmp_path, demo_npz):
    """12 steps straight == 6 steps + checkpoint + resume for 6 (same process count): bit-equal losses."""
    a = tiny_cfg(tmp_path / "a", demo_npz, "train.steps=12", "checkpoint.every_steps=0", "loss.gan.start_step=3",
                 "train.label_drop=0.5")
    Trainer(a).fit()
    b = tiny_cfg(tmp_path / "b", demo_npz, "train.steps=6", "checkpoint.every_steps=0", "loss.gan.start_step=3",
                 "train.label_drop=0.5")
    Trainer(b).fit()
    b.train.steps = 12
    t = Trainer(b)
    t.fit()
    ra = read_metrics(os.path.join(a.train.out_dir, "metrics.jsonl"))
    rb = read_metrics(os.path.join(b.train.out_dir, "metrics.jsonl"))
    assert [r["step"] for r in rb] == list(range(1, 13))
    for x, y in zip(ra, rb):
        assert x["loss"] == y["loss"] and x["d_loss" if "d_loss" in x else "loss"] == y["d_loss" if "d_loss" in y else "loss"]


def test_resume_refuses_another_architecture(tmp_path, demo_npz):
    cfg = tiny_cfg(tmp_path, demo_npz, "train.steps=2")
    Trainer(cfg).fit()
    cfg2 = tiny_cfg(tmp_path, demo_npz, "train.steps=4", "model.flow.width=32")
    from simflow.checkpoint.store import CheckpointError

    with pytest.raises(CheckpointError, match="architecture"):
        Trainer(cfg2).fit()


def test_repa_and_lpips_terms_train_end_to_end(tmp_path, demo_npz):
    """REPA-E alignment (tiny random DINOv2-style ViT) and LPIPS (random VGG16 backbone) enter the joint loss, and
    the alignment gradient reaches the projector, the flow and the encoder (method §6.2: no stop-gradient)."""
    cfg = tiny_cfg(tmp_path, demo_npz, "train.steps=2", "loss.repa.enabled=true", "loss.repa.random_init=true",
                   "loss.repa.teacher_arch=vit_small_patch14_dinov2", "loss.repa.teacher_resolution=56",
                   "loss.repa.teacher_kwargs.embed_dim=32", "loss.repa.teacher_kwargs.depth=1",
                   "loss.repa.teacher_kwargs.num_heads=2", "loss.repa.teacher_dim=32", "loss.repa.layer=2",
                   "loss.repa.projector_dim=64", "loss.perceptual.weight=0.5", "loss.perceptual.random_init=true",
                   "checkpoint.every_steps=0")
    t = Trainer(cfg)
    batch = next(iter(t.loader))
    m = t.micro_step(batch)
    assert {"repa", "lpips"} <= set(m)
    assert -1.0 <= m["repa"] <= 1.0 and m["lpips"] > 0
    grads = {n: p.grad for n, p in t.model.named_parameters()}
    for prefix in ("repa_projector.", "flow.blocks.1.", "vae.encoder."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    assert not any(n.startswith("teacher") for n in grads), "the teacher must stay outside the trained model"
