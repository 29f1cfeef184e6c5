"""FFCV ``.beton`` files behind the SimFlow loader interface (issue 3 item 3; optional ``ffcv`` extra).

Install: ``apt-get install libopencv-dev libturbojpeg0-dev`` then ``pip install .[ffcv]`` (ffcv 1.0.2, numba,
pillow). Nothing else in SimFlow imports ffcv.

* :func:`write_beton` (``tools/make_beton.py``): the same sources as the shard writer (ImageNet-style folder or demo
  NPZ), optional ADM centre crop (method §2), ``raw`` (lossless) or ``jpg`` storage, and a JSON sidecar
  ``<file>.beton.json`` with the class names, sample count, resolution and sha256 (FFCV files carry no such metadata).
* :class:`FfcvLoader`: a :class:`simflow.data.loader.Loader` whose samples are decoded by FFCV. The order is the SAME
  global order as every other source: FFCV is driven by a custom traversal order that hands it exactly this rank's
  sample ids for the next rounds, computed by :class:`simflow.data.order.GlobalOrder`; flips are applied afterwards
  from (seed, epoch, position). ``consumed_samples`` semantics are those of :class:`Loader`. An ``s3://`` file is
  staged to ``data.cache_dir`` (sha256-checked) before FFCV memory-maps it.

Decoding: when the file's images already have the model resolution they are passed through unchanged
(``SimpleRGBImageDecoder``); otherwise FFCV's ``CenterCropRGBImageDecoder`` (ratio 1: centre square of the short side,
then an OpenCV area resize) stands in for the ADM crop -- close to, but not bit-identical with, the PIL path.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from simflow import storage

from .loader import DataError, Loader, SampleSource
from .order import micro_batch_positions
from .shards import StagedStore, is_s3, open_store, s3_filesystem
from .sources import ImageSource, open_image_source
from .transforms import to_model_input

log = logging.getLogger(__name__)

BETON_FORMAT = "simflow-beton-1"
INSTALL_HINT = ("FFCV is not installed: apt-get install libopencv-dev libturbojpeg0-dev && pip install '.[ffcv]' "
                "(see README 'Data')")


def _import_ffcv():
    try:
        import ffcv  # noqa: F401
        from ffcv.fields import IntField, RGBImageField
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader as _FfcvLoader
        from ffcv.traversal_order.base import TraversalOrder
        from ffcv.writer import DatasetWriter
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return dict(IntField=IntField, RGBImageField=RGBImageField, CenterCropRGBImageDecoder=CenterCropRGBImageDecoder,
                IntDecoder=IntDecoder, SimpleRGBImageDecoder=SimpleRGBImageDecoder, Loader=_FfcvLoader,
                TraversalOrder=TraversalOrder, DatasetWriter=DatasetWriter)


# ============================================================================================================
# writer
# ============================================================================================================
_check_source: Optional[ImageSource] = None


def _init_check(src: str) -> None:
    global _check_source
    _check_source = open_image_source(src)


def _check(args: Tuple[int, Optional[int]]) -> Tuple[int, str]:
    i, resolution = args
    try:
        _check_source.load(i, resolution)  # type: ignore[union-attr]
        return i, ""
    except Exception as e:  # noqa: BLE001 - any unreadable source image is skipped and reported
        return i, f"{type(e).__name__}: {e}"


class _BetonItems:
    """The indexed data set FFCV's writer reads: item j = (image uint8 (H, W, 3), label int)."""

    def __init__(self, source: ImageSource, ids: List[int], resolution: Optional[int]):
        self.source, self.ids, self.resolution = source, ids, resolution

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int) -> Tuple[np.ndarray, int]:
        i = self.ids[j]
        return np.ascontiguousarray(self.source.load(i, self.resolution)), self.source.label(i)


