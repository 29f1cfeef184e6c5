"""demo-FID (issue 8 item 1): the Fashion-MNIST feature network, its accuracy check and its metric behaviour.

One reduced training run (12,000 real training images, 2 epochs, width 16; ~15 s on one thread) provides the
network for every test here. The full tool run (4 epochs on all 60,000 images) must reach 0.90 test accuracy; the
tool checks that itself (exit status 1 below ``--min-accuracy``), which ``test_tool_threshold_gate`` exercises.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from simflow.data.demo import load_fashion_mnist
from simflow.eval.demo_features import (
    DEFAULT_WEIGHTS,
    DEMO_KIND,
    DemoFashionFeatures,
    FashionCNN,
    _augment,
    accuracy,
    load_fashion_cnn,
    save_fashion_cnn,
    train_feature_net,
)
from simflow.eval.evaluator import ReferenceError, check_compatible, evaluate, load_reference, open_samples
from simflow.eval.features import WeightsNotFoundError, available_feature_extractors
from simflow.storage import sha256_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Test accuracy of the reduced run below, measured at 0.808 (seed 0); the margin absorbs float summation
# order differences between machines. The 0.90 bar applies to the full run (tools/train_feature_net.py).
REDUCED_RUN_MIN_ACCURACY = 0.77


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def splits():
    train = load_fashion_mnist("train", limit=12000)
    test = load_fashion_mnist("test", limit=2000)
    return train, test


@pytest.fixture(scope="module")
def reduced_net(splits, tmp_path_factory):
    """(weights path, record) of a reduced real training run."""
    train, test = splits
    model, record = train_feature_net(train["images"], train["labels"], test["images"], test["labels"],
                                      epochs=2.0, width=16, seed=0, progress=False)
    path = str(tmp_path_factory.mktemp("fnet") / "fashion_cnn.safetensors")
    save_fashion_cnn(model, path, record)
    return path, record


def test_reduced_run_accuracy(reduced_net, splits):
    path, record = reduced_net
    assert record["steps"] == round(2.0 * 12000 / 128)
    assert record["test_accuracy"] >= REDUCED_RUN_MIN_ACCURACY, record
    # the saved file reproduces the recorded accuracy exactly (BatchNorm statistics included)
    model, stored = load_fashion_cnn(path)
    _, test = splits
    assert stored["test_accuracy"] == record["test_accuracy"]
    assert accuracy(model, test["images"], test["labels"]) == pytest.approx(record["test_accuracy"], abs=1e-12)


def test_augment_flip_and_shift_move_pixels_exactly():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) / 100.0
    g = torch.Generator().manual_seed(3)
    y = _augment(x, g, shift=0)
    for i in range(2):  # shift 0: each image is either unchanged or mirrored
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(2))
    y = _augment(x, torch.Generator().manual_seed(5), shift=2)
    assert y.shape == x.shape
    for i in range(2):  # every output is a (possibly mirrored) translate of the input with -1 fill
        found = False
        for cand in (x[i], x[i].flip(2)):
            pad = torch.nn.functional.pad(cand, (2, 2, 2, 2), value=-1.0)
            for dy in range(5):
                for dx in range(5):
                    found |= torch.equal(pad[:, dy : dy + 6, dx : dx + 6], y[i])
        assert found


def test_registered_and_labelled(reduced_net):
    path, _ = reduced_net
    assert {"demo", DEMO_KIND} <= set(available_feature_extractors())
    ext = DemoFashionFeatures(path)
    assert ext.metric_prefix == "demo_" and "demo-FID" in ext.label and "NOT Inception" in ext.label
    assert ext.describe()["weights_sha256"] == sha256_file(path)
    feats = ext.extract(np.zeros((3, 32, 32, 3), np.uint8) + 200, progress=False)
    assert feats["pool"].shape == (3, 64) and feats["logits"].shape == (3, 10)
    with pytest.raises(ValueError, match="32x32"):
        ext.extract(np.zeros((2, 28, 28, 3), np.uint8) + 9, progress=False)
    with pytest.raises(WeightsNotFoundError, match="train_feature_net.py"):
        DemoFashionFeatures(os.path.join(os.path.dirname(path), "missing.safetensors"))


def test_demo_network_imported_only_when_built():
    """`import simflow.eval.metrics` (or simflow.eval, or the evaluator) must not load the demo network; building
    extractor "demo" does, and gives the demo extractor."""
    code = textwrap.dedent(f"""
        import sys
        import simflow.eval, simflow.eval.metrics, simflow.eval.evaluator
        assert "simflow.eval.demo_features" not in sys.modules, "imported as a side effect"
        from simflow.eval.features import build_feature_extractor
        ext = build_feature_extractor("demo", {DEFAULT_WEIGHTS!r})
        assert "simflow.eval.demo_features" in sys.modules
        print(type(ext).__name__, ext.metric_prefix)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["DemoFashionFeatures", "demo_"]

