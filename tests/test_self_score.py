"""End-of-run self-scoring (simflow/eval/self_score.py, issue 15 part 2): the scoring code on real images gives the
floor values of docs/demo_fid.md; a training run writes eval.json with demo_-prefixed keys and a note."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from simflow.config import ConfigError, load_config
from simflow.data.demo import FASHION_MNIST_DIR, load_fashion_mnist
from simflow.eval.demo_features import DEFAULT_WEIGHTS, DemoFashionFeatures
from simflow.eval.self_score import NOTE, DemoReference, score_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
needs_data = pytest.mark.skipif(not (os.path.isdir(FASHION_MNIST_DIR) and os.path.isfile(DEFAULT_WEIGHTS)),
                                reason="needs Debian's dataset-fashion-mnist and weights/demo_fid")


@pytest.fixture(scope="module")
def reference():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    test = load_fashion_mnist("test")
    ref = DemoReference(test["images"], DemoFashionFeatures(DEFAULT_WEIGHTS), "fashion-mnist test")
    yield ref, test
    torch.set_num_threads(saved)


@needs_data
def test_real_images_give_the_documented_floor(reference):
    """docs/demo_fid.md: the first 1,000 training images score 0.151 against the 10,000 test images."""
    ref, test = reference
    assert ref.num_images == 10000
    train = load_fashion_mnist("train", limit=1000)
    floor = score_images(train["images"], train["labels"], ref)
    assert floor["demo_fid"] == pytest.approx(0.151, abs=0.002)
    assert 0.90 <= floor["class_accuracy"] <= 0.97
    wrong = score_images(train["images"], (train["labels"] + 1) % 10, ref)  # accuracy is about the labels asked for
    assert wrong["class_accuracy"] < 0.05


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="eval.self_score_samples"):
        load_config(TINY, ["eval.self_score_samples=-1"])
    with pytest.raises(ValueError, match="3 images vs 2 labels"):
        score_images(np.zeros((3, 32, 32, 3), np.uint8), np.zeros(2), None)


@needs_data
def test_training_run_writes_eval_json(tmp_path):
    """A short real run (world size 1) scores itself: eval.json with the demo_ keys, the note, both CFG settings."""
    from simflow.data.demo import build_demo
    from simflow.launch import train_and_score  # self-scoring runs after the trainer, in the launcher (issue 13)

    train_npz, test_npz, _ = build_demo(str(tmp_path / "demo"), limit=600)
    cfg = load_config(TINY, [
        "data.source=npz", f"data.path={train_npz}", f"eval.self_score_test={test_npz}",
        "eval.self_score_samples=40", "train.steps=3", "train.micro_batch_size=8", "train.sample_every=0",
        "train.sample_grid=10", "checkpoint.every_steps=0", "logging.wandb=disabled", "sample.cfg_scale=2",
        f"train.out_dir={tmp_path / 'run'}"])
    out = train_and_score(cfg)
    rec = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert rec == {**out["eval"], "line": rec["line"]}
    assert rec["num_samples"] == 40 and rec["cfg_scale"] == 2.0 and rec["cfg_mode"] == "deep_only_cond"
    assert rec["note"] == NOTE and "NOT Inception FID" in rec["note"]
    for key in ("demo_fid_no_cfg", "demo_fid_cfg"):
        assert rec[key] > 0.5  # 3 training steps: far from the data
    assert set(rec["scores"]) == {"0", "2"}
    for key in ("class_accuracy_no_cfg", "class_accuracy_cfg"):
        assert 0.0 <= rec[key] <= 1.0
    assert "demo-FID" in rec["line"] and "NOT Inception FID" in rec["line"]


def test_missing_test_split_skips_with_the_reason(tmp_path):
    from simflow.eval.self_score import score_run

    cfg = load_config(TINY, ["eval.self_score_samples=10", f"eval.self_score_test={tmp_path}/none.npz"])
    rec = score_run("unused", cfg, str(tmp_path))
    assert "eval.self_score_test" in rec["skipped"] and "none.npz" in rec["skipped"]
    assert json.loads((tmp_path / "eval.json").read_text())["skipped"] == rec["skipped"]