def write_beton(src: str, dest: str, resolution: Optional[int] = None, write_mode: str = "raw",
                jpeg_quality: int = 90, workers: int = 1, endpoint: Optional[str] = None) -> Dict[str, Any]:
    """Write ``src`` (ImageNet-style folder or demo NPZ) as an FFCV file ``dest`` plus ``dest + ".json"``.

    Args:
        src: source folder or ``.npz``.
        dest: ``*.beton`` path, local or ``s3://bucket/key.beton`` (written locally, then uploaded).
        resolution: ADM centre crop to this side (method §2); None keeps the source size.
        write_mode: FFCV ``RGBImageField`` mode: ``raw`` (lossless), ``jpg`` or ``smart``.
        jpeg_quality: JPEG quality for ``jpg``/``smart``.
        workers: processes for the validation pass and FFCV's writer.
        endpoint: S3 endpoint override.

    Returns:
        the sidecar document. Unreadable source images are left out and listed under ``skipped_sources``.
    """
    f = _import_ffcv()
    source = open_image_source(src)
    jobs = [(i, resolution) for i in range(len(source))]
    if workers > 1:
        with mp.get_context("fork").Pool(workers, initializer=_init_check, initargs=(src,)) as pool:
            checked = list(pool.imap(_check, jobs, chunksize=64))
    else:
        _init_check(src)
        checked = [_check(j) for j in jobs]
    ids = [i for i, why in checked if not why]
    skipped = [{"origin": source.origin(i), "reason": why} for i, why in checked if why]
    for s in skipped:
        log.warning("make_beton: skipping %s: %s", s["origin"], s["reason"])
    if not ids:
        raise DataError(f"{src}: no readable images")
    local = dest
    tmpdir = None
    if is_s3(dest):
        tmpdir = tempfile.mkdtemp(prefix="beton-")
        local = os.path.join(tmpdir, os.path.basename(dest))
    else:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    writer = f["DatasetWriter"](local, {
        "image": f["RGBImageField"](write_mode=write_mode, jpeg_quality=jpeg_quality),
        "label": f["IntField"](),
    }, num_workers=max(1, workers))
    writer.from_indexed_dataset(_BetonItems(source, ids, resolution))
    doc = {
        "format": BETON_FORMAT,
        "num_samples": len(ids),
        "class_names": list(source.class_names),
        "resolution": resolution,
        "write_mode": write_mode,
        "source": source.description,
        "sha256": storage.sha256_file(local),
        "skipped_sources": skipped,
    }
    with open(local + ".json", "w") as fh:
        json.dump(doc, fh)
    if tmpdir is not None:
        fs = s3_filesystem(endpoint)
        fs.put_file(local, dest)
        fs.put_file(local + ".json", dest + ".json")
        for p in (local, local + ".json"):
            os.unlink(p)
        os.rmdir(tmpdir)
    return doc


# ============================================================================================================
# loader
# ============================================================================================================
class BetonInfo(SampleSource):
    """Sample count and class names of a ``.beton`` (from its sidecar), and the local path FFCV maps.

    ``read`` decodes arbitrary ids through a one-off FFCV pass (used for spot checks; :class:`FfcvLoader` streams).
    """

    def __init__(self, path: str, cache_dir: Optional[str] = None, endpoint: Optional[str] = None,
                 timeout_s: float = 60.0, retries: int = 3):
        self.url = path
        root, name = path.rsplit("/", 1) if "/" in path else (".", path)
        store = open_store(root, endpoint, timeout_s)
        try:
            self.meta = json.loads(store.read_file(name + ".json"))
        except FileNotFoundError:
            raise DataError(f"FFCV sidecar not found: {path}.json (write the file with tools/make_beton.py)") from None
        if self.meta.get("format") != BETON_FORMAT:
            raise DataError(f"{path}.json: format {self.meta.get('format')!r} is not {BETON_FORMAT!r}")
        if is_s3(path):
            cache = cache_dir or os.path.join(tempfile.gettempdir(), "simflow-ffcv-cache")
            self.local_path = StagedStore(store, cache, {name: self.meta["sha256"]}, retries).stage(name)
        else:
            self.local_path = path
            if not os.path.isfile(path):
                raise DataError(f"FFCV file not found: {path}")
        self.num_samples = int(self.meta["num_samples"])
        self.class_names = list(self.meta["class_names"])
        self._reader = None

    def describe(self) -> str:
        return f"ffcv {self.url} ({self.num_samples} samples)"

    def read(self, sample_ids: np.ndarray, resolution: int) -> List[Optional[Tuple[np.ndarray, int]]]:
        reader = _FfcvStream(self, resolution, len(sample_ids), num_threads=1)
        images, labels = next(reader.run([np.asarray(sample_ids, np.int64)]))
        return [(images[i], int(labels[i])) for i in range(len(sample_ids))]