def _npz(path, images):
    np.savez(path, arr_0=images)
    return str(path)


def test_demo_fid_self_train_noise(reduced_net, splits, tmp_path):
    """Test split vs itself ~ 0; training images vs test small; noise images large (issue 8 "Must show")."""
    from simflow.eval.reference import compute_reference, open_image_set, write_reference

    path, _ = reduced_net
    train, test = splits
    ext = DemoFashionFeatures(path)
    test_npz = _npz(tmp_path / "test.npz", test["images"])
    ref_path = str(tmp_path / "ref.npz")
    write_reference(ref_path, compute_reference(open_image_set(test_npz), ext, progress=False))
    ref = load_reference(ref_path)
    assert ref.feature_extractor == DEMO_KIND and ref.feature_extractor_sha256 == ext.weights_sha256

    def score(images, name):
        return evaluate(open_samples(_npz(tmp_path / name, images)), ref, ext, metrics=("fid", "is", "pr"),
                        progress=False)

    same = score(test["images"], "same.npz")
    other = score(train["images"][:2000], "train.npz")
    rng = np.random.default_rng(0)
    noise = score(rng.integers(0, 256, test["images"].shape, dtype=np.uint8), "noise.npz")
    assert "fid" not in same and "inception_score" not in same  # never reported as Inception numbers
    assert same["label"] == ext.label
    assert abs(same["demo_fid"]) < 1e-3
    assert 0.0 < other["demo_fid"] < 2.0
    assert noise["demo_fid"] > 50 * other["demo_fid"]
    assert same["demo_precision"] == 1.0 and same["demo_recall"] == 1.0
    assert noise["demo_precision"] < 0.05
    # IS over 10 classes: real images are confidently and evenly classified, noise is not
    assert same["demo_inception_score"] > 5.0 > noise["demo_inception_score"]


def test_demo_statistics_refused_for_inception_reference(reduced_net, splits, tmp_path):
    """An ADM-style statistics-only reference (Inception, no extractor record) must not be scored with the demo
    network, and a demo reference must not be scored with other demo weights."""
    path, _ = reduced_net
    ext = DemoFashionFeatures(path)
    mu, sigma = np.zeros(64), np.eye(64)
    adm = str(tmp_path / "adm_ref.npz")
    np.savez(adm, mu=mu, sigma=sigma, resolution=np.array([32, 32]))
    samples = open_samples(_npz(tmp_path / "s.npz", splits[1]["images"][:10]))
    with pytest.raises(ReferenceError, match="inception"):
        check_compatible(samples, load_reference(adm), ext)
    other = str(tmp_path / "other_weights_ref.npz")
    np.savez(other, mu=mu, sigma=sigma, resolution=np.array([32, 32]), feature_extractor=np.asarray(DEMO_KIND),
             feature_extractor_sha256=np.asarray("0" * 64))
    with pytest.raises(ReferenceError, match="SHA-256"):
        check_compatible(samples, load_reference(other), ext)


