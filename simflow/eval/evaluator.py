"""Score a sample batch against a reference batch: FID, sFID, IS, precision, recall (ADM protocol).

Inputs follow the ADM evaluation suite (Dhariwal & Nichol 2021, arXiv 2105.05233, ``evaluations/evaluator.py``):

* **samples**: an ``.npz`` whose ``arr_0`` is uint8 (N, H, W, 3) (e.g. ``python -m simflow.sample`` output);
* **reference**: an ``.npz`` holding any of ``arr_0`` (uint8 reference images), ``mu``/``sigma`` (pool statistics,
  used for FID when present, as ADM does) and ``mu_s``/``sigma_s`` (spatial statistics for sFID). Files written by
  ``tools/fid_ref.py`` also carry ``resolution``, ``feature_extractor``, ``feature_extractor_sha256``,
  ``num_images``, ``source``/``source_sha256`` and optionally ``pool_features`` (cached reference features for
  precision/recall, used only when the extractor's weights hash matches).

Checks before any network runs: sample dtype/shape, the reference's resolution against the samples' (a mismatch is
an error: statistics at another resolution shift FID), the feature extractor recorded in the reference against the
one in use, an optional expected reference SHA-256. The result records both files' SHA-256, resolutions and the
extractor's weights hash.

Entry point: ``python -m simflow.fid`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from simflow import storage
from simflow.cli import UsageError, eval_parent_parser, resolve_extractor, write_result
from simflow.eval.features import FeatureExtractor, ImageFormatError, build_feature_extractor
from simflow.eval.metrics import FD_METHODS, feature_statistics, frechet_distance, inception_score, precision_recall
from simflow.eval.npz import NpzArray, NpzError, check_npz_images, npz_keys
from simflow.runtime import resolve_device

METRICS = ("fid", "sfid", "is", "pr")
STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


class ReferenceError(ValueError):
    """The reference batch does not fit the samples or the extractor (resolution, hash, feature network)."""


def _str_item(z: Any, key: str) -> Optional[str]:
    return str(np.asarray(z[key]).item()) if key in z.files else None


@dataclass
class Reference:
    """A reference batch in the ADM format, opened without loading its images.

    Attributes:
        path, sha256: the file and its SHA-256.
        resolution: (H, W) of the reference images.
        images: lazy ``arr_0`` (uint8 (N, H, W, 3)) or None.
        stats: ``"pool"`` -> (mu, sigma) and/or ``"spatial"`` -> (mu_s, sigma_s), float64, when stored in the file.
        feature_extractor / feature_extractor_sha256: the network recorded by ``tools/fid_ref.py`` (None in ADM's
            own reference files, whose statistics are Inception's).
        pool_features: cached float32 (N, D) reference features for precision/recall, or None.
        num_images: images the statistics came from, when recorded.
    """

    path: str
    sha256: str
    resolution: Tuple[int, int]
    images: Optional[NpzArray] = None
    stats: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    feature_extractor: Optional[str] = None
    feature_extractor_sha256: Optional[str] = None
    pool_features: Optional[np.ndarray] = None
    num_images: Optional[int] = None

    def describe(self) -> Dict[str, Any]:
        return {
            "path": os.path.abspath(self.path),
            "sha256": self.sha256,
            "resolution": list(self.resolution),
            "num_images": self.num_images,
            "has_images": self.images is not None,
            "stored_stats": sorted(self.stats),
            "feature_extractor": self.feature_extractor,
            "feature_extractor_sha256": self.feature_extractor_sha256,
        }


def load_reference(path: str, ref_resolution: Optional[int] = None, expected_sha256: Optional[str] = None) -> Reference:
    """Open an ADM-format reference batch and determine its resolution.

    Args:
        path: ``.npz`` reference file.
        ref_resolution: the reference images' side length, needed only when the file has neither ``arr_0`` nor a
            ``resolution`` entry (statistics-only files from elsewhere).
        expected_sha256: if given, the file's SHA-256 must equal it.

    Raises:
        NpzError: unreadable file.
        ReferenceError: no statistics and no images, unknown resolution, inconsistent entries, or SHA-256 mismatch.
    """
    keys = npz_keys(path)
    digest = storage.sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise ReferenceError(f"{path}: SHA-256 is {digest}, expected {expected_sha256}")
    images = NpzArray(path, "arr_0") if "arr_0" in keys else None
    if images is not None:
        check_npz_images(images)
    stats: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    with np.load(path) as z:
        for name, (mk, sk) in STAT_KEYS.items():
            if mk in z.files and sk in z.files:
                stats[name] = (np.asarray(z[mk], np.float64), np.asarray(z[sk], np.float64))
            elif mk in z.files or sk in z.files:
                raise ReferenceError(f"{path}: has only one of {mk!r}/{sk!r}; both are needed")
        rec_res = tuple(int(v) for v in np.atleast_1d(z["resolution"])) if "resolution" in z.files else None
        kind = _str_item(z, "feature_extractor")
        kind_sha = _str_item(z, "feature_extractor_sha256")
        pool_features = np.asarray(z["pool_features"], np.float32) if "pool_features" in z.files else None
        num_images = int(np.asarray(z["num_images"]).item()) if "num_images" in z.files else None
    if images is None and not stats:
        raise ReferenceError(f"{path}: neither reference images 'arr_0' nor statistics 'mu'/'sigma'; keys: {keys}")
    if rec_res is not None and len(rec_res) == 1:
        rec_res = (rec_res[0], rec_res[0])
    img_res = tuple(images.shape[1:3]) if images is not None else None
    if rec_res is not None and img_res is not None and rec_res != img_res:
        raise ReferenceError(f"{path}: 'resolution' entry {rec_res} disagrees with arr_0 images of size {img_res}")
    resolution = img_res or rec_res
    if resolution is None:
        if ref_resolution is None:
            raise ReferenceError(
                f"{path}: cannot tell the reference resolution (no 'arr_0' images, no 'resolution' entry); "
                f"pass --ref-resolution with the size the statistics were computed at"
            )
        resolution = (int(ref_resolution), int(ref_resolution))
    elif ref_resolution is not None and resolution != (ref_resolution, ref_resolution):
        raise ReferenceError(f"{path}: reference resolution is {resolution}, but --ref-resolution={ref_resolution}")
    if kind is None and stats:
        kind = "inception"  # ADM reference batches: TF InceptionV3 statistics
    if num_images is None and images is not None:
        num_images = len(images)
    return Reference(path, digest, resolution, images, stats, kind, kind_sha, pool_features, num_images)


def open_samples(path: str, key: str = "arr_0") -> NpzArray:
    """Open a sample batch lazily and check its format from the header (uint8 (N, H, W, 3)).

    Raises:
        NpzError: missing file/key. ImageFormatError: wrong dtype, rank or channels.
    """
    arr = NpzArray(path, key)
    check_npz_images(arr)
    return arr


def check_compatible(samples: NpzArray, ref: Reference, extractor: Optional[FeatureExtractor] = None) -> None:
    """Refuse a reference that was made at another resolution or with another feature network.

    Raises:
        ReferenceError: naming both files and the mismatching values.
    """
    res = tuple(samples.shape[1:3])
    if res != tuple(ref.resolution):
        raise ReferenceError(
            f"resolution mismatch: samples {samples.name} are {res[0]}x{res[1]} but reference {ref.path} is "
            f"{ref.resolution[0]}x{ref.resolution[1]}; use reference statistics computed at the samples' resolution"
        )
    if extractor is None:
        return
    if ref.stats and ref.feature_extractor != extractor.kind:
        raise ReferenceError(
            f"{ref.path}: statistics were computed with feature extractor {ref.feature_extractor!r}, "
            f"but this run uses {extractor.kind!r}"
        )
    if ref.stats and ref.feature_extractor_sha256 and ref.feature_extractor_sha256 != extractor.weights_sha256:
        raise ReferenceError(
            f"{ref.path}: statistics were computed with {ref.feature_extractor} weights of SHA-256 "
            f"{ref.feature_extractor_sha256}, but {extractor.weights_path} has SHA-256 {extractor.weights_sha256}; "
            f"recompute the reference with tools/fid_ref.py using the same weights"
        )


def evaluate(
    samples: NpzArray,
    ref: Reference,
    extractor: FeatureExtractor,
    metrics: Sequence[str] = METRICS,
    batch_size: int = 100,
    num_samples: Optional[int] = None,
    is_split_size: int = 5000,
    pr_k: int = 3,
    fd_method: str = "sqrtm",
    progress: bool = True,
) -> Dict[str, Any]:
    """Compute the requested metrics of ``samples`` against ``ref`` with ``extractor``.

    Args:
        samples: opened sample batch (:func:`open_samples`).
        ref: opened reference (:func:`load_reference`).
        extractor: feature network (:func:`simflow.eval.features.build_feature_extractor`).
        metrics: subset of ``("fid", "sfid", "is", "pr")``.
        batch_size: images per forward pass.
        num_samples: use only the first N samples (e.g. FID-10k of a 50k batch), default all.
        is_split_size: Inception Score split size (ADM: 5000).
        pr_k: neighbourhood size for precision/recall (ADM: 3).
        fd_method: ``"sqrtm"`` (ADM) or ``"eigh"``, see :func:`simflow.eval.metrics.frechet_distance`.
        progress: tqdm progress bars.

    Returns:
        JSON-ready dict: metric values under ``<prefix>fid``, ``<prefix>sfid``, ``<prefix>inception_score``,
        ``<prefix>inception_score_std``, ``<prefix>precision``, ``<prefix>recall`` (prefix ``""`` for Inception,
        e.g. ``"demo_"`` for demo networks); ``skipped`` (metric -> reason); ``samples``, ``reference``,
        ``feature_extractor`` and ``settings`` records.
    """
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metrics {bad}; choose from {list(METRICS)}")
    if fd_method not in FD_METHODS:
        raise ValueError(f"fd_method must be one of {FD_METHODS}; got {fd_method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    check_compatible(samples, ref, extractor)
    t0 = time.time()
    n = len(samples) if num_samples is None else min(num_samples, len(samples))
    feats = extractor.extract(
        samples.iter_batches(batch_size, limit=n), batch_size, total=n, what=samples.name, progress=progress
    )
    p = extractor.metric_prefix
    out: Dict[str, Any] = {"label": extractor.label}
    skipped: Dict[str, str] = {}
    ref_feats: Dict[str, np.ndarray] = {}
    ref_cached = (
        ref.pool_features is not None
        and ref.feature_extractor == extractor.kind
        and ref.feature_extractor_sha256 == extractor.weights_sha256
    )
    if ref_cached:
        ref_feats["pool"] = ref.pool_features
    need_pool = ("fid" in metrics and "pool" not in ref.stats) or "pr" in metrics
    need_spatial = "sfid" in metrics and "spatial" not in ref.stats and "spatial" in extractor.provides
    if ref.images is not None and ((need_pool and "pool" not in ref_feats) or need_spatial):
        ref_feats.update(
            extractor.extract(
                ref.images.iter_batches(batch_size), batch_size, total=len(ref.images), what=ref.images.name,
                progress=progress,
            )
        )
    stats_source: Dict[str, str] = {}

    def ref_stats(name: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        if name in ref.stats:  # ADM: use the file's mu/sigma when present
            stats_source[name] = "stored in reference file"
            return ref.stats[name]
        if name in ref_feats:
            stats_source[name] = "computed from reference images"
            return feature_statistics(ref_feats[name])
        return None

    for metric, name, key in (("fid", "pool", "fid"), ("sfid", "spatial", "sfid")):
        if metric not in metrics:
            continue
        if name not in extractor.provides:
            skipped[metric] = f"feature extractor {extractor.kind!r} provides no {name!r} features"
            continue
        rs = ref_stats(name)
        if rs is None:
            mk, sk = STAT_KEYS[name]
            skipped[metric] = f"reference has neither {mk!r}/{sk!r} nor images 'arr_0'"
            continue
        mu, sigma = feature_statistics(feats[name])
        if mu.shape != rs[0].shape:
            raise ReferenceError(
                f"{ref.path}: {name} statistics have dimension {rs[0].shape[0]}, features of {extractor.kind!r} "
                f"have {mu.shape[0]}"
            )
        out[p + key] = frechet_distance(mu, sigma, rs[0], rs[1], method=fd_method)
    if "is" in metrics:
        if "logits" in extractor.provides:
            out[p + "inception_score"], out[p + "inception_score_std"] = inception_score(feats["logits"], is_split_size)
        else:
            skipped["is"] = f"feature extractor {extractor.kind!r} provides no logits"
    if "pr" in metrics:
        if "pool" not in ref_feats:
            skipped["pr"] = "reference has no images 'arr_0' (or cached 'pool_features') for the k-NN manifold"
        elif min(n, len(ref_feats["pool"])) <= pr_k:
            skipped["pr"] = f"needs more than k={pr_k} images in both sets"
        else:
            out[p + "precision"], out[p + "recall"] = precision_recall(
                ref_feats["pool"], feats["pool"], k=pr_k, device=extractor.device
            )
    out["skipped"] = skipped
    out["samples"] = {
        "path": os.path.abspath(samples.path),
        "key": samples.key,
        "sha256": storage.sha256_file(samples.path),
        "num_images": n,
        "num_images_in_file": len(samples),
        "resolution": list(samples.shape[1:3]),
    }
    out["reference"] = dict(ref.describe(), stats_source=stats_source, cached_pool_features=ref_cached)
    out["feature_extractor"] = extractor.describe()
    out["settings"] = {
        "metrics": list(metrics),
        "batch_size": batch_size,
        "is_split_size": is_split_size,
        "pr_k": pr_k,
        "fd_method": fd_method,
        "device": str(extractor.device),
    }
    out["time_s"] = round(time.time() - t0, 3)
    return out


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simflow.fid",
        parents=[eval_parent_parser()],
        description="FID, sFID, Inception Score, precision and recall of an ADM-format sample batch against a "
        "reference batch (ADM evaluator conventions, torch-fidelity's TF-ported InceptionV3).",
    )
    p.add_argument("samples", help="sample batch .npz with arr_0 uint8 (N, H, W, 3)")
    p.add_argument("--ref", default=None, help="reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s)")
    p.add_argument("--config", default=None, help="YAML config whose eval.* section supplies defaults")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--metrics", default=",".join(METRICS), help="comma list of fid,sfid,is,pr")
    p.add_argument("--num-samples", type=int, default=None, help="use only the first N samples")
    p.add_argument("--is-split-size", type=int, default=None, help="Inception Score split size (ADM: 5000)")
    p.add_argument("--pr-k", type=int, default=None, help="k of the k-NN manifold for precision/recall (ADM: 3)")
    p.add_argument("--ref-resolution", type=int, default=None, help="reference side length, for stats-only files")
    p.add_argument("--ref-sha256", default=None, help="expected SHA-256 of the reference file")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m simflow.fid SAMPLES.npz --ref REF.npz --inception-weights PATH [--out metrics.json]``.

    Returns 0, or 2 with ``error: ...`` on stderr for bad input (a flag, a file or a config value, named).
    """
    args = build_parser().parse_args(argv)
    from simflow.config import ConfigError, EvalConfig, load_config

    try:
        ecfg = load_config(args.config).eval if args.config else EvalConfig()
        ref_path = args.ref or ecfg.reference
        if not ref_path:
            raise UsageError("no reference batch: pass --ref REF.npz (or set eval.reference in --config)")
        kind, weights = resolve_extractor(args, ecfg)
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        batch_size = args.batch_size or ecfg.batch_size
        for name, v in (("--batch-size", batch_size), ("--is-split-size", args.is_split_size or ecfg.is_split_size),
                        ("--pr-k", args.pr_k or ecfg.pr_k)):
            if v < 1:
                raise UsageError(f"{name} must be >= 1; got {v}")
        samples = open_samples(args.samples)
        ref = load_reference(ref_path, args.ref_resolution, args.ref_sha256)
        check_compatible(samples, ref)
        extractor = build_feature_extractor(kind, weights, device=resolve_device(args.device or ecfg.device))
        if kind == "inception" and not getattr(extractor, "published_weights", True):
            warnings.warn(
                f"{weights}: SHA-256 {extractor.weights_sha256[:16]}... is not the published TF-Inception port "
                f"(6726825d...); numbers are not comparable with papers"
            )
        result = evaluate(
            samples,
            ref,
            extractor,
            metrics=metrics,
            batch_size=batch_size,
            num_samples=args.num_samples,
            is_split_size=args.is_split_size or ecfg.is_split_size,
            pr_k=args.pr_k or ecfg.pr_k,
            fd_method=args.fd_method or ecfg.fd_method,
            progress=not args.no_progress,
        )
    except (ConfigError, NpzError, ImageFormatError, ReferenceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_result(result, args.out)
    summary = {k: v for k, v in result.items() if isinstance(v, float)}
    print(json.dumps({"label": result["label"], **summary, "skipped": result["skipped"]}, indent=2))
    return 0


__all__ = [
    "METRICS",
    "Reference",
    "ReferenceError",
    "load_reference",
    "open_samples",
    "check_compatible",
    "evaluate",
    "build_parser",
    "main",
]