class _FfcvStream:
    """An FFCV loader whose traversal order is fed from outside: ``run(chunks)`` yields ``(images uint8 (B, H, W, 3),
    labels int64 (B,))`` for each array of B ids, in order."""

    def __init__(self, info: BetonInfo, resolution: int, batch_size: int, num_threads: int, chunk_batches: int = 1):
        f = _import_ffcv()
        stream = self

        class _FedOrder(f["TraversalOrder"]):
            def __init__(self):  # FFCV calls the instance with the loader; see __call__
                pass

            def __call__(self, loader):
                self.loader, self.indices, self.seed, self.distributed = loader, loader.indices, 0, False
                return self

            def sample_order(self, epoch: int):
                return stream.pending

        self.batch_size = batch_size
        self.capacity = batch_size * chunk_batches
        self.pending = np.zeros(self.capacity, np.uint64)
        same = info.meta.get("resolution") == resolution
        decoder = f["SimpleRGBImageDecoder"]() if same else f["CenterCropRGBImageDecoder"]((resolution, resolution), 1.0)
        self.loader = f["Loader"](info.local_path, batch_size=batch_size, num_workers=max(1, num_threads),
                                  order=_FedOrder(), drop_last=False, batches_ahead=2,
                                  pipelines={"image": [decoder], "label": [f["IntDecoder"]()]})

    def run(self, id_batches: List[np.ndarray]) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        ids = np.concatenate(id_batches)
        if len(ids) > self.capacity or len(ids) % self.batch_size:
            raise ValueError(f"{len(ids)} ids: must be a multiple of {self.batch_size} up to {self.capacity}")
        self.pending = ids.astype(np.uint64)
        epoch_iter = iter(self.loader)
        try:
            for images, labels in epoch_iter:
                # FFCV reuses its output buffers: copy before the next batch
                yield np.array(images, copy=True), np.asarray(labels, np.int64).reshape(-1).copy()
        finally:
            epoch_iter.close()  # stops FFCV's prefetch thread when the consumer leaves early


class FfcvLoader(Loader):
    """:class:`Loader` over a ``.beton``; same order, dict format and state as every other source.

    Args: as :class:`Loader`, with ``source`` a :class:`BetonInfo`; ``num_workers`` = FFCV decoding threads;
    ``chunk_rounds`` = rounds handed to FFCV at once (prefetch depth; not counted as consumed until yielded).
    """

    def __init__(self, source: BetonInfo, *, chunk_rounds: int = 16, **kw):
        super().__init__(source, **kw)
        self.chunk_rounds = chunk_rounds
        self._stream: Optional[_FfcvStream] = None

    @classmethod
    def from_config(cls, cfg, dp_rank: int, dp_size: int, consumed_samples: int = 0) -> "FfcvLoader":
        d = cfg.data
        info = BetonInfo(d.path, cache_dir=d.cache_dir, endpoint=d.s3_endpoint, timeout_s=d.timeout_s, retries=d.retries)
        return cls(info, seed=cfg.train.seed, micro_batch_size=cfg.train.micro_batch_size,
                   grad_accumulation=cfg.train.grad_accumulation, dp_rank=dp_rank, dp_size=dp_size,
                   resolution=cfg.model.resolution, hflip=d.hflip, resample=d.resample, num_workers=d.num_workers,
                   consumed_samples=consumed_samples)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        generation = self._generation
        if self._stream is None:
            self._stream = _FfcvStream(self.source, self.resolution, self.micro_batch_size,  # type: ignore[arg-type]
                                       self.num_workers, self.chunk_rounds)
        origin, r = self._consumed, 0  # deal from consumed_samples, whatever it is (Loader, "Partial global batches")
        while True:
            rounds = range(r, r + self.chunk_rounds)
            positions = [micro_batch_positions(q, self.dp_rank, self.dp_size, self.micro_batch_size, origin)
                         for q in rounds]
            ids_epochs = [self.order.samples_at(p) for p in positions]
            batches = self._stream.run([ie[0] for ie in ids_epochs])
            for q, pos, (ids, epochs), (images, labels) in zip(rounds, positions, ids_epochs, batches):
                if generation != self._generation:
                    raise RuntimeError("the loader state changed (load_state_dict) while iterating; call iter(loader) again")
                flip = self.order.hflip(pos) if self.hflip else None
                self._consumed = origin + (q + 1) * self.round_size
                yield {
                    "image": to_model_input(images, flip),
                    "label": torch.from_numpy(labels),
                    "index": torch.from_numpy(pos),
                    "epoch": torch.from_numpy(epochs),
                    "sample_id": torch.from_numpy(ids),
                }
            r += self.chunk_rounds


__all__ = ["write_beton", "BetonInfo", "FfcvLoader", "BETON_FORMAT"]