def test_fid_cli_and_fid_ref_tool(reduced_net, splits, tmp_path, capsys):
    """tools/fid_ref.py and python -m simflow.fid accept the demo network by name."""
    import importlib.util

    from simflow.eval.evaluator import main as fid_main

    path, _ = reduced_net
    _, test = splits
    src = _npz(tmp_path / "test.npz", test["images"][:500])
    spec = importlib.util.spec_from_file_location("fid_ref", os.path.join(ROOT, "tools", "fid_ref.py"))
    fid_ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fid_ref)
    ref = str(tmp_path / "ref.npz")
    assert fid_ref.main([src, "--out", ref, "--extractor", "demo", "--extractor-weights", path, "--no-progress"]) == 0
    out = str(tmp_path / "m.json")
    assert fid_main([src, "--ref", ref, "--extractor", "demo", "--extractor-weights", path, "--metrics", "fid,is",
                     "--out", out, "--no-progress"]) == 0
    with open(out) as f:
        res = json.load(f)
    assert abs(res["demo_fid"]) < 1e-3 and res["feature_extractor"]["kind"] == DEMO_KIND
    # no weights given: refused (exit 2, the flag named), never downloaded
    assert fid_main([src, "--ref", ref, "--extractor", "demo", "--no-progress"]) == 2
    assert "--extractor-weights" in capsys.readouterr().err


def test_tool_threshold_gate(tmp_path, demo_data):
    """tools/train_feature_net.py computes the test accuracy and refuses to write weights below the threshold."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tfn", os.path.join(ROOT, "tools", "train_feature_net.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    data = os.path.dirname(demo_data(600, "fashion_mnist")[0])  # the folder with demo.npz / demo_test.npz
    out = str(tmp_path / "w" / "net.safetensors")
    common = ["--data", str(data), "--out", out, "--epochs", "0.5", "--width", "8", "--no-progress"]
    assert tool.main(common + ["--min-accuracy", "0.99"]) == 1
    assert not os.path.exists(out)
    assert tool.main(common + ["--min-accuracy", "0.0"]) == 0
    with open(out + ".json") as f:
        rec = json.load(f)
    digest = sha256_file(out)
    assert rec["sha256"] == digest and open(out + ".sha256").read().split()[0] == digest
    assert rec["steps"] == round(0.5 * 600 / 128) and 0.0 <= rec["test_accuracy"] <= 1.0
    assert rec["num_test"] == 600
    _, stored = load_fashion_cnn(out)
    assert stored["test_accuracy"] == rec["test_accuracy"]
    photos = os.path.dirname(demo_data(20, "photos")[0])
    assert tool.main(["--data", photos, "--out", out, "--no-progress"]) == 2  # not Fashion-MNIST


def test_committed_weights_meet_threshold():
    """The committed network (tools/train_feature_net.py defaults) records >= 0.90 test accuracy on all 10,000
    test images, and its file matches the recorded SHA-256; re-measure the accuracy on the first 2,000."""
    from simflow.eval.demo_features import ACCURACY_THRESHOLD, DEFAULT_WEIGHTS

    assert os.path.isfile(DEFAULT_WEIGHTS), f"{DEFAULT_WEIGHTS} missing: run tools/train_feature_net.py"
    with open(DEFAULT_WEIGHTS + ".json") as f:
        rec = json.load(f)
    assert rec["sha256"] == sha256_file(DEFAULT_WEIGHTS)
    assert rec["num_test"] == 10000 and rec["test_accuracy"] >= ACCURACY_THRESHOLD
    model, _ = load_fashion_cnn(DEFAULT_WEIGHTS)
    test = load_fashion_mnist("test", limit=2000)
    assert accuracy(model, test["images"], test["labels"]) >= ACCURACY_THRESHOLD - 0.02
    assert isinstance(model, FashionCNN) and os.path.getsize(DEFAULT_WEIGHTS) < 2 * 1024 * 1024


def test_bad_weights_file(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_fashion_cnn(str(bad))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "y.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="format"):
        load_fashion_cnn(str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match="train split"):
        train_feature_net(np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, np.int64),
                          np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64), epochs=1)
