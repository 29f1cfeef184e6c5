"""Tests for the evaluator (issue 7 items 2-3): metric math, Inception features, reference files and the CLI.

InceptionV3 runs on CPU with random weights saved to a temp file (real loading code, offline); every image is resized
to 299x299 inside the network, so the tests use a handful of tiny images. The feature checks compare with
torch-fidelity's own extraction path on the same images and weights.
"""

import hashlib
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from simflow.eval import metrics as M
from simflow.eval.evaluator import ReferenceError, load_reference, main as fid_main, open_samples
from simflow.eval.features import (
    ImageFormatError,
    InceptionV3Features,
    WeightsNotFoundError,
    build_feature_extractor,
    check_images,
)
from simflow.eval.npz import NpzArray, NpzError
from simflow.eval.reference import open_image_set

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def _naive_fd(mu1, s1, mu2, s2):
    """Textbook FD with scipy's sqrtm (reference for the tests)."""
    c = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(c).real)


def _images(n, size, seed):
    """Smooth random colour images (blurred noise), uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size // 4, size // 4, 3))
    x = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)
    return np.clip(128 + 60 * x, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def weights(inception_weights):
    return inception_weights


@pytest.fixture(scope="module")
def extractor(weights):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return InceptionV3Features(weights, device="cpu")


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------------------
def test_frechet_matches_scipy_reference_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    d = 32
    for trial in range(3):
        a = rng.normal(size=(400, d))
        b = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.5 + rng.normal(size=d)
        m1, s1 = M.feature_statistics(a)
        m2, s2 = M.feature_statistics(b)
        ref = _naive_fd(m1, s1, m2, s2)
        assert ref > 1.0
        assert abs(M.frechet_distance(m1, s1, m2, s2) - ref) < 1e-6
        assert abs(M.frechet_distance(m1, s1, m2, s2, method="eigh") - ref) < 1e-6
        tf = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, verbose=False)
        assert abs(M.frechet_distance(m1, s1, m2, s2) - tf["frechet_inception_distance"]) < 1e-6
    # closed form for commuting (diagonal) covariances: |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert abs(M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) - exact) < 1e-9
    # statistics are mean and unbiased covariance
    mu, sigma = M.feature_statistics(a)
    np.testing.assert_allclose(sigma, np.cov(a.T), rtol=1e-12)
    np.testing.assert_allclose(mu, a.mean(0), rtol=1e-12)


def test_frechet_near_singular_is_finite_and_real():
    rng = np.random.default_rng(1)
    d = 64
    # fewer samples than dimensions: rank-deficient covariances
    a, b = rng.normal(size=(5, d)), rng.normal(size=(5, d)) + 0.5
    m1, s1 = M.feature_statistics(a)
    m2, s2 = M.feature_statistics(b)
    fd = M.frechet_distance(m1, s1, m2, s2)
    assert isinstance(fd, float) and np.isfinite(fd)
    assert abs(fd - M.frechet_distance(m1, s1, m2, s2, method="eigh")) < 1e-5 * fd
    same = M.frechet_distance(m1, s1, m1, s1)
    assert abs(same) < 1e-5 * np.trace(s1)

    # a highly non-normal product (eigenvalues 1e-4 and 0, norm 1) where sqrtm's result has an imaginary diagonal
    # above ADM's 1e-3 tolerance (ADM raises here); exact FD = tr s1 + tr s2 - 2 sqrt(eps) = 199.980001
    eps, k = 1e-4, 100.0
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 8)))
    u = np.zeros(8)
    u[0] = 1
    v = np.zeros(8)
    v[0], v[1] = eps, 1
    s1 = q @ (k * np.outer(u, u)) @ q.T
    s2 = q @ (k * np.outer(v, v)) @ q.T
    exact = k + k * (1 + eps**2) - 2 * np.sqrt(eps)
    root = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(root) and np.abs(np.diagonal(root).imag).max() > 1e-3:  # scipy < 1.17: ADM would raise
        with pytest.warns(M.FrechetWarning):
            fd = M.frechet_distance(np.zeros(8), s1, np.zeros(8), s2)
        assert isinstance(fd, float) and abs(fd - exact) < 1e-6  # the eigenvalue formula is exact
    else:  # scipy >= 1.17 returns a (nearly) real root of the defective product: ADM's path, a slightly worse trace
        fd = M.frechet_distance(np.zeros(8), s1, np.zeros(8), s2)
        assert isinstance(fd, float) and abs(fd - exact) < 1e-6 * exact
    assert abs(M.frechet_distance(np.zeros(8), s1, np.zeros(8), s2, method="eigh") - exact) < 1e-6


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="different shapes"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        M.feature_statistics(np.zeros((1, 4)))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score, precision / recall
# ----------------------------------------------------------------------------------------------------------------
def test_inception_score_conventions():
    from torch_fidelity.metric_isc import isc_features_to_metric

    # uniform predictions -> 1; confident predictions spread evenly over K classes -> K
    assert M.inception_score(np.zeros((20, 7)))[0] == pytest.approx(1.0, abs=1e-12)
    k = 5
    confident = np.full((10 * k, k), -50.0)
    confident[np.arange(10 * k), np.arange(10 * k) % k] = 50.0
    assert M.inception_score(confident)[0] == pytest.approx(k, rel=1e-9)
    # ADM splits: consecutive chunks of split_size (5, 5, 2 for N=12); torch-fidelity with shuffle off and
    # equal splits gives the same numbers for num_splits
    logits = np.random.default_rng(0).normal(size=(12, 10)) * 3
    mean, std = M.inception_score(logits, split_size=5)
    by_hand = []
    for lo, hi in ((0, 5), (5, 10), (10, 12)):
        p = np.exp(logits[lo:hi]) / np.exp(logits[lo:hi]).sum(1, keepdims=True)
        by_hand.append(np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean()))
    assert mean == pytest.approx(np.mean(by_hand), rel=1e-12) and std == pytest.approx(np.std(by_hand), rel=1e-9)
    for splits in (1, 3):
        tf = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=False)
        ours = M.inception_score(logits, num_splits=splits)
        assert ours[0] == pytest.approx(tf["inception_score_mean"], rel=1e-12)
        assert ours[1] == pytest.approx(tf["inception_score_std"], abs=1e-12)


def test_precision_recall_hand_example_and_blocks():
    ref = np.arange(5, dtype=np.float64)[:, None]  # 0..4 on a line; k=1 radii (squared) are all 1
    gen = np.array([[0.5], [2.0], [10.0]])
    np.testing.assert_allclose(M.knn_radii(ref, k=1), np.ones(5))
    # samples: 0.5 and 2.0 lie within a reference ball, 10 does not -> precision 2/3;
    # sample radii (k=1): 2.25, 2.25, 64 -> every reference point is covered (4 by the ball around 10) -> recall 1
    p, r = M.precision_recall(ref, gen, k=1)
    assert p == pytest.approx(2 / 3) and r == pytest.approx(1.0)
    # k-th neighbour excludes the point itself, and the block size does not change anything
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(37, 6)), rng.normal(size=(23, 6)) + 0.7
    d = ((a[:, None] - a[None]) ** 2).sum(-1)
    np.testing.assert_allclose(M.knn_radii(a, k=3), np.sort(d, axis=1)[:, 3], rtol=1e-4, atol=1e-5)
    assert M.precision_recall(a, b, k=3, batch_size=5) == M.precision_recall(a, b, k=3, batch_size=1000)
    assert M.precision_recall(a, a, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="k must be"):
        M.knn_radii(a[:3], k=3)


# ----------------------------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------------------------
def test_features_agree_with_torch_fidelity(weights, extractor):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    imgs = _images(4, 24, seed=3)
    ours = extractor.extract(imgs, batch_size=3, progress=False)
    assert ours["pool"].shape == (4, 2048) and ours["logits"].shape == (4, 1008) and ours["spatial"].shape == (4, 2023)
    assert ours["pool"].std() > 1e-3 and ours["spatial"].std() > 1e-3  # random weights keep a usable scale

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(imgs)

        def __getitem__(self, i):
            return torch.from_numpy(imgs[i]).permute(2, 0, 1).contiguous()

    tf_net = create_feature_extractor(
        "inception-v3-compat", ["2048", "logits_unbiased"], cuda=False, feature_extractor_weights_path=weights
    )
    theirs = get_featuresdict_from_dataset(DS(), tf_net, batch_size=4, cuda=False, save_cpu_ram=True, verbose=False)
    np.testing.assert_allclose(ours["pool"], theirs["2048"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours["logits"], theirs["logits_unbiased"].numpy(), rtol=1e-5, atol=1e-5)
    isc = isc_features_to_metric(theirs["logits_unbiased"], splits=1, shuffle=False)
    assert M.inception_score(ours["logits"], num_splits=1)[0] == pytest.approx(isc["inception_score_mean"], rel=1e-6)

    # sFID features = TF 'mixed_6/conv' = ReLU output of Mixed_6d.branch1x1, channels 0..6, flattened as (H, W, C):
    # recompute by running torch-fidelity's layers by hand on two images
    with torch.no_grad():
        x = torch.from_numpy(imgs[:2]).permute(0, 3, 1, 2).float()
        x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            x = getattr(tf_net, name)(x)
        conv = tf_net.Mixed_6d.branch1x1(x)
    assert conv.shape == (2, 192, 17, 17)
    expect = conv.numpy().transpose(0, 2, 3, 1)[..., :7].reshape(2, -1)
    np.testing.assert_allclose(ours["spatial"][:2], expect, rtol=1e-5, atol=1e-5)


def test_image_checks_reject_bad_inputs(extractor):
    x = _images(2, 8, seed=0)
    check_images(x)  # the accepted format
    with pytest.raises(ImageFormatError, match=r"uint8.*\[-1, 1\]"):
        extractor.extract(x.astype(np.float32) / 127.5 - 1, progress=False)
    with pytest.raises(ImageFormatError, match="float64"):
        check_images(x.astype(np.float64))
    with pytest.raises(ImageFormatError, match="channels-first"):
        check_images(x.transpose(0, 3, 1, 2))
    with pytest.raises(ImageFormatError, match=r"\(N, H, W, 3\).*3-D"):
        check_images(x[..., 0])
    with pytest.raises(ImageFormatError, match="grayscale"):
        check_images(x[..., :1])
    with pytest.raises(ImageFormatError, match="0 or 1"):
        check_images((x > 128).astype(np.uint8))
    with pytest.raises(ImageFormatError, match="list"):
        check_images(x.tolist())


def test_missing_weights_name_the_file(tmp_path):
    missing = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(WeightsNotFoundError) as e:
        InceptionV3Features(missing)
    assert missing in str(e.value) and "InceptionV3" in str(e.value) and "2015-12-05" in str(e.value)
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_feature_extractor("nope", missing)
    bad = tmp_path / "not_weights.pth"
    torch.save({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not a usable InceptionV3 state dict"):
        InceptionV3Features(str(bad))


# ----------------------------------------------------------------------------------------------------------------
# npz streaming, reference files, CLI
# ----------------------------------------------------------------------------------------------------------------
def test_npz_streaming(tmp_path):
    x = _images(7, 8, seed=1)
    for save in (np.savez, np.savez_compressed):
        p = str(tmp_path / f"{save.__name__}.npz")
        save(p, arr_0=x, other=np.arange(3))
        arr = NpzArray(p, "arr_0")
        assert arr.shape == x.shape and arr.dtype == np.uint8
        np.testing.assert_array_equal(np.concatenate(list(arr.iter_batches(3))), x)
        np.testing.assert_array_equal(np.concatenate(list(arr.iter_batches(2, limit=5))), x[:5])
    with pytest.raises(NpzError, match=r"no array 'images'.*arr_0"):
        NpzArray(p, "images")
    with pytest.raises(NpzError, match="not found"):
        NpzArray(str(tmp_path / "absent.npz"), "arr_0")


def _run(argv, capsys):
    rc = fid_main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_end_to_end_fid_zero_for_same_set_and_larger_for_shifted(tmp_path, weights, capsys):
    import runpy

    x = _images(6, 16, seed=5)
    shifted = np.clip(x.astype(np.int16) + 70, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "imgs.npz", images=x)
    np.savez(tmp_path / "same.npz", arr_0=x)
    np.savez(tmp_path / "shifted.npz", arr_0=shifted)
    ref = str(tmp_path / "ref.npz")
    fid_ref = runpy.run_path(os.path.join(TOOLS, "fid_ref.py"))["main"]
    assert fid_ref([str(tmp_path / "imgs.npz"), "--out", ref, "--inception-weights", weights, "--no-progress"]) == 0
    capsys.readouterr()
    with np.load(ref) as z:
        assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0", "pool_features", "resolution"} <= set(z.files)
        assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048) and z["mu_s"].shape == (2023,)
        np.testing.assert_array_equal(z["arr_0"], x)
        assert list(z["resolution"]) == [16, 16] and str(z["feature_extractor"]) == "inception"

    out = str(tmp_path / "same.json")
    common = ["--ref", ref, "--inception-weights", weights, "--no-progress", "--fd-method", "eigh"]
    rc, _, err = _run([str(tmp_path / "same.npz"), *common, "--out", out], capsys)
    assert rc == 0, err
    res = json.load(open(out))
    assert abs(res["fid"]) < 1e-3 and abs(res["sfid"]) < 1e-3
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    assert 1.0 <= res["inception_score"] < 1.5
    assert res["reference"]["sha256"] == hashlib.sha256(open(ref, "rb").read()).hexdigest()
    assert res["reference"]["resolution"] == [16, 16] and res["samples"]["resolution"] == [16, 16]
    assert res["reference"]["cached_pool_features"] is True
    assert res["reference"]["stats_source"]["pool"] == "stored in reference file"
    assert res["feature_extractor"]["published_weights"] is False
    assert res["feature_extractor"]["weights_sha256"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()

    rc, stdout, err = _run([str(tmp_path / "shifted.npz"), *common, "--metrics", "fid"], capsys)
    assert rc == 0, err
    shifted_fid = json.loads(stdout)["fid"]
    assert shifted_fid > 100 * max(abs(res["fid"]), 1e-6) and shifted_fid > 1e-2

    # a reference made with other weights is refused before any feature is computed
    with np.load(ref) as z:
        other = {k: z[k] for k in z.files}
    other["feature_extractor_sha256"] = np.asarray("0" * 64)
    np.savez(tmp_path / "ref_other.npz", **other)
    rc, _, err = _run([str(tmp_path / "same.npz"), "--ref", str(tmp_path / "ref_other.npz"),
                       "--inception-weights", weights, "--no-progress"], capsys)
    assert rc == 2 and "SHA-256" in err and "tools/fid_ref.py" in err


def test_cli_rejects_float_samples_resolution_mismatch_and_missing_weights(tmp_path, weights, capsys):
    x = _images(5, 16, seed=2)
    np.savez(tmp_path / "ref_imgs.npz", arr_0=x)  # ADM-style reference: images only
    ref = str(tmp_path / "ref_imgs.npz")
    np.savez(tmp_path / "float.npz", arr_0=x.astype(np.float32) / 127.5 - 1)
    np.savez(tmp_path / "big.npz", arr_0=_images(5, 24, seed=2))
    np.savez(tmp_path / "chw.npz", arr_0=x.transpose(0, 3, 1, 2))
    args = ["--ref", ref, "--inception-weights", weights, "--no-progress"]

    rc, _, err = _run([str(tmp_path / "float.npz"), *args], capsys)
    assert rc == 2 and "float.npz['arr_0']" in err and "uint8" in err and "[-1, 1]" in err
    rc, _, err = _run([str(tmp_path / "chw.npz"), *args], capsys)
    assert rc == 2 and "channels-first" in err
    rc, _, err = _run([str(tmp_path / "big.npz"), *args], capsys)
    assert rc == 2 and "resolution mismatch" in err and "24x24" in err and "16x16" in err
    missing = str(tmp_path / "nowhere" / "weights-inception-2015-12-05-6726825d.pth")
    rc, _, err = _run([str(tmp_path / "ref_imgs.npz"), "--ref", ref, "--inception-weights", missing], capsys)
    assert rc == 2 and missing in err and "InceptionV3" in err

    # statistics-only reference without a resolution entry: refused unless the resolution is stated
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ReferenceError, match="--ref-resolution"):
        load_reference(str(tmp_path / "stats_only.npz"))
    r = load_reference(str(tmp_path / "stats_only.npz"), ref_resolution=16)
    assert r.resolution == (16, 16) and r.feature_extractor == "inception" and "pool" in r.stats
    rc, _, err = _run([str(tmp_path / "big.npz"), "--ref", str(tmp_path / "stats_only.npz"), "--ref-resolution", "16",
                       "--inception-weights", weights, "--no-progress"], capsys)
    assert rc == 2 and "resolution mismatch" in err
    with pytest.raises(ReferenceError, match="SHA-256"):
        load_reference(ref, expected_sha256="f" * 64)
    assert open_samples(ref).shape == (5, 16, 16, 3)


def test_reference_from_shard_set_matches_npz(tmp_path):
    shard_writer = pytest.importorskip("simflow.data.shard_writer")
    x = _images(5, 16, seed=4)
    src = str(tmp_path / "demo.npz")
    np.savez(src, images=x, labels=np.arange(5) % 2, class_names=np.array(["a", "b"]))
    shard_writer.write_shards(src, str(tmp_path / "shards"), samples_per_shard=2, progress=False)
    shards = open_image_set(str(tmp_path / "shards"), resolution=16)
    assert shards.num_images == 5 and shards.resolution == (16, 16)
    np.testing.assert_array_equal(np.concatenate(list(shards.batches(3))), x)
    npz = open_image_set(src, limit=4)
    assert npz.num_images == 4 and npz.sha256 == hashlib.sha256(open(src, "rb").read()).hexdigest()
    np.testing.assert_array_equal(np.concatenate(list(npz.batches(3))), x[:4])
