"""Reference statistics in the ADM format, for the demo data or any custom data set (``tools/fid_ref.py``).

A reference batch is an ``.npz`` with (ADM keys, Dhariwal & Nichol 2021, arXiv 2105.05233 evaluator)

* ``mu``, ``sigma``: float64 (D,), (D, D) mean and unbiased covariance of the pool features (FID);
* ``mu_s``, ``sigma_s``: the same for the spatial features (sFID), when the extractor has them;
* ``arr_0``: uint8 (N, H, W, 3) reference images (precision/recall; optional),

plus SimFlow's provenance entries, which ADM's evaluator ignores: ``resolution`` int64 (2,) = (H, W),
``num_images``, ``feature_extractor`` (e.g. ``"inception"``), ``feature_extractor_sha256``, ``source``,
``source_sha256`` (NPZ sources), ``skipped_samples`` and optionally ``pool_features`` float32 (N, D) (cached
reference features, so ``python -m simflow.fid`` need not re-run the network on ``arr_0`` for precision/recall).

Sources: an image ``.npz`` (``images`` or ``arr_0`` uint8 (N, H, W, 3), e.g. ``data/demo/demo_test.npz``) streamed
from disk, or a WebDataset shard set written by ``tools/make_shards.py`` (local folder, ``s3://``, ``pipe:``) read
through :class:`simflow.data.shards.ShardSource` in global-id order.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from simflow import storage
from simflow.eval.features import FeatureExtractor
from simflow.eval.metrics import feature_statistics
from simflow.eval.npz import NpzArray, check_npz_images, npz_keys

IMAGE_KEYS = ("images", "arr_0")


class ImageSet:
    """Images to summarise, as batches of uint8 (B, H, W, 3).

    Attributes:
        description: human-readable source (path and kind).
        num_images: images that will be yielded (before unreadable ones are dropped).
        resolution: (H, W) of every yielded image.
        sha256: SHA-256 of the source file (NPZ) or None (shard sets carry per-shard hashes in their index).
        skipped: unreadable samples dropped so far (shard sets only).
    """

    description: str
    num_images: int
    resolution: Tuple[int, int]
    sha256: Optional[str] = None
    skipped: int = 0

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError


class NpzImageSet(ImageSet):
    """Images of an ``.npz`` (key ``images`` or ``arr_0``, or ``key``), streamed; first ``limit`` only if given.

    ``resolution``: ADM centre crop to this side when it differs from the stored size (None = keep).
    """

    def __init__(self, path: str, key: Optional[str] = None, limit: Optional[int] = None,
                 resolution: Optional[int] = None):
        keys = npz_keys(path)
        if key is None:
            found = [k for k in IMAGE_KEYS if k in keys]
            if not found:
                raise ValueError(f"{path}: no image array; expected one of {list(IMAGE_KEYS)}, found keys {keys}")
            key = found[0]
        self.array = NpzArray(path, key)
        check_npz_images(self.array)
        self.limit = len(self.array) if limit is None else min(limit, len(self.array))
        self.num_images = self.limit
        self.crop = resolution if resolution and tuple(self.array.shape[1:3]) != (resolution, resolution) else None
        self.resolution = (self.crop, self.crop) if self.crop else tuple(self.array.shape[1:3])
        self.description = f"npz {os.path.abspath(path)}['{key}']"
        self.sha256 = storage.sha256_file(path)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for b in self.array.iter_batches(batch_size, limit=self.limit):
            if self.crop:
                from simflow.data.transforms import center_crop_array

                b = np.stack([center_crop_array(im, self.crop) for im in b])
            yield b


class ShardImageSet(ImageSet):
    """Images of a shard set (``tools/make_shards.py`` format) via :class:`simflow.data.shards.ShardSource`.

    Args:
        url: shard folder, its ``index.json``, ``s3://bucket/prefix`` or ``pipe:...{name}...``.
        resolution: output side (ADM centre crop); default: the ``resolution`` recorded in the index.
        limit: first N samples (global id order) only.
        endpoint, cache_dir: passed to the shard source (S3 endpoint, staging folder).
    """

    def __init__(self, url: str, resolution: Optional[int] = None, limit: Optional[int] = None,
                 endpoint: Optional[str] = None, cache_dir: Optional[str] = None):
        from simflow.data.shards import ShardSource

        self.source = ShardSource(url, endpoint=endpoint, cache_dir=cache_dir)
        res = resolution or self.source.index.meta.get("resolution")
        if not res:
            raise ValueError(f"{url}: the shard index records no resolution; pass --resolution")
        self.resolution = (int(res), int(res))
        self.num_images = self.source.num_samples if limit is None else min(limit, self.source.num_samples)
        self.description = f"shards {url}"

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for lo in range(0, self.num_images, batch_size):
            ids = np.arange(lo, min(lo + batch_size, self.num_images), dtype=np.int64)
            got = [r for r in self.source.read(ids, self.resolution[0])]
            ok = [r[0] for r in got if r is not None]
            self.skipped += len(got) - len(ok)
            if ok:
                yield np.stack(ok)


def open_image_set(src: str, key: Optional[str] = None, limit: Optional[int] = None,
                   resolution: Optional[int] = None) -> ImageSet:
    """An :class:`NpzImageSet` for ``*.npz`` paths, otherwise a :class:`ShardImageSet`."""
    if src.endswith(".npz"):
        return NpzImageSet(src, key, limit, resolution)
    return ShardImageSet(src, resolution, limit)


def compute_reference(
    images: ImageSet,
    extractor: FeatureExtractor,
    batch_size: int = 100,
    keep_images: bool = True,
    keep_features: bool = True,
    progress: bool = True,
) -> Dict[str, Any]:
    """Features and ADM statistics of an image set.

    Args:
        images: the source (:func:`open_image_set`).
        extractor: feature network.
        batch_size: images per forward pass.
        keep_images: return the images as ``arr_0`` (held in memory: N*H*W*3 bytes).
        keep_features: return the pool features as ``pool_features`` (N*D*4 bytes).
        progress: progress bar.

    Returns:
        dict of arrays ready for :func:`write_reference` (``mu``, ``sigma``, ``mu_s``, ``sigma_s``, ``arr_0``,
        ``pool_features`` and the provenance entries).
    """
    kept: List[np.ndarray] = []

    def stream() -> Iterator[np.ndarray]:
        for b in images.batches(batch_size):
            if keep_images:
                kept.append(b)
            yield b

    feats = extractor.extract(stream(), batch_size, total=images.num_images, what=images.description,
                              progress=progress)
    out: Dict[str, Any] = {}
    out["mu"], out["sigma"] = feature_statistics(feats["pool"])
    if "spatial" in feats:
        out["mu_s"], out["sigma_s"] = feature_statistics(feats["spatial"])
    if keep_images:
        out["arr_0"] = np.concatenate(kept, axis=0)
    if keep_features:
        out["pool_features"] = feats["pool"].astype(np.float32)
    out["resolution"] = np.asarray(images.resolution, np.int64)
    out["num_images"] = np.int64(feats["pool"].shape[0])
    out["feature_extractor"] = np.asarray(extractor.kind)
    out["feature_extractor_sha256"] = np.asarray(extractor.weights_sha256)
    out["source"] = np.asarray(images.description)
    out["source_sha256"] = np.asarray(images.sha256 or "")
    out["skipped_samples"] = np.int64(images.skipped)
    return out


def write_reference(path: str, arrays: Dict[str, Any]) -> str:
    """Write ``arrays`` as an uncompressed ``.npz`` atomically (:func:`simflow.storage.open_atomic`); returns its
    SHA-256 (streamed, after the write: ``np.savez`` seeks back into the zip, so no running hash)."""
    with storage.open_atomic(path) as out:
        np.savez(out.f, **arrays)
    return storage.sha256_file(path)


__all__ = ["ImageSet", "NpzImageSet", "ShardImageSet", "open_image_set", "compute_reference", "write_reference"]
