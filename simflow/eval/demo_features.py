"""demo-FID: a small Fashion-MNIST classifier as the feature network of FID / IS / precision-recall (issue 8).

Inception weights cannot be downloaded on the project's machines, and a FID computed with random Inception weights
says nothing about image quality. For the demo data (Fashion-MNIST padded to 32x32 RGB, :mod:`simflow.data.demo`)
a classifier trained on the real training split gives meaningful features instead. Metrics computed with it are
**demo-FID**, never Inception FID: the extractor's ``metric_prefix`` is ``"demo_"`` (keys ``demo_fid``,
``demo_inception_score``, ``demo_precision``, ...) and its ``label`` says so; reference files record the extractor
kind ``"demo_fashion_cnn"`` and its weights' SHA-256, so :func:`simflow.eval.evaluator.check_compatible` refuses to
mix its statistics with Inception's.

Network (:class:`FashionCNN`, ~0.29M parameters, ~1.1 MB in fp32)::

    uint8 (B, 3, 32, 32) -> x / 127.5 - 1
    [conv3x3 -> BN -> ReLU] x2 at 32x32 (w channels)   -> maxpool 2
    [conv3x3 -> BN -> ReLU] x2 at 16x16 (2w)           -> maxpool 2
    [conv3x3 -> BN -> ReLU] x2 at  8x8  (4w)
    global average pool -> "pool" features (B, 4w)      (FID, precision/recall; the analogue of Inception pool_3)
    dropout -> linear -> "logits" (B, 10)               (Inception Score; IS of real data is at most 10 here)

Features follow the Inception convention: the global average of the last ReLU maps (Heusel et al. 2017 use
InceptionV3 ``pool_3``), so every metric of :mod:`simflow.eval.metrics` applies unchanged.

Training (:func:`train_feature_net`, ``tools/train_feature_net.py``): AdamW with a one-cycle schedule on the 60,000
training images with random horizontal flips and +-2 px translations, scored on the 10,000 official test images.

Weights file: safetensors with the state dict and metadata (``format``, ``width``, ``num_classes``,
``test_accuracy``, ``seed``, ...); :func:`load_fashion_cnn` rebuilds the network from that metadata.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from simflow import storage
from simflow.eval.features import FeatureExtractor, WeightsNotFoundError

DEMO_KIND = "demo_fashion_cnn"
DEMO_LABEL = "demo-FID (Fashion-MNIST CNN features; NOT Inception FID, not comparable with papers)"
DEMO_PREFIX = "demo_"
WEIGHTS_FORMAT = "simflow-demo-fashion-cnn/1"
# Where tools/train_feature_net.py writes by default and where the ablation looks for the network.
DEFAULT_WEIGHTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "weights", "demo_fid",
    "fashion_cnn.safetensors",
)
ACCURACY_THRESHOLD = 0.90


class FashionCNN(nn.Module):
    """Six-conv classifier for 32x32 RGB images (see the module docstring for the layer list).

    Args:
        width: channels of the first stage ``w``; stages have ``w, 2w, 4w`` channels; features are ``4w``-d.
        num_classes: classifier outputs (10 for Fashion-MNIST).
        dropout: dropout before the linear head (training only).
    """

    def __init__(self, width: int = 32, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        if width < 1 or num_classes < 2:
            raise ValueError(f"FashionCNN: width={width} must be >= 1 and num_classes={num_classes} >= 2")
        self.width, self.num_classes = width, num_classes

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        self.stage1 = stage(3, width)
        self.stage2 = stage(width, 2 * width)
        self.stage3 = stage(2 * width, 4 * width)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4 * width, num_classes)

    @staticmethod
    def normalise(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in [0, 255] -> float32 in [-1, 1], ``x / 127.5 - 1`` (the training-data mapping,
        method §2). Float input is taken as already normalised."""
        if images.dtype == torch.uint8:
            return images.float() / 127.5 - 1.0
        return images.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: (B, 3, 32, 32) uint8 or normalised float -> (B, 4w) float32, the spatial mean of
        the last ReLU maps."""
        h = self.stage1(self.normalise(x))
        h = self.stage2(F.max_pool2d(h, 2))
        h = self.stage3(F.max_pool2d(h, 2))
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 32, 32) -> (features (B, 4w), logits (B, num_classes)), float32."""
        f = self.features(x)
        return f, self.head(self.dropout(f))


