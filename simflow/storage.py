"""Where bytes live, for every room of SimFlow (data, checkpoints, evaluation): a local or shared filesystem path,
or ``s3://bucket/prefix``, through fsspec. The ground floor: it imports nothing from ``simflow``.

One of each:

* :func:`open_atomic` / :func:`write_bytes`: the only atomic write. A reader sees either no file or the complete
  file, never a prefix, on both kinds of storage:

  - local / shared filesystem: the bytes go to ``<name>.tmp-<host>-<pid>``, are ``fsync``-ed and renamed over
    ``<name>`` (``os.replace`` is atomic on POSIX), then the directory is ``fsync``-ed so the rename survives a crash;
  - S3 (s3fs): an object becomes visible only when its (multipart) upload completes at ``close()``, which is atomic
    already; a killed writer leaves at most an unfinished multipart upload, never a partial object.

  The sha256 and byte count of each file are computed while it is written (no second read).
* :func:`sha256_file`: the only file checksum, streamed (``hashlib.file_digest``), never the whole file in memory.
* :func:`retry`: the only retry loop with back-off (:func:`backoff_s`).

Paths handed to and returned by this module are *locations*: a plain path for local storage, ``s3://bucket/key``
for S3. s3fs honours ``AWS_ENDPOINT_URL`` (e.g. a loopback moto server) and the usual AWS credential variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import socket
import time
from typing import IO, Any, Callable, Iterator, List, Optional, Tuple, Type

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)


def split(location: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` for a location. S3 listings are never served from s3fs's cache."""
    if "://" in location:
        fs, path = fsspec.core.url_to_fs(location, use_listings_cache=False)
    else:
        fs, path = fsspec.filesystem("file"), os.path.abspath(location)
    return fs, path


def is_local(location: str) -> bool:
    """True for a path on a (local or shared) POSIX filesystem."""
    return isinstance(split(location)[0], LocalFileSystem)


def join(location: str, *names: str) -> str:
    """``location/name/...`` for either kind of storage (``os.path.join`` locally, ``/`` for URLs)."""
    if "://" in location:
        return posixpath.join(location.rstrip("/"), *names)
    return os.path.join(location, *names)


def basename(location: str) -> str:
    """Last path component of a location (``step-0000100`` of ``s3://b/run/step-0000100``)."""
    return posixpath.basename(location.rstrip("/")) if "://" in location else os.path.basename(os.path.normpath(location))


class HashingWriter:
    """File-like wrapper that forwards ``write`` and keeps the running sha256 and byte count (``torch.save``
    needs only ``write``/``flush``)."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, b) -> int:
        self.sha256.update(b)
        self.bytes += len(b)
        self.f.write(b)
        return len(b)

    def flush(self) -> None:
        self.f.flush()


@contextlib.contextmanager
def open_atomic(location: str) -> Iterator[HashingWriter]:
    """Write ``location`` atomically (see the module docstring); yields a :class:`HashingWriter` whose
    ``sha256.hexdigest()`` and ``bytes`` describe the file once the block exits."""
    fs, path = split(location)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                w = HashingWriter(f)
                yield w
            rename_durably(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:
        with fs.open(path, "wb") as f:
            w = HashingWriter(f)
            yield w


def rename_durably(tmp: str, path: str) -> None:
    """Publish the finished local file ``tmp`` as ``path`` (same filesystem): ``fsync`` its bytes, ``os.replace``
    it over ``path`` (atomic on POSIX), ``fsync`` the directory so the rename survives a crash. For a file that
    must be complete on disk before it can be published (a tar whose index is read back); otherwise use
    :func:`open_atomic`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path: str) -> None:
    """Make a rename/creation inside local directory ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(location: str, data: bytes) -> str:
    """Atomically write ``data``; returns its sha256 (hex)."""
    with open_atomic(location) as w:
        w.write(data)
    return w.sha256.hexdigest()


def read_bytes(location: str) -> bytes:
    """Whole content of a file. Raises FileNotFoundError when it does not exist."""
    fs, path = split(location)
    with fs.open(path, "rb") as f:
        return f.read()


def sha256_file(location: str, fs: Optional[fsspec.AbstractFileSystem] = None) -> str:
    """SHA-256 (hex) of a file's bytes, streamed in fixed-size blocks (``hashlib.file_digest``), never whole in memory.

    Args:
        location: a local path or an fsspec URL (``s3://bucket/key``).
        fs: read ``location`` through this filesystem instead (e.g. an s3fs client with its own endpoint).

    Raises:
        FileNotFoundError: no such file.
    """
    fs, path = split(location) if fs is None else (fs, location)
    with fs.open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): 0.05 s doubled each time, capped at 2 s."""
    return min(2.0, 0.05 * 2 ** (attempt - 1))


def retry(fn: Callable[[], Any], what: str, retries: int, error: Optional[Type[Exception]] = None) -> Any:
    """Call ``fn`` up to ``retries + 1`` times, sleeping :func:`backoff_s` between attempts; any ``Exception`` counts
    as a failed attempt.

    This loop alone bounds the total wait of a read: the S3 clients SimFlow builds switch botocore's and s3fs's own
    retries off (``simflow.data.shards.s3_filesystem``), since stacked loops would multiply the attempts and the
    worst-case wait (botocore's default 3-5 attempts x s3fs's 5, each up to the request time-out).

    Args:
        fn: the attempt; its result is returned.
        what: names the operation in the message (e.g. ``"staging s3://b/shard-000003.tar"``).
        retries: extra attempts after the first (``data.retries``), >= 0.
        error: after the last failure raise ``error(f"{what}: <type>: <message>")``; None: log a warning and return
            None (the caller skips the item).
    """
    last: Optional[BaseException] = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s(attempt))
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - any I/O error is retried, then skipped or reported
            last = e
    if error is not None:
        raise error(f"{what}: {type(last).__name__}: {last}") from None
    log.warning("giving up on %s after %d attempts: %s: %s", what, retries + 1, type(last).__name__, last)
    return None


def exists(location: str) -> bool:
    """True if a file or directory (S3: any object under the prefix) exists at ``location``."""
    fs, path = split(location)
    return fs.exists(path)


def size(location: str) -> int:
    """Size of a file in bytes. Raises FileNotFoundError when it does not exist."""
    fs, path = split(location)
    return int(fs.size(path))


def makedirs(location: str) -> None:
    """Create a directory (local); S3 has no directories, so nothing is done there."""
    fs, path = split(location)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(path, exist_ok=True)


def listdir(location: str) -> List[str]:
    """Names (not paths) of the entries directly under ``location``; [] if it does not exist."""
    fs, path = split(location)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries})


def rmtree(location: str) -> None:
    """Delete a directory (or prefix) and everything below it; missing is fine."""
    fs, path = split(location)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def remove(location: str) -> None:
    """Delete one file; missing is fine."""
    fs, path = split(location)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


__all__ = ["split", "is_local", "join", "basename", "open_atomic", "write_bytes", "read_bytes", "sha256_file",
           "backoff_s", "retry", "exists", "size", "makedirs", "listdir", "rmtree", "remove", "HashingWriter",
           "rename_durably", "fsync_dir"]
