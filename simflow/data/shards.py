"""WebDataset tar shards with a byte-range index: writer, stores (local, ``s3://``, ``pipe:``) and the sample source.

Design (why the order stays a pure function of ``(seed, epoch, position)``)
-------------------------------------------------------------------------
The shards are ordinary WebDataset tars (``<key>.cls``, ``<key>.<jpg|png>``, ``<key>.json`` per sample; any
WebDataset tool reads them). Next to them, ``index.json`` records for every shard its name, sample count, byte size,
sha256 and, for every sample, the **byte offset and length** of its members inside the tar. Global sample id ``g`` is
the running number over shards in index order, so ``g -> (shard, offset, length)`` is a table look-up, and reading a
sample is a single byte-range read (an HTTP range GET on S3, a seek on local disk). The loader therefore never has to
stream shards in some rank- or worker-dependent order: it asks :class:`simflow.data.order.GlobalOrder` which sample
sits at each of its positions and fetches exactly those bytes. The order, the split over ranks and the split over
workers are all functions of the position alone (see :mod:`simflow.data.order`), so a resume at any world size
continues exactly.

Where range reads are impossible (``pipe:`` commands) or unwanted (``data.cache_dir`` set), a shard is first *staged*:
streamed once as a whole into ``cache_dir`` (atomic rename, sha256 checked against the index, one download per node
thanks to a file lock), and then read by range locally. ``.beton`` files for FFCV use the same staging.

``data.path`` for ``data.source=shards``:

* a local folder holding ``index.json`` (or the path of the ``index.json`` itself);
* ``s3://bucket/prefix`` (s3fs; endpoint from ``data.s3_endpoint`` or ``AWS_ENDPOINT_URL``, credentials from the
  standard AWS variables -- never logged);
* ``pipe:COMMAND`` where COMMAND contains ``{name}``; it must print the file ``name`` (``index.json`` or a shard)
  to stdout, e.g. ``pipe:aws s3 cp s3://bucket/prefix/{name} -`` or ``pipe:curl -fsS https://host/prefix/{name}``.
  COMMAND is split once into words (``shlex.split``) and run **without a shell** (pipes, redirections and ``$``
  are not interpreted; write ``pipe:sh -c '...'`` for those, at your own risk).

**Untrusted names.** Shard names come from ``index.json``, which may be written by anyone who can write the bucket.
Each one must match :data:`SHARD_NAME_RE` (letters, digits, ``.``, ``_``, ``-``; no path separator, not starting with
``.`` or ``-``, at most 255 characters) and appear once, or the index is refused at start naming the entry
(:func:`check_shard_name`). Staged copies are written only at ``realpath(cache_dir)/<name>``, checked to lie inside
the cache (:func:`path_inside`).

Bad input never stops a run: unreadable samples (corrupt image, empty or truncated member, missing/invalid class,
short or failed reads after ``data.retries`` retries with exponential back-off, each bounded by ``data.timeout_s``)
come back as None and the loader replaces them by deterministic stand-ins and counts them
(:mod:`simflow.data.loader`). Structural problems stop the run at start with an error naming the file: a missing
index, a missing shard, fewer shards than ``dp_size x max(1, num_workers)``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import io
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from simflow import storage

from .loader import DataError, SampleSource
from .transforms import center_crop

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "simflow-wds-1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_TAR_MTIME = 0.0  # fixed member mtime: the same source gives byte-identical shards


# ============================================================================================================
# stores: where shard bytes come from
# ============================================================================================================
SHARD_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


def check_shard_name(name: Any, where: str) -> str:
    """Return ``name`` if it is a safe shard file name, else raise.

    Safe: a ``str`` matching :data:`SHARD_NAME_RE` in full (so no ``/``, ``\\``, NUL, spaces, quotes or shell
    metacharacters such as ``$`` ``;`` ``|`` `` ` `` ``(``), not starting with ``.`` (so not ``.`` or ``..``) or
    ``-`` (it would read as an option of a ``pipe:`` command).

    Args:
        name: the value read from an index.
        where: the index and entry, for the message (e.g. ``"/data/index.json: shards[3].name"``).

    Raises:
        DataError: naming ``where`` and the offending value (``repr``).
    """
    if not isinstance(name, str) or not SHARD_NAME_RE.fullmatch(name):
        raise DataError(f"{where}: unsafe shard name {name!r}: a shard name must be 1-255 characters of "
                        f"[A-Za-z0-9._-], not starting with '.' or '-', with no path separator; refusing the index")
    return name


def path_inside(root: str, name: str) -> str:
    """``realpath(root)/name``, checked to lie strictly inside ``realpath(root)`` (symlinks resolved).

    Raises:
        DataError: the resolved path escapes ``root`` (names both).
    """
    base = os.path.realpath(root)
    dest = os.path.realpath(os.path.join(base, name))
    if os.path.dirname(dest) != base:
        raise DataError(f"data.cache_dir={root!r}: shard {name!r} would be written to {dest}, outside the cache")
    return dest


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def s3_filesystem(endpoint: Optional[str] = None, timeout_s: float = 60.0):
    """An ``s3fs.S3FileSystem`` for this process.

    Endpoint: ``endpoint`` if given, else botocore's standard resolution (``AWS_ENDPOINT_URL``...). Credentials come
    from the standard AWS environment/config chain only. botocore's own retries and s3fs's retry loop are limited to
    one attempt so that :func:`simflow.storage.retry` alone bounds the total wait (about ``(data.retries + 1)`` x
    ``data.timeout_s`` per request, plus back-off).
    """
    import s3fs

    client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
    fs = s3fs.S3FileSystem(
        client_kwargs=client_kwargs,
        config_kwargs={"connect_timeout": timeout_s, "read_timeout": timeout_s, "retries": {"max_attempts": 1}},
        skip_instance_cache=True,
    )
    fs.retries = 1  # s3fs's own retry loop (5 by default, with sleeps) off: storage.retry bounds the total
    return fs


class Store:
    """Byte access to the files of one shard folder. Subclasses: :class:`FsspecStore`, :class:`PipeStore`."""

    root: str

    def url(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def read_file(self, name: str) -> bytes:
        raise NotImplementedError

    def sizes(self) -> Dict[str, int]:
        """Byte size of every file in the folder (one listing)."""
        raise NotImplementedError

    def read_ranges(self, names: Sequence[str], starts: Sequence[int], lengths: Sequence[int]) -> List[Any]:
        """Bytes of ``[start, start + length)`` of each file, or the exception raised for it."""
        raise NotImplementedError

    def local_path(self, name: str) -> Optional[str]:
        """A local path of the file if it is on local disk (or staged there), else None."""
        return None


class FsspecStore(Store):
    """A local folder or ``s3://bucket/prefix`` through fsspec (range reads: ``cat_ranges``)."""

    def __init__(self, root: str, endpoint: Optional[str] = None, timeout_s: float = 60.0):
        self.root = root.rstrip("/") if is_s3(root) else os.path.abspath(root)
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self._fs, self._pid = None, None

    def __getstate__(self):  # the filesystem object is per process (fork/spawn of DataLoader workers)
        d = dict(self.__dict__)
        d["_fs"], d["_pid"] = None, None
        return d

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            if is_s3(self.root):
                self._fs = s3_filesystem(self.endpoint, self.timeout_s)
            else:
                import fsspec

                self._fs = fsspec.filesystem("file")
            self._pid = os.getpid()
        return self._fs

    def read_file(self, name: str) -> bytes:
        return self.fs.cat_file(self.url(name))

    def sizes(self) -> Dict[str, int]:
        if not self.fs.exists(self.root):
            raise FileNotFoundError(self.root)
        return {os.path.basename(e["name"].rstrip("/")): int(e["size"]) for e in self.fs.ls(self.root, detail=True)
                if e.get("type") == "file"}

    def read_ranges(self, names, starts, lengths):
        paths = [self.url(n) for n in names]
        ends = [s + n for s, n in zip(starts, lengths)]
        if is_s3(self.root):
            return self.fs.cat_ranges(paths, list(starts), ends, on_error="return")
        out: List[Any] = []
        for p, s, e in zip(paths, starts, ends):
            try:
                with open(p, "rb") as f:
                    f.seek(s)
                    out.append(f.read(e - s))
            except OSError as err:
                out.append(err)
        return out

    def local_path(self, name: str) -> Optional[str]:
        return None if is_s3(self.root) else self.url(name)


class PipeStore(Store):
    """``pipe:COMMAND`` with a ``{name}`` placeholder; every file is staged whole into ``cache_dir`` first."""

    def __init__(self, template: str, cache_dir: str, timeout_s: float = 60.0):
        self.argv = pipe_argv(template)
        self.root, self.cache_dir, self.timeout_s = template, cache_dir, timeout_s

    def url(self, name: str) -> str:
        return self.root.replace("{name}", name)

    def command(self, name: str) -> List[str]:
        """The argument vector that prints ``name`` (checked with :func:`check_shard_name`); run without a shell."""
        check_shard_name(name, f"data.path={self.root!r}")
        return [w.replace("{name}", name) for w in self.argv]

    def fetch_to(self, name: str, dest: Union[str, IO[bytes]]) -> None:
        """Run the command for shard ``name`` with its stdout into ``dest`` (a path, or an open binary file)."""
        argv = self.command(name)
        with open(dest, "wb") if isinstance(dest, str) else contextlib.nullcontext(dest) as f:
            proc = subprocess.run(argv, shell=False, stdout=f, stderr=subprocess.PIPE, timeout=self.timeout_s)
        if proc.returncode != 0:
            raise OSError(f"`{shlex.join(argv)}` exited with status {proc.returncode}: "
                          f"{proc.stderr.decode(errors='replace')[-300:]}")

    def read_file(self, name: str) -> bytes:
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            path = os.path.join(tmp, "f")
            self.fetch_to(name, path)
            with open(path, "rb") as f:
                return f.read()

    def sizes(self) -> Dict[str, int]:
        raise NotImplementedError("pipe: URLs cannot be listed")


class StagedStore(Store):
    """Wraps a store: each shard is copied whole into ``cache_dir`` on first use (sha256 checked), then read locally.

    One download per shard per node: a ``flock`` on ``<name>.lock`` serialises the workers and ranks of a node.
    """

    def __init__(self, inner: Store, cache_dir: str, sha256: Dict[str, str], retries: int):
        self.inner, self.cache_dir, self.sha256, self.retries = inner, cache_dir, sha256, retries
        self.root = inner.root
        self._failed: Dict[str, str] = {}  # shards that could not be staged in this process: not retried again
        os.makedirs(cache_dir, exist_ok=True)

    def url(self, name: str) -> str:
        return self.inner.url(name)

    def read_file(self, name: str) -> bytes:
        return self.inner.read_file(name)

    def sizes(self) -> Dict[str, int]:
        return self.inner.sizes()

    def stage(self, name: str) -> str:
        """Local path of the staged copy of ``name`` (downloading it first if needed); always inside ``cache_dir``."""
        dest = path_inside(self.cache_dir, check_shard_name(name, f"staging into {self.cache_dir}"))
        if os.path.exists(dest):
            return dest
        if name in self._failed:
            raise DataError(self._failed[name])
        try:
            return self._stage(name, dest)
        except DataError as e:
            self._failed[name] = str(e)
            raise

    def _stage(self, name: str, dest: str) -> str:
        with open(dest + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if os.path.exists(dest):
                    return dest

                def fetch() -> str:
                    with storage.open_atomic(dest) as w:  # a failed or mismatching copy leaves no file behind
                        if isinstance(self.inner, PipeStore):
                            self.inner.fetch_to(name, w.f)
                            w.f.flush()
                            digest = storage.sha256_file(w.f.name)
                        else:
                            w.write(self.inner.read_file(name))
                            digest = w.sha256.hexdigest()
                        want = self.sha256.get(name)
                        if want and digest != want:
                            raise OSError(f"{self.inner.url(name)}: sha256 {digest} does not match the index ({want})")
                    return dest

                return storage.retry(fetch, f"staging {self.inner.url(name)}", self.retries, error=DataError)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def local_path(self, name: str) -> Optional[str]:
        return self.stage(name)

    def read_ranges(self, names, starts, lengths):
        out: List[Any] = []
        for n, s, k in zip(names, starts, lengths):
            try:
                with open(self.stage(n), "rb") as f:
                    f.seek(s)
                    out.append(f.read(k))
            except (OSError, DataError) as err:
                out.append(err)
        return out


def open_store(url: str, endpoint: Optional[str] = None, timeout_s: float = 60.0,
               cache_dir: Optional[str] = None) -> Store:
    """The :class:`Store` for ``url`` (local folder, ``s3://`` prefix, or ``pipe:`` template)."""
    if is_pipe(url):
        cache = cache_dir or os.path.join(tempfile.gettempdir(), "simflow-shard-cache")
        os.makedirs(cache, exist_ok=True)
        return PipeStore(url, cache, timeout_s)
    return FsspecStore(url, endpoint, timeout_s)


def pipe_argv(template: str) -> List[str]:
    """The words of a ``pipe:COMMAND`` template (``shlex.split``), with ``{name}`` in at least one of them.

    Raises:
        DataError: no ``{name}``, unbalanced quotes or an empty command; names ``data.path``.
    """
    if "{name}" not in template:
        raise DataError(f"data.path={template!r}: a pipe: URL must contain '{{name}}' where the file name goes")
    try:
        argv = shlex.split(template[len("pipe:"):])
    except ValueError as e:
        raise DataError(f"data.path={template!r}: cannot split the pipe: command into words ({e})") from None
    if not argv:
        raise DataError(f"data.path={template!r}: empty pipe: command")
    return argv


def check_data_path(source: str, path: str, endpoint: Optional[str] = None, timeout_s: float = 60.0,
                    retries: int = 1) -> None:
    """Cheap start-up check of ``data.path`` (called by the launcher before any process group exists).

    * ``npz`` / ``ffcv``: a local file must exist (``s3://``: the object must exist);
    * ``shards``: a local folder (or ``index.json`` path) must hold ``index.json``, which is parsed and whose shard
      names are checked (:func:`check_shard_name`), so a hostile index is refused before anything runs; ``s3://``:
      ``index.json`` must exist under the prefix; ``pipe:``: the command must split into words, contain
      ``{name}``, and its program must be found (``shutil.which``). Nothing is run or downloaded for ``pipe:``.

    Raises:
        DataError: naming ``data.path`` and what is wrong.
    """
    if not path:
        raise DataError("data.path is empty")
    if is_pipe(path):
        if source != "shards":
            raise DataError(f"data.path={path!r}: pipe: URLs work with data.source=shards only (not {source!r})")
        prog = pipe_argv(path)[0]
        if shutil.which(prog) is None:
            raise DataError(f"data.path={path!r}: program {prog!r} of the pipe: command not found on PATH")
        return
    if is_s3(path):
        loc = path if source != "shards" else f"{index_root(path).rstrip('/')}/{INDEX_NAME}"
        fs = s3_filesystem(endpoint, timeout_s)
        try:
            found = storage.retry(lambda: fs.exists(loc), f"checking {loc}", retries, error=DataError)
        except DataError as e:
            raise DataError(f"data.path={path!r}: cannot reach {loc}: {e}") from None
        if not found:
            raise DataError(f"data.path={path!r}: {loc} does not exist")
        return
    if source != "shards":
        if not os.path.isfile(path):
            raise DataError(f"data.path={path!r}: no such file (data.source={source})")
        return
    root = index_root(path)
    index = os.path.join(root, INDEX_NAME)
    if not os.path.isfile(index):
        raise DataError(f"data.path={path!r}: {index} does not exist (write the shards with tools/make_shards.py)")
    try:
        with open(index, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise DataError(f"data.path={path!r}: cannot read {index} ({e})") from None
    check_index_names(doc, index)


def check_index_names(doc: Any, where: str) -> List[str]:
    """The shard names of a parsed ``index.json``, each checked (:func:`check_shard_name`) and unique.

    Raises:
        DataError: naming ``where``, the entry (``shards[i].name``) and the value.
    """
    shards = doc.get("shards") if isinstance(doc, dict) else None
    if not isinstance(shards, list):
        raise DataError(f"{where}: no 'shards' list")
    names: List[str] = []
    seen = set()
    for i, entry in enumerate(shards):
        name = entry.get("name") if isinstance(entry, dict) else None
        check_shard_name(name, f"{where}: shards[{i}].name")
        if name in seen:
            raise DataError(f"{where}: shards[{i}].name {name!r} appears twice")
        seen.add(name)
        names.append(name)
    return names


# ============================================================================================================
# index
# ============================================================================================================
@dataclass
class ShardIndex:
    """The parsed ``index.json``.

    Attributes:
        names: shard file names, in global-id order.
        counts: int64 (S,) samples per shard.
        sizes: int64 (S,) bytes per shard.
        sha256: per shard hex digest.
        offsets, lengths: int64 (N,) byte range of each sample's members in its shard.
        shard_of: int64 (N,) shard number of each sample.
        class_names: C names, label c <-> class_names[c].
        meta: the remaining top-level fields of the JSON.
    """

    names: List[str]
    counts: np.ndarray
    sizes: np.ndarray
    sha256: List[str]
    offsets: np.ndarray
    lengths: np.ndarray
    shard_of: np.ndarray
    class_names: List[str]
    meta: Dict[str, Any]

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @classmethod
    def from_json(cls, doc: Dict[str, Any], where: str) -> "ShardIndex":
        if doc.get("format") != INDEX_FORMAT:
            raise DataError(f"{where}: format {doc.get('format')!r} is not {INDEX_FORMAT!r} (write it with tools/make_shards.py)")
        if not doc.get("complete", False):
            raise DataError(f"{where}: the index is incomplete (tools/make_shards.py was interrupted; run it again)")
        names = check_index_names(doc, where)  # untrusted: refused before anything uses them
        shards = doc["shards"]
        counts = np.array([s["num_samples"] for s in shards], np.int64)
        offsets = np.concatenate([np.asarray(s["offsets"], np.int64) for s in shards]) if shards else np.zeros(0, np.int64)
        lengths = np.concatenate([np.asarray(s["lengths"], np.int64) for s in shards]) if shards else np.zeros(0, np.int64)
        if len(offsets) != counts.sum() or len(lengths) != counts.sum():
            raise DataError(f"{where}: per-sample offsets ({len(offsets)}) do not match the sample counts ({counts.sum()})")
        meta = {k: v for k, v in doc.items() if k != "shards"}
        return cls(
            names=names,
            counts=counts,
            sizes=np.array([s["bytes"] for s in shards], np.int64),
            sha256=[s["sha256"] for s in shards],
            offsets=offsets,
            lengths=lengths,
            shard_of=np.repeat(np.arange(len(shards), dtype=np.int64), counts),
            class_names=list(doc["class_names"]),
            meta=meta,
        )


def index_root(url: str) -> str:
    """The shard folder of ``data.path`` (strips a trailing ``/index.json``)."""
    if not is_pipe(url) and url.rstrip("/").endswith("/" + INDEX_NAME):
        return url.rstrip("/")[: -len(INDEX_NAME) - 1]
    if not is_pipe(url) and url == INDEX_NAME:
        return "."
    return url


def load_index(store: Store, retries: int = 3) -> ShardIndex:
    """Read and parse ``index.json`` from a store (bounded retries; a missing index is an error naming it)."""
    where = store.url(INDEX_NAME)

    def read() -> bytes:
        return store.read_file(INDEX_NAME)

    raw = storage.retry(read, f"shard index {where}", retries, error=DataError)
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    return ShardIndex.from_json(doc, where)


# ============================================================================================================
# decoding one sample
# ============================================================================================================
def parse_sample_bytes(buf: bytes, where: str) -> Dict[str, bytes]:
    """Split the tar members of one sample (a byte range of a shard) into ``{extension: bytes}`` plus ``__key__``.

    Uses WebDataset's own tar iterator and key grouping. Raises ValueError on a damaged or multi-sample range.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    files = []
    for f in tar_file_iterator(io.BytesIO(buf)):
        f["__url__"] = where
        files.append(f)
    samples = list(group_by_keys(iter(files)))
    if len(samples) != 1:
        raise ValueError(f"expected the members of one sample, found {len(samples)} samples")
    return samples[0]


def decode_sample(buf: bytes, where: str, num_classes: int, resolution: int) -> Tuple[Optional[Tuple[np.ndarray, int]], str]:
    """Decode one sample's bytes.

    Args:
        buf: the sample's tar members (one byte range from the index).
        where: a name for messages (shard URL and sample id).
        num_classes: labels must lie in [0, num_classes).
        resolution: output side; ADM centre crop when the stored image differs (method §2).

    Returns:
        ``((image uint8 (resolution, resolution, 3), label), "")`` or ``(None, reason)`` for a bad sample.
    """
    try:
        sample = parse_sample_bytes(buf, where)
    except Exception as e:  # noqa: BLE001 - truncated or garbled tar data
        return None, f"damaged tar data ({type(e).__name__}: {e})"
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return None, f"no image member (members: {sorted(k for k in sample if not k.startswith('__'))})"
    if len(sample[ext]) == 0:
        return None, f"empty .{ext} member"
    if "cls" not in sample:
        return None, "missing class (.cls) member"
    try:
        label = int(sample["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None, f"class member is not an integer: {sample['cls'][:20]!r}"
    if not 0 <= label < num_classes:
        return None, f"class {label} outside [0, {num_classes})"
    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            im.load()
            arr = np.asarray(center_crop(im, resolution))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt images
        return None, f"cannot decode .{ext} ({type(e).__name__}: {e})"
    return (arr, label), ""


# ============================================================================================================
# the sample source
# ============================================================================================================
class ShardSource(SampleSource):
    """Random access to the samples of a shard folder (see the module docstring).

    Args:
        url: ``data.path`` (local folder / ``index.json`` path, ``s3://bucket/prefix``, ``pipe:...{name}...``).
        endpoint: S3 endpoint override (``data.s3_endpoint``).
        timeout_s: per-request time-out (``data.timeout_s``).
        retries: extra attempts per read (``data.retries``).
        cache_dir: stage whole shards here first (``data.cache_dir``; required in effect for ``pipe:``, defaults to a
            temp folder there).
        io_threads: concurrent range reads per micro-batch for local/staged stores (S3 uses s3fs's async batching).

    Raises at construction:
        DataError: index missing/invalid, a shard listed in the index missing from the folder (named).
    """

    def __init__(self, url: str, endpoint: Optional[str] = None, timeout_s: float = 60.0, retries: int = 3,
                 cache_dir: Optional[str] = None, io_threads: int = 8):
        root = index_root(url)
        base = open_store(root, endpoint, timeout_s, cache_dir)
        self.index = load_index(base, retries)
        self.url, self.retries, self.io_threads = root, retries, max(1, io_threads)
        self.class_names = self.index.class_names
        self.num_samples = self.index.num_samples
        if self.num_samples == 0:
            raise DataError(f"{base.url(INDEX_NAME)}: the shard index lists no samples")
        if not is_pipe(root):
            try:
                present = base.sizes()
            except FileNotFoundError:
                raise DataError(f"shard folder not found: {root}") from None
            for name, size in zip(self.index.names, self.index.sizes):
                if name not in present:
                    raise DataError(f"shard missing: {base.url(name)} (listed in {base.url(INDEX_NAME)})")
                if present[name] != size:
                    log.warning("data: %s has %d bytes but the index says %d; samples past the damage will be skipped",
                                base.url(name), present[name], size)
        if is_pipe(root) or cache_dir:
            cache = cache_dir or base.cache_dir  # type: ignore[attr-defined]
            self.store: Store = StagedStore(base, cache, dict(zip(self.index.names, self.index.sha256)), retries)
        else:
            self.store = base
        self.skip_reasons: Dict[str, int] = {}

    @property
    def num_shards(self) -> int:
        return len(self.index.names)

    def check_parallelism(self, dp_size: int, num_workers: int) -> None:
        """Fewer shards than readers (``dp_size x max(1, num_workers)``) is refused at start.

        With byte-range reads the order would still be exact, but a data set cut into fewer shards than readers
        serialises every node on the same few objects (S3 per-object request limits, one staged file per node)
        and almost always means a wrong ``data.path`` prefix; reshard with a smaller ``--samples-per-shard``.
        """
        readers = dp_size * max(1, num_workers)
        if self.num_shards < readers:
            raise DataError(
                f"{self.url}: {self.num_shards} shard(s) for {readers} readers (dp_size {dp_size} x "
                f"max(1, data.num_workers={num_workers})); write at least {readers} shards "
                f"(tools/make_shards.py --samples-per-shard {max(1, self.num_samples // readers)})"
            )

    def _fetch(self, ids: np.ndarray) -> List[Optional[bytes]]:
        """The bytes of each sample in ``ids`` (None where unreadable after ``retries`` extra attempts, counted in
        :attr:`skip_reasons`); each retry re-reads only the samples that failed."""
        names = [self.index.names[s] for s in self.index.shard_of[ids]]
        starts = self.index.offsets[ids].tolist()
        lengths = self.index.lengths[ids].tolist()
        out: List[Optional[bytes]] = [None] * len(ids)
        failed: Dict[int, Any] = {i: None for i in range(len(ids))}  # item -> its last result (error or short read)

        def read_failed() -> None:
            todo = list(failed)
            if isinstance(self.store, FsspecStore) and is_s3(self.store.root):
                got = self.store.read_ranges([names[i] for i in todo], [starts[i] for i in todo], [lengths[i] for i in todo])
            else:
                with cf.ThreadPoolExecutor(min(self.io_threads, len(todo))) as pool:
                    got = list(pool.map(lambda i: self.store.read_ranges([names[i]], [starts[i]], [lengths[i]])[0], todo))
            for i, data in zip(todo, got):
                if isinstance(data, (bytes, bytearray)) and len(data) == lengths[i]:
                    out[i] = bytes(data)
                    del failed[i]
                else:
                    failed[i] = data
            if failed:
                raise OSError(f"{len(failed)} of {len(ids)} sample reads failed")

        if failed:
            storage.retry(read_failed, f"reading samples from {self.url}", self.retries)
        for i, data in failed.items():
            short = isinstance(data, (bytes, bytearray))
            why = f"short read ({len(data)} of {lengths[i]} bytes)" if short else f"{type(data).__name__}: {data}"
            log.warning("data: %s sample %d unreadable after %d attempts: %s",
                        self.store.url(names[i]), int(ids[i]), self.retries + 1, why)
            self._count("truncated" if short else "read error")
        return out

    def _count(self, reason: str) -> None:
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1

    def read(self, sample_ids: np.ndarray, resolution: int) -> List[Optional[Tuple[np.ndarray, int]]]:
        sample_ids = np.asarray(sample_ids, np.int64)
        raw = self._fetch(sample_ids)
        out: List[Optional[Tuple[np.ndarray, int]]] = []
        for g, buf in zip(sample_ids.tolist(), raw):
            if buf is None:
                out.append(None)
                continue
            where = f"{self.store.url(self.index.names[self.index.shard_of[g]])} sample {g}"
            item, reason = decode_sample(buf, where, len(self.class_names), resolution)
            if item is None:
                log.warning("data: skipping %s: %s", where, reason)
                self._count(reason.split(" (")[0])
            out.append(item)
        return out

    def describe(self) -> str:
        return f"shards {self.url} ({self.num_shards} shards, {self.num_samples} samples)"


__all__ = [
    "SHARD_NAME_RE",
    "check_shard_name",
    "check_index_names",
    "check_data_path",
    "path_inside",
    "pipe_argv",
    "INDEX_NAME",
    "INDEX_FORMAT",
    "ShardIndex",
    "ShardSource",
    "Store",
    "FsspecStore",
    "PipeStore",
    "StagedStore",
    "open_store",
    "load_index",
    "decode_sample",
    "parse_sample_bytes",
    "s3_filesystem",
]