# ------------------------------------------------------------------------------------------------------------------
# data handling for training
# ------------------------------------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, g: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and integer translation by up to ``shift`` px (zero fill = the background value of
    the padded Fashion-MNIST images, -1 after normalisation). x: float (B, 3, H, W) -> same shape."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=g)
        rows = (dy[:, None] + torch.arange(h)[None]).clamp_max(h + 2 * shift - 1)  # (B, H)
        cols = (dx[:, None] + torch.arange(w)[None]).clamp_max(w + 2 * shift - 1)  # (B, W)
        bi = torch.arange(b)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return x.contiguous()


def _check_split(images: np.ndarray, labels: np.ndarray, what: str, num_classes: int) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what}: images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{what}: labels shape {labels.shape} does not match {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what}: labels span [{labels.min()}, {labels.max()}], expected [0, {num_classes})")


@torch.no_grad()
def accuracy(model: FashionCNN, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` in eval mode on uint8 (N, H, W, 3) images, int (N,) labels."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
        _, logits = model(x)
        correct += int((logits.argmax(1).numpy() == labels[i : i + batch_size]).sum())
    model.train(was)
    return correct / max(1, len(images))


def train_feature_net(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    epochs: float = 4.0,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    width: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Tuple[FashionCNN, Dict[str, Any]]:
    """Train :class:`FashionCNN` and measure its test accuracy.

    Optimiser: AdamW (``lr``, ``weight_decay``) with PyTorch's one-cycle schedule (cosine warm-up over the first
    30 % of steps, then cosine decay), cross-entropy loss, random flips and +-2 px shifts (:func:`_augment`).
    Batches are drawn from a seeded permutation per epoch, so the run is a function of ``seed`` (and the thread
    count, which can change float summation order).

    Args:
        train_images / test_images: uint8 (N, 32, 32, 3) images (the demo NPZ format).
        train_labels / test_labels: int (N,) labels in [0, 10).
        epochs: passes over the training set (fractional values give ``round(epochs * N / batch_size)`` steps).
        batch_size, lr, weight_decay, width, seed: see above.
        progress: tqdm bar on stderr.

    Returns:
        (model in eval mode, record) where record holds ``test_accuracy``, ``train_accuracy`` (on up to 10,000
        training images), ``steps``, ``epochs``, ``seconds``, the hyper-parameters and ``final_loss``.
    """
    num_classes = 10
    _check_split(train_images, train_labels, "train split", num_classes)
    _check_split(test_images, test_labels, "test split", num_classes)
    if epochs <= 0 or batch_size < 1:
        raise ValueError(f"epochs={epochs} must be > 0 and batch_size={batch_size} >= 1")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = FashionCNN(width=width, num_classes=num_classes)
    n = len(train_images)
    steps = max(1, int(round(epochs * n / batch_size)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.3)
    images_t = torch.from_numpy(train_images)  # (N, H, W, 3) uint8, shared memory
    labels_t = torch.from_numpy(train_labels.astype(np.int64))
    t0 = time.time()
    model.train()
    order = torch.randperm(n, generator=g)
    pos, loss_ema = 0, float("nan")
    bar = tqdm(range(steps), desc="feature net", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        x = _augment(FashionCNN.normalise(images_t[idx].permute(0, 3, 1, 2)), g)
        _, logits = model(x)
        loss = F.cross_entropy(logits, labels_t[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    model.eval()
    record = {
        "test_accuracy": accuracy(model, test_images, test_labels),
        "train_accuracy": accuracy(model, train_images[:10000], train_labels[:10000]),
        "steps": steps,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "width": width,
        "seed": seed,
        "num_train": n,
        "num_test": len(test_images),
        "final_loss": loss_ema,
        "seconds": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return model, record


# ------------------------------------------------------------------------------------------------------------------
# weights files
# ------------------------------------------------------------------------------------------------------------------
def save_fashion_cnn(model: FashionCNN, path: str, record: Optional[Dict[str, Any]] = None) -> str:
    """Write the network as safetensors (state dict incl. BatchNorm statistics) with metadata; returns its SHA-256.

    Metadata: ``format`` (:data:`WEIGHTS_FORMAT`), ``width``, ``num_classes`` and every entry of ``record`` as a
    JSON string under ``record``. The file is written atomically (:func:`simflow.storage.write_bytes`).
    """
    from safetensors.torch import save

    meta = {"format": WEIGHTS_FORMAT, "width": str(model.width), "num_classes": str(model.num_classes),
            "record": json.dumps(record or {}, sort_keys=True)}
    data = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, metadata=meta)
    return storage.write_bytes(path, data)


def load_fashion_cnn(path: str) -> Tuple[FashionCNN, Dict[str, Any]]:
    """Rebuild :class:`FashionCNN` from a file written by :func:`save_fashion_cnn`.

    Returns:
        (model in eval mode on CPU, record dict stored at training time).

    Raises:
        WeightsNotFoundError: no such file (message says how to create it).
        ValueError: not a demo feature-net file, or tensors that do not fit the recorded architecture.
    """
    if not path or not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"demo feature-net weights not found: {path!r}; create them with `python tools/train_feature_net.py "
            f"--out {path or DEFAULT_WEIGHTS}` (trains on the real Fashion-MNIST training split in a few minutes)"
        )
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: metadata format={meta.get('format')!r}, expected {WEIGHTS_FORMAT!r} "
                         f"(a file written by tools/train_feature_net.py)")
    model = FashionCNN(width=int(meta["width"]), num_classes=int(meta["num_classes"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensors do not fit FashionCNN(width={meta['width']}): {e}") from None
    return model.eval(), json.loads(meta.get("record", "{}"))


class DemoFashionFeatures(FeatureExtractor):
    """:class:`FashionCNN` as a :class:`~simflow.eval.features.FeatureExtractor`: ``pool`` (B, 4w) penultimate
    features and ``logits`` (B, 10). Labelled demo-FID, keys prefixed ``demo_``.

    Args:
        weights_path: file written by ``tools/train_feature_net.py``.
        device: torch device.

    Input: uint8 (B, 3, 32, 32). Other sizes are refused: the network has only seen 32x32 demo images.
    """

    kind = DEMO_KIND
    label = DEMO_LABEL
    metric_prefix = DEMO_PREFIX
    provides = ("pool", "logits")

    def __init__(self, weights_path: str, device: Union[str, torch.device] = "cpu"):
        self.net, self.record = load_fashion_cnn(weights_path)
        super().__init__(weights_path, device)
        self.net.to(self.device)

    def describe(self) -> Dict[str, object]:
        d = super().describe()
        d["test_accuracy"] = self.record.get("test_accuracy")
        return d

    def forward_batch(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """uint8 (B, 3, 32, 32) -> ``pool`` (B, 4w), ``logits`` (B, 10), float32."""
        if tuple(images.shape[2:]) != (32, 32):
            raise ValueError(f"{self.kind}: expects 32x32 images (the demo resolution); got {tuple(images.shape[2:])}")
        pool, logits = self.net(images)
        return {"pool": pool, "logits": logits}


__all__ = [
    "DEMO_KIND",
    "DEMO_LABEL",
    "DEMO_PREFIX",
    "DEFAULT_WEIGHTS",
    "ACCURACY_THRESHOLD",
    "FashionCNN",
    "DemoFashionFeatures",
    "accuracy",
    "train_feature_net",
    "save_fashion_cnn",
    "load_fashion_cnn",
]
