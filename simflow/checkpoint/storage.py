"""Where checkpoint bytes live: a local or shared filesystem path, or ``s3://bucket/prefix``, through fsspec.

Every checkpoint file is written through :func:`open_atomic`, which gives the same guarantee on both kinds of
storage: a reader sees either no file or the complete file, never a prefix.

* local / shared filesystem: the bytes go to ``<name>.tmp-<host>-<pid>``, are ``fsync``-ed and renamed over
  ``<name>`` (``os.replace`` is atomic on POSIX), then the directory is ``fsync``-ed so the rename survives a crash;
* S3 (s3fs): an object becomes visible only when its (multipart) upload completes at ``close()``, which is atomic
  already; a killed writer leaves at most an unfinished multipart upload, never a partial object.

The sha256 and byte count of each file are computed while it is written (no second read).

Paths handed to and returned by this module are *locations*: a plain path for local storage, ``s3://bucket/key``
for S3. s3fs honours ``AWS_ENDPOINT_URL`` (e.g. a loopback moto server) and the usual AWS credential variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import socket
from typing import IO, Iterator, List, Tuple

import fsspec
from fsspec.implementations.local import LocalFileSystem


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
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        fsync_dir(os.path.dirname(path))
    else:
        with fs.open(path, "wb") as f:
            w = HashingWriter(f)
            yield w


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


__all__ = ["split", "is_local", "join", "basename", "open_atomic", "write_bytes", "read_bytes", "exists", "size",
           "makedirs", "listdir", "rmtree", "remove", "HashingWriter", "fsync_dir"]
