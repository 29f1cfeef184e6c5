"""Evaluation of one trained generator on held-out images: flow NLL in bits/dim, class-conditional samples, and
their demo-FID / IS / precision-recall scores (the per-variant numbers of the variant study, method §10.3).

* :func:`heldout_nll`: flow NLL of posterior latents of held-out images (method §4.4);
* :func:`generate`: class-conditional samples for indices ``0..N-1`` (labels and noise from (seed, index));
* :func:`score_samples`: FID (Heusel et al. 2017, arXiv 1706.08500), IS (Salimans et al. 2016, arXiv 1606.03498),
  precision/recall (Kynkäänniemi et al. 2019, arXiv 1904.06991) of a sample set against reference statistics;
* :func:`evaluate_generator`: all of the above plus VAE reconstruction (:mod:`simflow.eval.reconstruction`).

The study that trains the generators and writes the report lives in ``tools/ablation/`` (driven by
``tools/ablate.py``); this module never trains.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from simflow.data.transforms import to_model_input
from simflow.eval.features import FeatureExtractor
from simflow.eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from simflow.rng import Stream, per_sample_normal
from simflow.sampling import sample_images, sample_labels, save_grid, to_uint8

LOG2 = math.log(2.0)
LOG_2PI = math.log(2.0 * math.pi)


@torch.no_grad()
def heldout_nll(model, images: np.ndarray, labels: np.ndarray, seed: int = 0, batch_size: int = 250,
                device: torch.device = torch.device("cpu")) -> Dict[str, float]:
    """Flow NLL of posterior latents of held-out images, conditional on their true labels (method §4.4).

    For each image ``x_i`` (index ``i`` seeds the noise): ``z = mu + std * eps`` (the posterior sample the flow is
    trained on, method §3.2), plus ``noise_std * eps'`` when ``model.flow.noise_std > 0``; then
    ``-log p(z | y) / d`` from the flow's exact change of variables.

    Args:
        model: :class:`~simflow.models.simflow.SimFlowModel` in eval mode on ``device``.
        images: uint8 (N, H, W, 3); labels: int (N,) class labels.
        seed: seed of the per-image noise streams.

    Returns:
        ``bits_per_dim`` and ``nats_per_dim`` (means over images, including the 1/2 log 2 pi constant),
        ``posterior_std`` (mean std of the latent noise: the fixed std, or mean exp(logvar/2) (+ noise) for learned
        posteriors), ``latent_rms`` (RMS of ``mu``), ``bound_bits_per_dim`` (the entropy bound 1/2 log2(2 pi e s^2)
        of method §4.4 for a fixed std s, else None) and ``num_images``.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"heldout_nll: {len(images)} images vs {len(labels)} labels (need the same, > 0)")
    vae, flow = model.vae, model.flow
    noise_std = float(model.cfg.model.flow.noise_std)
    shape = tuple(model.latent_shape)
    nll_sum, std_sum, mu_sq, count = 0.0, 0.0, 0.0, 0
    for lo in range(0, len(images), batch_size):
        idx = torch.arange(lo, min(lo + batch_size, len(images)), dtype=torch.int64)
        x = to_model_input(images[lo : lo + batch_size]).to(device)
        y = torch.as_tensor(labels[lo : lo + batch_size], dtype=torch.int64, device=device)
        mu, logvar = vae.encode(x)
        eps = per_sample_normal(shape, seed, idx, Stream.POSTERIOR).to(device)
        z = vae.reparameterize(mu, logvar, eps)
        std = vae.posterior_std(logvar)
        var = (std if isinstance(std, float) else std.float()) ** 2
        if noise_std > 0:
            z = z + noise_std * per_sample_normal(shape, seed, idx, Stream.LATENT_NOISE).to(device)
            var = var + noise_std**2
        flow_z, log_det, _ = flow(z, y)
        nll_sum += float(flow.nll_loss(flow_z, log_det).double().sum())
        std_sum += float(torch.as_tensor(var).sqrt().mean()) * len(idx)
        mu_sq += float(mu.float().pow(2).mean()) * len(idx)
        count += len(idx)
    nats = nll_sum / count + 0.5 * LOG_2PI
    bound = None
    if model.cfg.model.vae.posterior == "fixed":
        s2 = float(model.cfg.model.vae.posterior_std) ** 2 + noise_std**2
        bound = 0.5 * math.log2(2 * math.pi * math.e * s2)
    return {
        "bits_per_dim": nats / LOG2,
        "nats_per_dim": nats,
        "posterior_std": std_sum / count,
        "latent_rms": math.sqrt(mu_sq / count),
        "bound_bits_per_dim": bound,
        "num_images": count,
    }


@torch.no_grad()
def generate(model, num_samples: int, sample_cfg, batch_size: int = 500,
             device: torch.device = torch.device("cpu")) -> Tuple[np.ndarray, np.ndarray]:
    """Class-conditional samples for indices ``0..num_samples-1`` (labels and noise from (seed, index), design.md).

    Args:
        model: generator in eval mode; sample_cfg: :class:`simflow.config.SampleConfig` (CFG scale/mode, seed,
            temperature).

    Returns:
        (uint8 (N, H, W, 3) images, int64 (N,) labels).
    """
    out, labs = [], []
    for lo in range(0, num_samples, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, num_samples), dtype=torch.int64)
        y = sample_labels(model.flow.num_classes, sample_cfg.seed, idx)
        x = sample_images(model, idx, y, sample_cfg, device)
        out.append(to_uint8(x).numpy())
        labs.append(y.numpy())
    return np.concatenate(out), np.concatenate(labs)


