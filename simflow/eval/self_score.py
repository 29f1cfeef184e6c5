"""End-of-run self-scoring on the demo data: demo-FID and class accuracy of EMA samples, with and without guidance.

The trainer calls :func:`score_run` at the end of ``Trainer.fit`` when ``eval.self_score_samples > 0``
(configs/tiny.yaml sets 1,000): it loads the exported weights (EMA flow + VAE), draws ``N`` class-conditional samples (labels and noise
from (``sample.seed``, index), :mod:`simflow.sampling`) once without guidance and once with ``sample.cfg_scale`` /
``sample.cfg_mode``, and scores them with the shipped demo feature network (:mod:`simflow.eval.demo_features`,
docs/demo_fid.md) against the test split:

* ``demo_fid``: Fréchet distance of the network's 128-d pool features (Heusel et al. 2017, arXiv 1706.08500;
  :func:`simflow.eval.metrics.frechet_distance`) between the samples and all test images. **Not Inception FID**:
  another feature space, another scale; 1,000 perfect samples score about 0.15 (the finite-sample floor).
* ``class_accuracy``: share of samples the network classifies as their conditioning label (it is 92.5% accurate on
  real test images), i.e. how well class conditioning works.

Writes ``<run dir>/eval.json`` and returns one printable line. Standalone: ``python -m simflow.self_score
--config C --weights W`` (weights file or checkpoint step directory) scores any run; ``tools/convergence.py`` uses it.
Runs on one process (rank 0 in a distributed run, after the other ranks finished their collectives).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from simflow import storage
from simflow.eval.demo_features import DEFAULT_WEIGHTS, DemoFashionFeatures
from simflow.eval.metrics import feature_statistics, frechet_distance
from simflow.eval.weights import load_generator

EVAL_JSON = "eval.json"
NOTE = ("demo-FID = Frechet distance of the Fashion-MNIST CNN features (weights/demo_fid, docs/demo_fid.md) between "
        "the samples and the test split; it is NOT Inception FID and not comparable with published FIDs. 1,000 real "
        "training images score 0.151 against the same reference (the finite-sample floor).")
FLOOR_1000 = 0.151  # docs/demo_fid.md: first 1,000 training images vs the 10,000 test images


class DemoReference:
    """Feature statistics of real reference images (the test split) for the demo network.

    Args:
        images: uint8 (N, 32, 32, 3) real images, N >= 2.
        extractor: the demo feature network.
        path: where the images came from (for the record).
        batch_size: images per forward pass.
    """

    def __init__(self, images: np.ndarray, extractor: DemoFashionFeatures, path: str = "", batch_size: int = 500):
        if len(images) < 2:
            raise ValueError(f"DemoReference: need >= 2 reference images, got {len(images)} ({path})")
        feats = extractor.extract(images, batch_size=batch_size, progress=False)
        self.path = path
        self.num_images = int(len(images))
        self.mu, self.sigma = feature_statistics(feats["pool"])
        self.extractor = extractor
        self.batch_size = batch_size

    @classmethod
    def from_npz(cls, test_npz: str, extractor: DemoFashionFeatures, batch_size: int = 500) -> "DemoReference":
        """From a demo-format NPZ (``images``, ``labels``), e.g. ``data/demo/demo_test.npz``.

        Raises:
            FileNotFoundError / ValueError (from :func:`simflow.data.demo.load_npz`) naming the file and key.
        """
        from simflow.data.demo import load_npz

        return cls(load_npz(test_npz)["images"], extractor, test_npz, batch_size)


def score_images(images: np.ndarray, labels: np.ndarray, ref: DemoReference) -> Dict[str, float]:
    """demo-FID against the reference and class accuracy of ``images``.

    Args:
        images: uint8 (N, 32, 32, 3), N >= 2; labels: int (N,) the classes the images should show.
    Returns:
        ``demo_fid`` (float, >= 0) and ``class_accuracy`` (in [0, 1]).
    Raises:
        ValueError: mismatched lengths or fewer than 2 images.
    """
    if len(images) != len(labels) or len(images) < 2:
        raise ValueError(f"score_images: {len(images)} images vs {len(labels)} labels (need the same, >= 2)")
    feats = ref.extractor.extract(images, batch_size=ref.batch_size, progress=False)
    mu, sigma = feature_statistics(feats["pool"])
    return {
        "demo_fid": float(frechet_distance(mu, sigma, ref.mu, ref.sigma)),
        "class_accuracy": float((feats["logits"].argmax(1) == np.asarray(labels)).mean()),
    }


@torch.no_grad()
def sample_set(model, num_samples: int, sample_cfg, batch_size: int, device: torch.device):
    """Samples ``0 .. num_samples-1`` of :mod:`simflow.sampling` (EMA flow as loaded): (uint8 (N, H, W, 3), (N,))."""
    from simflow.sampling import sample_images, sample_labels, to_uint8

    out, labs = [], []
    for lo in range(0, num_samples, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, num_samples), dtype=torch.int64)
        y = sample_labels(model.flow.num_classes, sample_cfg.seed, idx)
        out.append(to_uint8(sample_images(model, idx, y, sample_cfg, device)).numpy())
        labs.append(y.numpy())
    return np.concatenate(out), np.concatenate(labs)


def score_model(model, cfg, ref: DemoReference, num_samples: int, cfg_scales: Sequence[float],
                device: torch.device = torch.device("cpu")) -> Dict[str, Dict[str, float]]:
    """Scores of ``num_samples`` samples per guidance scale (``sample.cfg_mode``; 0 = no guidance).

    Returns:
        ``{"<w>": {"demo_fid", "class_accuracy", "seconds"}}`` keyed by the scale formatted with ``%g``.
    """
    model.eval()
    out: Dict[str, Dict[str, float]] = {}
    for w in cfg_scales:
        t0 = time.time()
        scfg = dataclasses.replace(cfg.sample, cfg_scale=float(w))
        images, labels = sample_set(model, num_samples, scfg, cfg.sample.batch_size, device)
        out[f"{float(w):g}"] = {**score_images(images, labels, ref), "seconds": round(time.time() - t0, 1)}
    return out


def score_run(weights: str, cfg, out_dir: Optional[str], step: Optional[int] = None,
              device: torch.device = torch.device("cpu")) -> Dict[str, Any]:
    """Score exported weights (or a checkpoint step) as configured in ``cfg.eval``; write ``out_dir/eval.json``.

    Returns:
        the eval.json record (``demo_fid_no_cfg``, ``class_accuracy_no_cfg``, ``demo_fid_cfg``,
        ``class_accuracy_cfg``, ``cfg_scale``, ``cfg_mode``, ``num_samples``, ``note``, ``line``...), or a record with
        ``skipped`` (the reason) when the test split or the feature network is missing (nothing is raised then:
        the run itself succeeded).
    """
    n = int(cfg.eval.self_score_samples)
    test_npz = cfg.eval.self_score_test
    ext_weights = cfg.eval.extractor_weights or DEFAULT_WEIGHTS
    missing = [f"{key}={path}" for key, path in (("eval.self_score_test", test_npz),
                                                 ("eval.extractor_weights", ext_weights)) if not os.path.isfile(path)]
    if missing:
        rec: Dict[str, Any] = {"skipped": f"file not found: {', '.join(missing)}", "note": NOTE}
        rec["line"] = f"self-score skipped: {rec['skipped']}"
    else:
        t0 = time.time()
        extractor = DemoFashionFeatures(ext_weights, device=device)
        ref = DemoReference.from_npz(test_npz, extractor)
        model, _ = load_generator(weights, cfg, device=device, use_ema=True)
        w = float(cfg.sample.cfg_scale)
        scores = score_model(model, cfg, ref, n, [0.0] + ([w] if w != 0 else []), device)
        guided = scores[f"{w:g}"]
        rec = {
            "step": step,
            "weights": weights,
            "num_samples": n,
            "reference": f"{test_npz} ({ref.num_images} images)",
            "feature_network": extractor.describe(),
            "cfg_mode": cfg.sample.cfg_mode,
            "cfg_scale": w,
            "demo_fid_no_cfg": scores["0"]["demo_fid"],
            "class_accuracy_no_cfg": scores["0"]["class_accuracy"],
            "demo_fid_cfg": guided["demo_fid"],
            "class_accuracy_cfg": guided["class_accuracy"],
            "demo_fid_floor_1000_real": FLOOR_1000,
            "scores": scores,
            "seconds": round(time.time() - t0, 1),
            "note": NOTE,
        }
        rec["line"] = (f"self-score (EMA, {n} samples vs {ref.num_images} test images): with CFG {w:g} "
                       f"{cfg.sample.cfg_mode}: demo-FID {rec['demo_fid_cfg']:.2f}, class accuracy "
                       f"{rec['class_accuracy_cfg']:.3f}; without CFG: demo-FID {rec['demo_fid_no_cfg']:.2f}, class "
                       f"accuracy {rec['class_accuracy_no_cfg']:.3f} (demo-FID is NOT Inception FID; real-data "
                       f"floor {FLOOR_1000})")
    if out_dir:
        path = os.path.join(out_dir, EVAL_JSON)
        storage.write_bytes(path, json.dumps(rec, indent=2, default=str).encode())
        rec["line"] += f" -> {path}"
    return rec


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m simflow.self_score --config C --weights W [--out DIR] [key=value ...]``."""
    from simflow.config import ConfigError, load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--weights", required=True, help="weights.safetensors or a checkpoint step directory")
    p.add_argument("--out", default=None, help="folder for eval.json (default: none, print only)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.eval.self_score_samples <= 0:
        print("config error: eval.self_score_samples must be > 0", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rec = score_run(args.weights, cfg, args.out)
    print(rec["line"])
    return 0

