"""Feature extractors for sample-quality metrics: one interface, several networks.

A :class:`FeatureExtractor` maps uint8 images ``(N, H, W, 3)`` (the ADM sample format) to a dict of float32 feature
arrays, by name:

* ``"pool"``: (N, D) global features, used for the Fréchet distance and precision/recall;
* ``"logits"``: (N, K) class logits, used for the Inception Score (optional);
* ``"spatial"``: (N, Ds) spatial features, used for sFID (optional).

Implementations:

* :class:`InceptionV3Features` (``"inception"``): torch-fidelity's port of the TensorFlow 2015-12-05 InceptionV3
  graph that ADM, TTUR and the papers use, loaded from a weights file the user gives (never downloaded).
* Other networks subclass :class:`FeatureExtractor` and are named in the registry (:func:`register_feature_extractor`,
  a factory or a lazy ``"package.module:Factory"`` string); ``python -m simflow.fid --extractor NAME`` then finds
  them. Issue 8's Fashion-MNIST classifier (reported as "demo-FID") is registered that way as ``"demo"`` /
  ``"demo_fashion_cnn"``: its module is imported only when one of those names is built. Each
  extractor carries a ``metric_prefix`` (``""`` for Inception, e.g. ``"demo_"`` otherwise) that prefixes every metric
  key it produces, so demo numbers cannot be mistaken for Inception FIDs.

Input checking (:func:`check_images`) rejects anything but uint8 channels-last RGB with a message that says what was
expected and how to convert (DiT quantisation ``clamp(127.5 x + 128, 0, 255)`` for images ``x`` in [-1, 1]).
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import os
import sys
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from simflow import storage

FEATURE_NAMES = ("pool", "logits", "spatial")
QUANTISATION_HINT = (
    "convert images x in [-1, 1] with np.clip(np.floor(127.5 * x + 128), 0, 255).astype(np.uint8) "
    "(the ADM convention), or images in [0, 1] with np.clip(np.round(255 * x), 0, 255).astype(np.uint8)"
)


class ImageFormatError(ValueError):
    """Images are not uint8 (N, H, W, 3). The message says what was found and what was expected."""


class WeightsNotFoundError(FileNotFoundError):
    """A feature network's weights file is missing. The message names the file and what it should contain."""


