"""Write WebDataset shards plus the byte-range index (``tools/make_shards.py``; issue 3 item 1).

Shard ``k`` holds source samples ``[k * samples_per_shard, (k + 1) * samples_per_shard)`` (fewer if some source
images are unreadable: those are skipped and listed in the index under ``skipped_sources``). Each sample is three
tar members written by ``webdataset.TarWriter`` with a fixed mtime, so the same source gives byte-identical shards:
``<key>.cls`` (class index, decimal text), ``<key>.<jpg|png>`` and ``<key>.json`` (``{"label", "class", "origin"}``).

``index.json`` (format ``simflow-wds-1``)::

    {"format", "complete", "num_samples", "samples_per_shard", "resolution", "image_format", "source",
     "class_names": [...], "class_to_index": {...}, "skipped_sources": [{"origin", "reason"}],
     "shards": [{"name", "num_samples", "bytes", "sha256", "keys_sha256", "offsets": [...], "lengths": [...]}]}

``offsets``/``lengths`` are each sample's byte range in its shard (first member header to the end of the last
member's padded data). The index is rewritten after every shard (``complete: false`` until the end), so a re-run
skips shards whose file exists and whose sha256 and planned keys match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import tarfile
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from tqdm import tqdm

from simflow import storage

from .shards import INDEX_FORMAT, INDEX_NAME, is_s3, s3_filesystem
from .sources import ImageSource, open_image_source

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{:06d}.tar"

_worker_source: Optional[ImageSource] = None


def _init_worker(src: str) -> None:
    global _worker_source
    _worker_source = open_image_source(src)


def _encode(args: Tuple[int, Optional[int], str]) -> Tuple[int, Optional[Tuple[str, bytes]], str]:
    i, resolution, image_format = args
    try:
        return i, _worker_source.encoded(i, resolution, image_format), ""  # type: ignore[union-attr]
    except Exception as e:  # noqa: BLE001 - any unreadable source image is skipped and reported
        return i, None, f"{type(e).__name__}: {e}"


def sample_ranges(tar_path: str) -> Tuple[List[str], List[int], List[int]]:
    """Keys and byte ranges of the samples in a tar, in file order.

    Returns:
        (keys, offsets, lengths): each sample's range runs from its first member's header to the end of its last
        member's data rounded up to the 512-byte tar block.
    """
    from webdataset.tariterators import base_plus_ext

    keys: List[str] = []
    starts: List[int] = []
    ends: List[int] = []
    with tarfile.open(tar_path, "r:") as tf:
        for ti in tf:
            key, _ = base_plus_ext(ti.name)
            end = ti.offset_data + ((ti.size + 511) // 512) * 512
            if keys and keys[-1] == key:
                ends[-1] = end
            else:
                keys.append(key)
                starts.append(ti.offset)
                ends.append(end)
    return keys, starts, [e - s for s, e in zip(starts, ends)]


class _Dest:
    """A local folder or ``s3://bucket/prefix`` to write to."""

    def __init__(self, url: str, endpoint: Optional[str]):
        self.url = url.rstrip("/")
        self.fs = s3_filesystem(endpoint) if is_s3(url) else None
        if self.fs is None:
            os.makedirs(self.url, exist_ok=True)
        else:
            bucket = self.url[len("s3://") :].split("/")[0]
            if not self.fs.exists(bucket):
                raise FileNotFoundError(f"S3 bucket not found: s3://{bucket} (create it first; endpoint "
                                        f"{endpoint or os.environ.get('AWS_ENDPOINT_URL', 'AWS default')})")

    def path(self, name: str) -> str:
        return f"{self.url}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name)) if self.fs else os.path.isfile(self.path(name))

    def sha256(self, name: str) -> str:
        return storage.sha256_file(self.path(name), self.fs)

    def read_text(self, name: str) -> Optional[str]:
        if not self.exists(name):
            return None
        if self.fs:
            return self.fs.cat_file(self.path(name)).decode()
        with open(self.path(name)) as f:
            return f.read()

    def put(self, local: str, name: str) -> None:
        if self.fs:
            self.fs.put_file(local, self.path(name))
        else:
            storage.rename_durably(local, self.path(name))

    def write_text(self, name: str, text: str) -> None:
        if self.fs:
            self.fs.pipe_file(self.path(name), text.encode())
        else:
            storage.write_bytes(self.path(name), text.encode())


