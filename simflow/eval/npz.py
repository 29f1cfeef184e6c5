"""Streaming access to arrays inside ``.npz`` files (ADM sample and reference batches).

A 50k x 256 x 256 x 3 sample batch is ~9.8 GB; :class:`NpzArray` reads an array's shape and dtype from its ``.npy``
header without loading the data, and yields it in batches, so input checks run before any feature is computed and
memory stays at one batch. Works for ``np.savez`` and ``np.savez_compressed`` files (the zip member is decompressed
as a stream). Format reference: NumPy NEP 1 (``.npy`` header versions 1.0-3.0) inside a zip archive.
"""

from __future__ import annotations

import zipfile
from typing import Iterator, List, Optional, Tuple

import numpy as np


class NpzError(ValueError):
    """An ``.npz`` file is missing, not a zip archive, lacks a key, or holds an unreadable array. Names the file."""


def npz_keys(path: str) -> List[str]:
    """Array names stored in ``path`` (without the ``.npy`` suffix)."""
    try:
        with zipfile.ZipFile(path) as z:
            return [n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy")]
    except FileNotFoundError:
        raise NpzError(f"{path}: file not found") from None
    except zipfile.BadZipFile:
        raise NpzError(f"{path}: not an .npz (zip) file") from None


def _read_exact(f, n: int, what: str) -> bytearray:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            raise NpzError(f"{what}: truncated data (wanted {n} bytes, got {len(buf)})")
        buf += chunk
    return buf  # a bytearray, so np.frombuffer gives a writable array


class NpzArray:
    """One array of an ``.npz`` file, opened lazily.

    Attributes:
        path, key: the file and the array name (e.g. ``"arr_0"``).
        shape: the array's shape, read from the header only.
        dtype: its NumPy dtype.

    Raises (constructor):
        NpzError: missing file or key (the message lists the keys present), or an object array.
    """

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        keys = npz_keys(path)
        if key not in keys:
            raise NpzError(f"{path}: no array {key!r}; keys present: {keys}")
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # pragma: no cover - future format versions
                raise NpzError(f"{path}['{key}']: unsupported .npy format version {version}")
        if dtype.hasobject:
            raise NpzError(f"{path}['{key}']: object arrays are not supported (dtype {dtype})")
        self.shape: Tuple[int, ...] = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._fortran = bool(fortran)

    @property
    def name(self) -> str:
        """``path['key']``, for messages."""
        return f"{self.path}['{self.key}']"

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def read(self) -> np.ndarray:
        """The whole array in memory."""
        with np.load(self.path) as z:
            return z[self.key]

    def iter_batches(self, batch_size: int, limit: Optional[int] = None) -> Iterator[np.ndarray]:
        """Yield consecutive slices along axis 0 of at most ``batch_size`` rows (the first ``limit`` rows if given).

        C-ordered arrays are streamed from the zip member; Fortran-ordered ones are loaded whole first.
        """
        if not self.shape:
            raise NpzError(f"{self.name}: a 0-d array has no batches")
        n = self.shape[0] if limit is None else min(limit, self.shape[0])
        if self._fortran:
            arr = self.read()
            for i in range(0, n, batch_size):
                yield arr[i : min(i + batch_size, n)]
            return
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            for i in range(0, n, batch_size):
                m = min(batch_size, n - i)
                data = _read_exact(f, m * row, self.name)
                yield np.frombuffer(data, dtype=self.dtype).reshape((m,) + self.shape[1:])


def check_npz_images(arr: NpzArray) -> None:
    """Check from the header alone that ``arr`` is uint8 (N, H, W, 3), N >= 1.

    Reads one small batch only to explain a failure (value range of float data, channels-first layout, ...).

    Raises:
        ImageFormatError: naming ``path['key']`` and the expected format.
    """
    from simflow.eval.features import ImageFormatError, check_images

    if arr.dtype == np.uint8 and len(arr.shape) == 4 and arr.shape[-1] == 3 and arr.shape[0] > 0:
        return
    expected = "expected a uint8 array of shape (N, H, W, 3)"
    if not arr.shape or arr.shape[0] == 0:
        raise ImageFormatError(f"{arr.name}: {expected}; got {arr.dtype} of shape {arr.shape}")
    check_images(next(arr.iter_batches(256)), arr.name)
    raise ImageFormatError(f"{arr.name}: {expected}; got {arr.dtype} {arr.shape}")


__all__ = ["NpzError", "NpzArray", "check_npz_images", "npz_keys"]
