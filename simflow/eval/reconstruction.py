"""VAE reconstruction metrics on a held-out image set: PSNR and rFID (issue 7 item 4; method §9 "Reconstruction").

    python -m simflow.reconstruction --weights runs/tiny/weights.safetensors --config configs/tiny.yaml \\
        --data data/demo/demo_test.npz --inception-weights weights/weights-inception-2015-12-05-6726825d.pth

Each image ``x`` (uint8, mapped to [-1, 1] as ``x / 127.5 - 1`` like the training data, method §2) is encoded to
the posterior mean ``mu`` and decoded; by default there is no posterior noise ("noise level 0", method §9 and §12
#10: decode mu). ``--latent-noise s`` decodes ``mu + s * eps`` instead (the VAE-robustness curve, method §10.5), with
``eps`` drawn per image index from the posterior stream. Reconstructions are quantised like samples
(``uint8(clamp(127.5 x + 128, 0, 255))``, :func:`simflow.sampling.to_uint8`).

* **PSNR** (dB) on uint8 images in [0, 255]: ``10 log10(255^2 / MSE)`` per image, MSE over all pixels and channels;
  reported as the mean over images (``psnr``, the LDM / VA-VAE / REPA-E convention) and from the MSE pooled over the
  whole set (``psnr_pooled``). An exact reconstruction has MSE 0 and PSNR ``inf``.
* **rFID**: the Fréchet distance (:func:`simflow.eval.metrics.frechet_distance`) between Inception pool features of
  the originals and of the reconstructions (REPA-E / VA-VAE rFID on ImageNet val), with the evaluator's feature
  extractor (:mod:`simflow.eval.features`; weights from a local file, never downloaded).

The VAE weights are the ones in the weights file (raw VAE + EMA flow for exports, method §12 #12).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from simflow.cli import eval_parent_parser, resolve_extractor, write_result
from simflow.data.transforms import to_model_input
from simflow.eval.features import FeatureExtractor, check_images
from simflow.eval.metrics import FD_METHODS, feature_statistics, frechet_distance
from simflow.eval.reference import ImageSet
from simflow.rng import Stream, per_sample_normal
from simflow.runtime import autocast_dtype, resolve_device
from simflow.sampling import to_uint8

MAX_VALUE = 255.0


def psnr(reference: np.ndarray, test: np.ndarray, max_value: float = MAX_VALUE) -> np.ndarray:
    """Per-image peak signal-to-noise ratio ``10 log10(max_value^2 / MSE)`` in dB.

    Args:
        reference, test: images of the same shape (N, H, W, C) (or (H, W, C) for one image), any numeric dtype,
            values on the [0, ``max_value``] scale (uint8 images: 255).
        max_value: peak value (255 for uint8).

    Returns:
        float64 (N,) PSNR per image (``inf`` where the images are identical).

    Raises:
        ValueError: shapes differ.
    """
    a, b = np.asarray(reference), np.asarray(test)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(max_value**2 / mse)


def psnr_from_mse(mse: float, max_value: float = MAX_VALUE) -> float:
    """``10 log10(max_value^2 / mse)`` in dB (``inf`` for ``mse == 0``)."""
    return math.inf if mse == 0 else 10.0 * math.log10(max_value**2 / mse)


@torch.no_grad()
def reconstruct(
    vae,
    images: np.ndarray,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    latent_noise: float = 0.0,
    indices: Optional[np.ndarray] = None,
    seed: int = 0,
) -> np.ndarray:
    """Encode to the posterior mean and decode: uint8 (B, H, W, 3) -> uint8 (B, H, W, 3).

    Args:
        vae: a :class:`simflow.models.vae.VAE` in eval mode on ``device``.
        images: uint8 (B, H, W, 3) in [0, 255]; H, W divisible by the VAE's downsampling factor.
        dtype: autocast dtype of the networks (bf16 on CUDA, fp32 on CPU).
        latent_noise: ``s`` in ``z = mu + s * eps`` (0: decode mu, method §12 #10).
        indices: (B,) image indices that seed ``eps`` (needed when ``latent_noise > 0``).
        seed: seed of the ``eps`` stream.

    Returns:
        uint8 (B, H, W, 3) reconstructions, ``uint8(clamp(127.5 x + 128, 0, 255))`` of the decoded ``x`` clamped to
        [-1, 1].
    """
    check_images(images, "reconstruct input", check_range=False)
    x = to_model_input(images).to(device)
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
        mu, _ = vae.encode(x)
        z = mu.float()
        if latent_noise:
            if indices is None:
                raise ValueError("reconstruct: latent_noise > 0 needs the image indices that seed the noise")
            eps = per_sample_normal(tuple(mu.shape[1:]), seed, torch.as_tensor(indices, dtype=torch.int64),
                                    Stream.POSTERIOR).to(device)
            z = z + latent_noise * eps
        out = vae.decode(z.to(mu.dtype))
    return to_uint8(out.float().clamp(-1, 1).cpu()).numpy()


def evaluate_reconstruction(
    vae,
    images: ImageSet,
    extractor: Optional[FeatureExtractor] = None,
    batch_size: int = 50,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    latent_noise: float = 0.0,
    seed: int = 0,
    fd_method: str = "sqrtm",
    progress: bool = True,
) -> Dict[str, Any]:
    """PSNR (and rFID when ``extractor`` is given) of the VAE on an image set.

    Streams the set twice when computing rFID (features of the originals, then reconstruct + features of the
    reconstructions); memory holds one batch of images and the feature arrays.

    Args:
        vae: VAE in eval mode on ``device``.
        images: held-out set (:func:`simflow.eval.reference.open_image_set`), at the VAE's resolution.
        extractor: feature network for rFID, or None for PSNR only.
        batch_size: images per VAE / feature forward pass.
        latent_noise, seed: see :func:`reconstruct`.
        fd_method: ``"sqrtm"`` (ADM) or ``"eigh"``.

    Returns:
        JSON-ready dict: ``psnr`` (mean of per-image dB), ``psnr_pooled``, ``psnr_min``, ``psnr_max``, ``mse``
        (mean squared error on the [0, 255] scale), ``rfid`` (when an extractor is given), ``num_images``,
        ``decode`` (what was decoded), ``time_s``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if fd_method not in FD_METHODS:
        raise ValueError(f"fd_method must be one of {FD_METHODS}; got {fd_method!r}")
    t0 = time.time()
    per_image: List[np.ndarray] = []
    sq_err, count = 0.0, 0

    def recon_stream() -> Iterator[np.ndarray]:
        nonlocal sq_err, count
        offset = 0
        bar = tqdm(total=images.num_images, unit="img", desc="reconstruct", disable=not progress, file=sys.stderr)
        with bar:
            for batch in images.batches(batch_size):
                idx = np.arange(offset, offset + len(batch))
                rec = reconstruct(vae, batch, device, dtype, latent_noise, idx, seed)
                per_image.append(psnr(batch, rec))
                diff = batch.astype(np.float64) - rec.astype(np.float64)
                sq_err += float((diff**2).sum())
                count += diff.size
                offset += len(batch)
                bar.update(len(batch))
                yield rec

    out: Dict[str, Any] = {}
    if extractor is not None:
        real = extractor.extract(images.batches(batch_size), batch_size, total=images.num_images,
                                 what=images.description, progress=progress)["pool"]
        fake = extractor.extract(recon_stream(), batch_size, total=images.num_images, what="reconstructions",
                                 progress=progress)["pool"]
        if len(real) < 2:
            raise ValueError(f"{images.description}: rFID needs at least 2 images; got {len(real)}")
        mu1, s1 = feature_statistics(real)
        mu2, s2 = feature_statistics(fake)
        out[extractor.metric_prefix + "rfid"] = frechet_distance(mu1, s1, mu2, s2, method=fd_method)
        out["feature_extractor"] = extractor.describe()
    else:
        for _ in recon_stream():
            pass
    if count == 0:
        raise ValueError(f"{images.description}: no images")
    p = np.concatenate(per_image)
    mse = sq_err / count
    out.update(
        psnr=float(p.mean()),
        psnr_pooled=psnr_from_mse(mse),
        psnr_min=float(p.min()),
        psnr_max=float(p.max()),
        mse=mse,
        num_images=int(len(p)),
        decode="mu" if not latent_noise else f"mu + {latent_noise} * eps",
        time_s=round(time.time() - t0, 3),
    )
    return out


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simflow.reconstruction", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, parents=[eval_parent_parser()])
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--weights", required=True, help="exported weights (.safetensors) or a checkpoint directory")
    p.add_argument("--config", default=None, help="training config YAML or checkpoint directory")
    p.add_argument("--data", required=True,
                   help="held-out images: .npz (images or arr_0, uint8 (N, H, W, 3)) or a shard set")
    p.add_argument("--key", default=None, help="array name in an .npz (default: images, then arr_0)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--crop", action="store_true",
                   help="ADM centre-crop images to model.resolution (default: their size must equal it)")
    p.add_argument("--metrics", default="psnr,rfid", help="comma list of psnr,rfid")
    p.add_argument("--latent-noise", type=float, default=0.0, help="decode mu + s*eps (default 0: decode mu)")
    p.add_argument("--batch-size", type=int, default=50)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m simflow.reconstruction`` (:mod:`simflow.reconstruction`, console script
    ``simflow-reconstruction``); returns 0, or 2 with ``error: ...`` on stderr for bad input."""
    from simflow.config import ConfigError
    from simflow.data.loader import DataError
    from simflow.eval.features import ImageFormatError, build_feature_extractor
    from simflow.eval.npz import NpzError
    from simflow.eval.reference import open_image_set
    from simflow.checkpoint.weights import WeightsError, resolve_config
    from simflow.eval.weights import load_generator

    args = build_parser().parse_intermixed_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        bad = [m for m in metrics if m not in ("psnr", "rfid")]
        if bad or not metrics:
            raise ValueError(f"--metrics: unknown {bad or metrics}; choose from psnr, rfid")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
        if args.latent_noise < 0:
            raise ValueError(f"--latent-noise must be >= 0; got {args.latent_noise}")
        cfg = resolve_config(args.config, args.weights, args.overrides)
        res = cfg.model.resolution
        images = open_image_set(args.data, args.key, args.limit, res if args.crop else None)
        if tuple(images.resolution) != (res, res):
            raise ValueError(
                f"{args.data}: images are {images.resolution[0]}x{images.resolution[1]} but the VAE was trained at "
                f"model.resolution={res}; pass --crop to ADM centre-crop them, or use a held-out set at {res} px"
            )
        device = resolve_device(args.device or cfg.eval.device)
        extractor = None
        if "rfid" in metrics:
            kind, weights = resolve_extractor(args, cfg.eval, "rFID", hint=", or --metrics psnr")
            extractor = build_feature_extractor(kind, weights, device=device)
        model, source = load_generator(args.weights, cfg, device)
        result = evaluate_reconstruction(
            model.vae, images, extractor, args.batch_size, device, autocast_dtype(cfg, device), args.latent_noise,
            cfg.train.seed, args.fd_method or cfg.eval.fd_method, progress=not args.no_progress,
        )
    except (ConfigError, WeightsError, NpzError, ImageFormatError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(data=images.description, data_sha256=images.sha256, resolution=res, weights=source.describe(),
                  vae_weights="ema" if cfg.train.ema_vae else "raw")
    print(write_result(result, args.out))
    return 0


__all__ = ["psnr", "psnr_from_mse", "reconstruct", "evaluate_reconstruction", "build_parser", "main"]

