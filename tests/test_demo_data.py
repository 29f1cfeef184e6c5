"""The demo data builder produces the real Fashion-MNIST set (and real photo crops as a fallback)."""

import numpy as np
import pytest

from simflow.data.demo import (FASHION_MNIST_CLASSES, DemoDataError, build_demo, fashion_mnist_available,
                               load_npz)

needs_fmnist = pytest.mark.skipif(not fashion_mnist_available(),
                                  reason="apt package dataset-fashion-mnist is not installed")


@needs_fmnist
def test_fashion_mnist_demo_is_real(tmp_path):
    train_path, test_path, used = build_demo(str(tmp_path))
    assert used == "fashion_mnist"
    train, test = load_npz(train_path), load_npz(test_path)
    assert train["images"].shape == (60000, 32, 32, 3) and test["images"].shape == (10000, 32, 32, 3)
    assert np.bincount(train["labels"]).tolist() == [6000] * 10
    assert np.bincount(test["labels"]).tolist() == [1000] * 10
    assert list(train["class_names"]) == list(FASHION_MNIST_CLASSES)
    img = train["images"]
    # grayscale replicated to RGB, 2-pixel zero border from the 28 -> 32 padding
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert img[:, border].max() == 0
    # published Fashion-MNIST train statistics over the 28x28 area: mean 0.2860, std 0.3530 (of [0, 1])
    inner = img[:, 2:30, 2:30, 0].astype(np.float64) / 255
    assert abs(inner.mean() - 0.2860) < 0.001 and abs(inner.std() - 0.3530) < 0.001
    # classes look different: trousers are narrow and tall, bags are wide
    mean_by_class = np.stack([inner[train["labels"] == c].mean(0) for c in range(10)])
    assert np.abs(mean_by_class[1] - mean_by_class[8]).mean() > 0.1


def test_photo_crops_fallback_is_deterministic(tmp_path):
    a, _, used = build_demo(str(tmp_path / "a"), source="photos", limit=200)
    b, _, _ = build_demo(str(tmp_path / "b"), source="photos", limit=200)
    assert used == "photos"
    da, db = load_npz(a), load_npz(b)
    assert np.array_equal(da["images"], db["images"])
    assert da["images"].shape == (200, 32, 32, 3)
    assert np.bincount(da["labels"]).tolist() == [20] * 10
    assert "astronaut" in list(da["class_names"]) and "china" in list(da["class_names"])
    per_class_mean = np.stack([da["images"][da["labels"] == c].reshape(-1, 3).mean(0) for c in range(10)])
    assert np.unique(per_class_mean.round(1), axis=0).shape[0] == 10  # ten different photos
    assert da["images"].std() > 20  # real texture, not flat


def test_missing_source_names_path_and_package(tmp_path):
    with pytest.raises(DemoDataError, match=r"/nonexistent/train-images-idx3-ubyte.gz.*dataset-fashion-mnist"):
        build_demo(str(tmp_path), source="fashion_mnist", root="/nonexistent")
    # with no explicit source and no files, it falls back to the photos
    _, _, used = build_demo(str(tmp_path), root="/nonexistent", limit=20)
    assert used == "photos"
