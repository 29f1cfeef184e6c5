"""VAE reconstruction metrics (``python -m simflow.reconstruction``): PSNR values against the formula, decoding
mu, rFID through the evaluator's feature code, and input errors."""

import json
import math
import os

import numpy as np
import pytest
import torch

from simflow.config import load_config
from simflow.eval.reconstruction import evaluate_reconstruction, main, psnr, psnr_from_mse, reconstruct
from simflow.eval.reference import NpzImageSet
from simflow.eval.weights import load_generator
from simflow.models.simflow import SimFlowModel
from simflow.sampling import to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = SimFlowModel(load_config(TINY))
    path = str(tmp_path_factory.mktemp("w") / "weights.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 real demo images (Fashion-MNIST / shipped photos), 32x32 RGB uint8, in an NPZ like demo_test.npz."""
    from simflow.data.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    _, test_npz, _ = build_demo(str(out), limit=16)
    return test_npz


def test_psnr_of_identical_images_is_infinite():
    a = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert np.all(np.isinf(psnr(a, a))) and psnr_from_mse(0.0) == math.inf


def test_psnr_matches_the_formula_for_a_known_noise_level():
    rng = np.random.default_rng(0)
    a = rng.integers(20, 236, (4, 16, 16, 3)).astype(np.uint8)
    sign = rng.choice([-1, 1], size=a.shape)
    b = (a.astype(int) + 10 * sign).astype(np.uint8)  # |error| = 10 everywhere -> MSE = 100 exactly
    expected = 10 * math.log10(255**2 / 100)  # = 20 log10(25.5) = 28.1308 dB
    assert abs(expected - 28.130803608679106) < 1e-12
    np.testing.assert_allclose(psnr(a, b), expected, rtol=0, atol=1e-12)
    # Gaussian noise of std 5 (clipped values avoided): PSNR = 10 log10(255^2 / mean squared error)
    noise = rng.normal(0, 5, a.shape)
    c = np.clip(np.round(a + noise), 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - c) ** 2).reshape(4, -1).mean(1)
    np.testing.assert_allclose(psnr(a, c), 10 * np.log10(255**2 / mse), rtol=1e-12)
    assert 33 < psnr(a, c).mean() < 35.5  # ~ 20 log10(255 / 5) = 34.2 dB
    assert psnr(a[0], b[0]).shape == (1,)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, b[:2])


def test_reconstruct_decodes_the_posterior_mean(weights):
    cfg = load_config(TINY)
    model, _ = load_generator(weights, cfg)
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    got = reconstruct(model.vae, x)
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
        mu, logvar = model.vae.encode(t)
        want = to_uint8(model.vae.decode(mu).clamp(-1, 1)).numpy()
    assert logvar is None and np.array_equal(got, want)
    noisy = reconstruct(model.vae, x, latent_noise=0.5, indices=np.array([0, 1]))
    assert not np.array_equal(noisy, got)
    assert np.array_equal(noisy, reconstruct(model.vae, x, latent_noise=0.5, indices=np.array([0, 1])))
    with pytest.raises(ValueError, match="needs the image indices"):
        reconstruct(model.vae, x, latent_noise=0.5)


def test_cli_psnr_on_a_held_out_npz(weights, images, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["--weights", weights, "--config", TINY, "--data", images, "--metrics", "psnr", "--batch-size", "5",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    with np.load(images) as z:
        x = z["images"]
    model, _ = load_generator(weights, load_config(TINY))
    per_image = psnr(x, reconstruct(model.vae, x))
    assert res["num_images"] == len(x) == 16 and res["decode"] == "mu"
    assert abs(res["psnr"] - per_image.mean()) < 1e-9 and abs(res["psnr_min"] - per_image.min()) < 1e-9
    assert res["weights"]["path"] == weights and res["resolution"] == 32 and "rfid" not in res


@pytest.mark.parametrize("make, extra, needle", [
    (lambda: np.zeros((4, 16, 16, 3), np.uint8) + 7, [],
     "images are 16x16 but the VAE was trained at model.resolution=32"),
    (lambda: np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32), [], "expected a uint8 array"),
    (lambda: np.zeros((4, 3, 32, 32), np.uint8) + 7, [], "channels-first"),
    (lambda: np.zeros((4, 32, 32, 3), np.uint8) + 7, [], "rFID needs inception weights"),
    (lambda: np.zeros((4, 32, 32, 3), np.uint8) + 7, ["--inception-weights", "/nope/inc.pth"], "/nope/inc.pth"),
    (lambda: np.zeros((4, 32, 32, 3), np.uint8) + 7, ["--metrics", "psnr,lpips"], "unknown ['lpips']"),
])
def test_cli_rejects_bad_input(weights, tmp_path, capsys, make, extra, needle):
    path = tmp_path / "d.npz"
    np.savez(path, images=make())
    assert main(["--weights", weights, "--config", TINY, "--data", str(path), "--no-progress", *extra]) == 2
    assert needle in capsys.readouterr().err


def test_cli_crop_to_model_resolution(weights, tmp_path, capsys):
    path = tmp_path / "big.npz"
    np.savez(path, images=np.random.default_rng(2).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8))
    assert main(["--weights", weights, "--config", TINY, "--data", str(path), "--metrics", "psnr", "--crop",
                 "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_images"] == 3 and np.isfinite(res["psnr"])


@pytest.mark.slow
def test_rfid_uses_the_evaluator_features(weights, images, inception_weights):
    """rFID = Fréchet distance of Inception pool features (random weights from a file) of originals vs
    reconstructions; recomputed here from the same extractor."""
    from simflow.eval.features import build_feature_extractor
    from simflow.eval.metrics import feature_statistics, frechet_distance

    inception = inception_weights
    extractor = build_feature_extractor("inception", inception)
    model, _ = load_generator(weights, load_config(TINY))
    n = 4  # 16 Inception forwards at 299 px in all: ~10-40 s on 2 shared cores
    # eigh: the same distance as sqrtm for PSD covariances, without a 2048x2048 Schur decomposition (~30 s here)
    res = evaluate_reconstruction(model.vae, NpzImageSet(images, limit=n), extractor, batch_size=n, fd_method="eigh",
                                  progress=False)
    with np.load(images) as z:
        x = z["images"][:n]
    real = extractor.extract(x, n, progress=False)["pool"]
    fake = extractor.extract(reconstruct(model.vae, x), n, progress=False)["pool"]
    want = frechet_distance(*feature_statistics(real), *feature_statistics(fake), method="eigh")
    assert res["num_images"] == n and np.isfinite(res["rfid"]) and res["rfid"] > 0
    assert abs(res["rfid"] - want) <= 1e-6 * max(1.0, want)
    assert abs(res["psnr"] - psnr(x, reconstruct(model.vae, x)).mean()) < 1e-9
    assert res["feature_extractor"]["weights"] == os.path.abspath(inception)