def check_images(images: np.ndarray, what: str = "images", check_range: bool = True) -> None:
    """Reject anything that is not a uint8 channels-last RGB image batch.

    Args:
        images: the array to check; expected uint8 (N, H, W, 3) with values in [0, 255].
        what: how the array is named in error messages (a file and key, e.g. ``"samples.npz['arr_0']"``).
        check_range: also reject uint8 arrays whose values all lie in {0, 1} (images in [0, 1] or [-1, 1] cast to
            uint8 without scaling).

    Raises:
        ImageFormatError: wrong type, dtype, rank, channel count or value range; the message states the expected
            format and how to convert.
    """
    expected = "expected a uint8 array of shape (N, H, W, 3) with values in [0, 255]"
    if not isinstance(images, np.ndarray):
        raise ImageFormatError(f"{what}: {expected}; got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.dtype != np.uint8:
        detail = f"dtype {images.dtype}"
        if images.dtype.kind == "f" and images.size:
            lo, hi = float(np.nanmin(images)), float(np.nanmax(images))
            detail += f" with values in [{lo:.3g}, {hi:.3g}]"
            if lo >= -1.0 - 1e-6 and hi <= 1.0 + 1e-6:
                detail += " (looks like [-1, 1] or [0, 1] model output, not quantised)"
        raise ImageFormatError(f"{what}: {expected}; got {detail}, shape {shape}. Quantise first: {QUANTISATION_HINT}")
    if images.ndim != 4:
        raise ImageFormatError(f"{what}: {expected}; got shape {shape} ({images.ndim}-D)")
    if shape[-1] != 3:
        if shape[1] == 3:
            raise ImageFormatError(
                f"{what}: {expected}; got shape {shape}, which looks channels-first (N, 3, H, W): "
                f"use images.transpose(0, 2, 3, 1)"
            )
        hint = " (grayscale: use np.repeat(images, 3, axis=-1))" if shape[-1] == 1 else ""
        raise ImageFormatError(f"{what}: {expected}; got {shape[-1]} channels in shape {shape}{hint}")
    if shape[0] < 1 or shape[1] < 1 or shape[2] < 1:
        raise ImageFormatError(f"{what}: {expected}; got an empty array of shape {shape}")
    if check_range and int(images.max()) <= 1:
        raise ImageFormatError(
            f"{what}: all values are 0 or 1 (max {int(images.max())}), which looks like images in [0, 1] or [-1, 1] "
            f"cast to uint8 without scaling; {expected}. {QUANTISATION_HINT}"
        )


class FeatureExtractor(abc.ABC):
    """A frozen network that turns uint8 images into feature vectors for the metrics of :mod:`simflow.eval.metrics`.

    Subclasses set the class attributes and implement :meth:`forward_batch`; :meth:`extract` does input checking,
    batching, device transfer and the progress bar.

    Attributes:
        kind: registry name (``"inception"``, ...).
        label: human-readable metric family, e.g. ``"FID (Inception-V3, ADM)"`` or ``"demo-FID"``.
        metric_prefix: prepended to every metric key this extractor yields (``""`` or ``"demo_"``).
        provides: which of ``"pool"``, ``"logits"``, ``"spatial"`` :meth:`forward_batch` returns.
        weights_path / weights_sha256: the file the network was loaded from and its SHA-256.
        device: where the network runs.
    """

    kind: str = ""
    label: str = ""
    metric_prefix: str = ""
    provides: Tuple[str, ...] = ("pool",)

    def __init__(self, weights_path: str, device: Union[str, torch.device] = "cpu"):
        self.weights_path = os.path.abspath(weights_path)
        self.weights_sha256 = storage.sha256_file(weights_path)
        self.device = torch.device(device)

    @abc.abstractmethod
    def forward_batch(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Features of one batch.

        Args:
            images: uint8 (B, 3, H, W) on ``self.device``, values 0..255.

        Returns:
            dict with the keys in ``provides``: float32 ``pool`` (B, D), ``logits`` (B, K), ``spatial`` (B, Ds).
        """

    def describe(self) -> Dict[str, object]:
        """JSON-ready description: kind, label, weights path and SHA-256."""
        return {
            "kind": self.kind,
            "label": self.label,
            "metric_prefix": self.metric_prefix,
            "weights": self.weights_path,
            "weights_sha256": self.weights_sha256,
        }

    @contextlib.contextmanager
    def _exact_math(self) -> Iterator[None]:
        """Disable TF32 on CUDA while extracting, so GPU features match CPU/TensorFlow float32 features."""
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    @torch.no_grad()
    def extract(
        self,
        images: Union[np.ndarray, Iterable[np.ndarray]],
        batch_size: int = 100,
        total: Optional[int] = None,
        what: str = "images",
        progress: bool = True,
    ) -> Dict[str, np.ndarray]:
        """Features of a whole image set.

        Args:
            images: uint8 (N, H, W, 3) array, or an iterable of such arrays (batches of any size, e.g. streamed from
                an NPZ by :class:`simflow.eval.npz.NpzArray`); all must share H and W.
            batch_size: images per forward pass.
            total: number of images, for the progress bar when ``images`` is an iterable.
            what: name used in error messages.
            progress: show a tqdm bar (images/s) on stderr.

        Returns:
            dict name -> float32 array (N, dim) for each name in ``provides``, rows in input order.

        Raises:
            ImageFormatError: a batch is not uint8 (N, H, W, 3), sizes differ between batches, or every value is
                0 or 1 (unscaled [0, 1] / [-1, 1] images).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if isinstance(images, np.ndarray):
            check_images(images, what)
            total = images.shape[0]
            chunks: Iterable[np.ndarray] = (images[i : i + batch_size] for i in range(0, total, batch_size))
        else:
            chunks = images
        out: Dict[str, List[np.ndarray]] = {k: [] for k in self.provides}
        hw: Optional[Tuple[int, int]] = None
        max_value = 0
        bar = tqdm(total=total, unit="img", desc=f"{self.kind} features", disable=not progress, file=sys.stderr)
        with self._exact_math(), bar:
            for chunk in chunks:
                check_images(chunk, what, check_range=False)
                if hw is None:
                    hw = chunk.shape[1:3]
                elif chunk.shape[1:3] != hw:
                    raise ImageFormatError(f"{what}: image size changed from {hw} to {chunk.shape[1:3]} mid-stream")
                max_value = max(max_value, int(chunk.max()))
                for i in range(0, chunk.shape[0], batch_size):
                    x = torch.from_numpy(np.ascontiguousarray(chunk[i : i + batch_size])).to(self.device)
                    feats = self.forward_batch(x.permute(0, 3, 1, 2))
                    for k in self.provides:
                        out[k].append(feats[k].float().cpu().numpy())
                    bar.update(x.shape[0])
        if hw is None:
            raise ImageFormatError(f"{what}: no images")
        if max_value <= 1:
            raise ImageFormatError(
                f"{what}: all values are 0 or 1, which looks like images in [0, 1] or [-1, 1] cast to uint8 without "
                f"scaling. {QUANTISATION_HINT}"
            )
        return {k: np.concatenate(v, axis=0) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------------------
# InceptionV3 (TensorFlow 2015-12-05 graph, as ported by torch-fidelity)
# ------------------------------------------------------------------------------------------------------------------
INCEPTION_WEIGHTS_HELP = (
    "the TensorFlow InceptionV3 (2015-12-05) FID weights in PyTorch format, as released by torch-fidelity "
    "('weights-inception-2015-12-05-6726825d.pth') or pytorch-fid ('pt_inception-2015-12-05-6726825d.pth'); "
    "nothing is downloaded at run time: fetch it on a machine with network access and pass its path "
    "(--inception-weights / eval.inception_weights)"
)
# torch.hub file-name convention: the suffix is the start of the file's SHA-256.
INCEPTION_PUBLISHED_SHA256_PREFIX = "6726825d"
# ADM's sFID layer: TF tensor 'mixed_6/conv:0' = ReLU output of the 1x1 branch of the 7th mixed block, which
# torch-fidelity's weight converter maps to Mixed_6d.branch1x1 ('mixed_6/conv/*' -> 'Mixed_6d.branch1x1.*').
SFID_MODULE = "Mixed_6d.branch1x1"
SFID_CHANNELS = 7  # ADM keeps spatial[..., :7] of the 17x17x192 map -> 7*17*17 = 2023 dims


def _inception_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def load_inception_v3(weights_path: str) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (TF-compatible InceptionV3) loaded from a local file.

    The network resizes any input to 299x299 with TF1-compatible bilinear interpolation and maps uint8 x to
    (x - 128) / 128, as the TF graph used by TTUR and ADM does.

    Args:
        weights_path: a state dict file (``torch.save``) with torch-fidelity's key names.

    Returns:
        the module in eval mode on CPU, requesting features ``"2048"`` (pool_3) and ``"logits_unbiased"``.

    Raises:
        WeightsNotFoundError: the file does not exist (message names it and says what it should be).
        ValueError: the file is not a matching state dict.
    """
    if not weights_path or not os.path.isfile(weights_path):
        raise WeightsNotFoundError(f"InceptionV3 weights file not found: {weights_path!r}; expected {INCEPTION_WEIGHTS_HELP}")
    cls = _inception_class()
    try:
        net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path)
    except (RuntimeError, KeyError, EOFError, OSError) as e:
        raise ValueError(f"{weights_path}: not a usable InceptionV3 state dict ({INCEPTION_WEIGHTS_HELP}): {e}") from None
    return net.eval()


class InceptionV3Features(FeatureExtractor):
    """ADM-convention Inception features: pool_3 (2048), bias-free logits (1008) and sFID spatial features (2023).

    * ``pool``: torch-fidelity feature ``"2048"`` = TF ``pool_3:0`` (FID, precision/recall; Heusel et al. 2017).
    * ``logits``: torch-fidelity ``"logits_unbiased"`` = ``pool_3 @ W`` without the bias, which is what ADM's
      ``_create_softmax_graph`` feeds to the softmax for the Inception Score (arXiv 2105.05233 evaluator).
    * ``spatial``: torch-fidelity does not expose TF ``mixed_6/conv:0``; a forward hook on ``Mixed_6d.branch1x1``
      (the converter's mapping of ``mixed_6/conv``) captures its (B, 192, 17, 17) ReLU output, keeps channels 0..6
      and flattens in TF's (H, W, C) order, so the 2023-d vectors line up with ADM reference ``mu_s``/``sigma_s``.

    Args:
        weights_path: local weights file (see :data:`INCEPTION_WEIGHTS_HELP`).
        device: torch device.
    """

    kind = "inception"
    label = "FID (InceptionV3 TF-2015-12-05, ADM convention)"
    metric_prefix = ""
    provides = ("pool", "logits", "spatial")

    def __init__(self, weights_path: str, device: Union[str, torch.device] = "cpu"):
        self.net = load_inception_v3(weights_path)
        super().__init__(weights_path, device)
        self.net.to(self.device)
        self._spatial: Optional[torch.Tensor] = None
        self.net.get_submodule(SFID_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        # (B, 192, 17, 17) -> first 7 channels -> (B, 17, 17, 7) -> (B, 2023), TF NHWC flattening order.
        self._spatial = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).clone()

    @property
    def published_weights(self) -> bool:
        """True when the weights file's SHA-256 starts with the hash in the published file names (6726825d)."""
        return self.weights_sha256.startswith(INCEPTION_PUBLISHED_SHA256_PREFIX)

    def describe(self) -> Dict[str, object]:
        d = super().describe()
        d["published_weights"] = self.published_weights
        return d

    def forward_batch(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """uint8 (B, 3, H, W) -> ``pool`` (B, 2048), ``logits`` (B, 1008), ``spatial`` (B, 2023), float32."""
        self._spatial = None
        pool, logits = self.net(images)
        if self._spatial is None:  # pragma: no cover - the hook always fires when the forward pass reaches Mixed_6d
            raise RuntimeError(f"forward hook on {SFID_MODULE} did not run")
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "logits": logits, "spatial": spatial}


# ------------------------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------------------------
ExtractorFactory = Callable[..., FeatureExtractor]
_DEMO = "simflow.eval.demo_features:DemoFashionFeatures"  # imported on first use, never by `import simflow.eval`
_REGISTRY: Dict[str, Union[ExtractorFactory, str]] = {"inception": InceptionV3Features, "demo": _DEMO,
                                                      "demo_fashion_cnn": _DEMO}


def register_feature_extractor(kind: str, factory: Union[ExtractorFactory, str]) -> None:
    """Make ``factory(weights_path, device=...)`` available as ``build_feature_extractor(kind, ...)`` and
    ``python -m simflow.fid --extractor kind``. ``factory`` may be a ``"package.module:Factory"`` string, imported
    only when ``kind`` is built. Re-registering a name replaces it."""
    _REGISTRY[kind] = factory


def _import_factory(kind: str, spec: str) -> ExtractorFactory:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"feature extractor {kind!r}: cannot import {attr!r} from {module!r} ({e})") from None


def available_feature_extractors() -> Sequence[str]:
    """Registered extractor kinds."""
    return tuple(sorted(_REGISTRY))


def build_feature_extractor(kind: str, weights_path: str, device: Union[str, torch.device] = "cpu") -> FeatureExtractor:
    """Build a registered extractor.

    Args:
        kind: registry name, e.g. ``"inception"``, or ``"package.module:Factory"`` for an unregistered network
            (``Factory(weights_path, device=...)`` must return a :class:`FeatureExtractor`).
        weights_path: the network's local weights file.
        device: torch device.

    Raises:
        ValueError: unknown kind (the message lists the registered ones).
        WeightsNotFoundError: missing weights file.
    """
    factory = _REGISTRY.get(kind, kind if ":" in kind else None)  # an unregistered "package.module:Factory" too
    if factory is None:
        raise ValueError(
            f"unknown feature extractor {kind!r}; registered: {list(available_feature_extractors())} "
            f"(or give 'package.module:FactoryName')"
        )
    if isinstance(factory, str):
        factory = _import_factory(kind, factory)
    return factory(weights_path, device=device)


__all__ = [
    "FEATURE_NAMES",
    "FeatureExtractor",
    "ImageFormatError",
    "WeightsNotFoundError",
    "InceptionV3Features",
    "INCEPTION_WEIGHTS_HELP",
    "SFID_MODULE",
    "check_images",
    "load_inception_v3",
    "register_feature_extractor",
    "available_feature_extractors",
    "build_feature_extractor",
]