def write_shards(src: str, dest: str, samples_per_shard: int = 1000, resolution: Optional[int] = None,
                 image_format: str = "keep", workers: int = 1, endpoint: Optional[str] = None,
                 progress: bool = True) -> Dict[str, Any]:
    """Write ``src`` (ImageNet-style folder or demo ``.npz``) as WebDataset shards + ``index.json`` under ``dest``.

    Args:
        src: source folder or NPZ file.
        dest: local folder or ``s3://bucket/prefix`` (the bucket must exist).
        samples_per_shard: source samples per shard (> 0).
        resolution: ADM centre crop to this side (method §2), or None to keep the images' size.
        image_format: ``keep`` (original bytes where possible; PNG for NPZ sources), ``jpg`` or ``png``.
        workers: encoder processes.
        endpoint: S3 endpoint override.
        progress: show a tqdm bar.

    Returns:
        the index document (dict) as written.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    if image_format not in ("keep", "jpg", "png"):
        raise ValueError(f"image_format={image_format!r}: must be keep, jpg or png")
    source = open_image_source(src)
    out = _Dest(dest, endpoint)
    n = len(source)
    num_shards = (n + samples_per_shard - 1) // samples_per_shard
    old: Dict[str, Dict[str, Any]] = {}
    old_text = out.read_text(INDEX_NAME)
    if old_text:
        try:
            old = {s["name"]: s for s in json.loads(old_text).get("shards", [])}
        except ValueError:
            log.warning("%s: unreadable previous index, rewriting every shard", out.path(INDEX_NAME))
    doc: Dict[str, Any] = {
        "format": INDEX_FORMAT,
        "complete": False,
        "num_samples": 0,
        "samples_per_shard": samples_per_shard,
        "resolution": resolution,
        "image_format": image_format,
        "source": source.description,
        "class_names": list(source.class_names),
        "class_to_index": {c: i for i, c in enumerate(source.class_names)},
        "skipped_sources": [],
        "shards": [],
    }
    ctx = mp.get_context("fork")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(src,)) if workers > 1 else None
    if pool is None:
        _init_worker(src)
    bar = tqdm(total=n, desc=f"shards -> {dest}", unit="img", disable=not progress)
    try:
        for k in range(num_shards):
            name = SHARD_PATTERN.format(k)
            ids = range(k * samples_per_shard, min(n, (k + 1) * samples_per_shard))
            keys_sha = hashlib.sha256("\n".join(source.key(i) for i in ids).encode()).hexdigest()
            prev = old.get(name)
            if prev and prev.get("keys_sha256") == keys_sha and out.exists(name) and out.sha256(name) == prev["sha256"]:
                doc["shards"].append(prev)
                doc["skipped_sources"].extend(prev.get("skipped_sources", []))
                bar.update(len(ids))
                continue
            jobs = [(i, resolution, image_format) for i in ids]
            results = pool.imap(_encode, jobs, chunksize=16) if pool else map(_encode, jobs)
            skipped: List[Dict[str, str]] = []
            fd, tmp = tempfile.mkstemp(suffix=".tar", dir=None if out.fs else out.url)
            os.close(fd)
            import webdataset as wds

            with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0.0) as tw:
                for i, enc, why in results:
                    bar.update(1)
                    if enc is None:
                        skipped.append({"origin": source.origin(i), "reason": why})
                        log.warning("make_shards: skipping %s: %s", source.origin(i), why)
                        continue
                    ext, data = enc
                    label = source.label(i)
                    tw.write({
                        "__key__": source.key(i),
                        "cls": str(label).encode(),
                        ext: data,
                        "json": json.dumps({"label": label, "class": source.class_names[label],
                                            "origin": source.origin(i)}).encode(),
                    })
            keys, offsets, lengths = sample_ranges(tmp)
            entry = {
                "name": name,
                "num_samples": len(keys),
                "bytes": os.path.getsize(tmp),
                "sha256": storage.sha256_file(tmp),
                "keys_sha256": keys_sha,
                "skipped_sources": skipped,
                "offsets": offsets,
                "lengths": lengths,
            }
            os.chmod(tmp, 0o644)
            out.put(tmp, name)
            if os.path.exists(tmp):
                os.unlink(tmp)
            doc["shards"].append(entry)
            doc["skipped_sources"].extend(skipped)
            doc["num_samples"] = sum(s["num_samples"] for s in doc["shards"])
            out.write_text(INDEX_NAME, json.dumps(doc))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    doc["num_samples"] = sum(s["num_samples"] for s in doc["shards"])
    doc["complete"] = True
    out.write_text(INDEX_NAME, json.dumps(doc))
    return doc


__all__ = ["write_shards", "sample_ranges", "SHARD_PATTERN"]