def score_samples(images: np.ndarray, extractor: FeatureExtractor, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                  ref_features: Optional[np.ndarray] = None, pr_k: int = 3,
                  labels: Optional[np.ndarray] = None) -> Dict[str, float]:
    """demo-gFID (Fréchet distance of pool features, Heusel et al. 2017), demo-IS (one split over all images,
    Salimans et al. 2016) and, given reference features, precision/recall (Kynkäänniemi et al. 2019, k=``pr_k``).
    With ``labels``, also ``class_accuracy``: the share of samples the feature network classifies as their
    conditioning label (how well class conditioning works).

    Args:
        images: uint8 (N, H, W, 3); ref_mu/ref_sigma: float64 (D,), (D, D) reference statistics;
        ref_features: float (N_ref, D) reference pool features or None.

    Returns:
        dict with ``<prefix>fid``, ``<prefix>inception_score``, optional ``<prefix>precision``/``<prefix>recall``
        and ``class_accuracy`` (prefix ``demo_`` for the demo network).
    """
    feats = extractor.extract(images, batch_size=500, progress=False)
    mu, sigma = feature_statistics(feats["pool"])
    p = extractor.metric_prefix
    out = {p + "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma)}
    if "logits" in feats:
        out[p + "inception_score"] = inception_score(feats["logits"], split_size=len(images))[0]
        if labels is not None:
            out["class_accuracy"] = float((feats["logits"].argmax(1) == labels).mean())
    if ref_features is not None:
        out[p + "precision"], out[p + "recall"] = precision_recall(ref_features, feats["pool"], k=pr_k)
    return out


def evaluate_generator(
    model,
    extractor: FeatureExtractor,
    reference: Dict[str, np.ndarray],
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_samples: int,
    cfg_scales: Sequence[float],
    sample_seed: int = 0,
    noise_seed: int = 0,
    out_dir: Optional[str] = None,
    device: torch.device = torch.device("cpu"),
) -> Dict[str, Any]:
    """All per-variant numbers of the study for one trained generator.

    Args:
        model: :class:`~simflow.models.simflow.SimFlowModel` (EMA flow, raw VAE) in eval mode.
        extractor: demo feature network.
        reference: ``mu``, ``sigma`` (and ``pool_features``) of the test split (``tools/fid_ref.py`` format).
        test_images / test_labels: held-out uint8 (M, H, W, 3) images and labels for reconstruction and NLL.
        num_samples: samples per guidance setting for demo-gFID.
        cfg_scales: guidance scales w > 0 to sweep (``model.cfg.sample.cfg_mode``); w = 0 is always evaluated.
        sample_seed: seed of the sample noise and labels; noise_seed: seed of the posterior noise for the NLL.
        out_dir: where to write sample grids (``samples_cfg<w>.png``), or None.

    Returns:
        dict: ``reconstruction`` (psnr, demo_rfid, ...), ``nll`` (:func:`heldout_nll`), ``samples`` (scale ->
        scores), ``gfid_no_cfg``, ``gfid_best_cfg``, ``best_cfg_scale``, ``eval_seconds``.
    """
    from simflow.eval.reconstruction import evaluate_reconstruction
    from simflow.eval.reference import ImageSet

    t0 = time.time()

    class _Arrays(ImageSet):
        def __init__(self, images: np.ndarray):
            self.images, self.num_images = images, len(images)
            self.resolution = tuple(images.shape[1:3])
            self.description = f"held-out test images ({len(images)})"

        def batches(self, batch_size: int):
            for lo in range(0, self.num_images, batch_size):
                yield self.images[lo : lo + batch_size]

    rec = evaluate_reconstruction(model.vae, _Arrays(test_images), extractor, batch_size=250, device=device,
                                  progress=False)
    rec.pop("feature_extractor", None)
    nll = heldout_nll(model, test_images, test_labels, seed=noise_seed, device=device)
    samples: Dict[str, Dict[str, float]] = {}
    scales = [0.0] + [float(w) for w in cfg_scales if w != 0]
    for w in scales:
        scfg = dataclasses.replace(model.cfg.sample, cfg_scale=w, seed=sample_seed, temperature=1.0)
        ts = time.time()
        images, labels = generate(model, num_samples, scfg, device=device)
        scores = score_samples(images, extractor, reference["mu"], reference["sigma"],
                               reference.get("pool_features"), labels=labels)
        scores["seconds"] = round(time.time() - ts, 1)
        samples[f"{w:g}"] = scores
        if out_dir:
            per_class = [np.flatnonzero(labels == c)[:4] for c in range(model.flow.num_classes)]
            order = [p[j] for j in range(4) for p in per_class if j < len(p)]  # rows of one sample per class
            grid = torch.from_numpy(images[order]).permute(0, 3, 1, 2).float() / 127.5 - 1
            save_grid(grid, os.path.join(out_dir, f"samples_cfg{w:g}.png"), nrow=model.flow.num_classes)
    key = extractor.metric_prefix + "fid"
    guided = {w: s for w, s in samples.items() if float(w) != 0}
    best = min(guided, key=lambda w: guided[w][key]) if guided else "0"
    return {
        "reconstruction": rec,
        "nll": nll,
        "samples": samples,
        "gfid_no_cfg": samples["0"][key],
        "gfid_best_cfg": samples[best][key],
        "best_cfg_scale": float(best),
        "num_samples": num_samples,
        "num_heldout": len(test_images),
        "eval_seconds": round(time.time() - t0, 1),
    }


__all__ = ["heldout_nll", "generate", "score_samples", "evaluate_generator"]
