"""Full weights for single-process use, streamed tensor by tensor into a ``.safetensors`` file.

The safetensors layout (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header size
``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
(padded with spaces to a multiple of 8), then the raw little-endian tensor bytes in header order. Every shape is
known before any tensor is gathered, so the header goes first and each tensor's bytes follow as soon as it has been
gathered: the writer holds one full tensor at a time, never the whole model (a sharded engine gathers one parameter
per step of the iterator). The file is written atomically (:func:`simflow.storage.open_atomic`) and read
back with ``safetensors.safe_open`` to check the header; a non-finite value refuses the export (no file).
"""

from __future__ import annotations

import json
import math
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

from simflow import storage

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class NonFiniteExportError(ValueError):
    """A tensor to export holds NaN or Inf; nothing was written."""


def header(specs: Sequence[Tuple[str, Sequence[int], torch.dtype]], metadata: Dict[str, str]) -> bytes:
    """The safetensors header (size prefix + padded JSON) for tensors ``specs`` = [(name, shape, dtype)] in order."""
    entries: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    off = 0
    for name, shape, dtype in specs:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        entries[name] = {"dtype": _DTYPES[dtype], "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_streamed(location: str, specs: List[Tuple[str, Sequence[int], torch.dtype]],
                   tensors: Iterable[Tuple[str, torch.Tensor]], metadata: Dict[str, str], write: bool = True) -> str:
    """Write ``tensors`` (an iterator yielding ``(name, full tensor)`` in the order of ``specs``) to ``location``.

    Args:
        location: ``.safetensors`` path or ``s3://`` URL.
        specs: ``[(name, shape, dtype)]`` of every tensor, known before the first is produced.
        tensors: the tensors; consumed completely on every rank (a sharded engine's iterator is collective).
        metadata: string key/values for the header.
        write: False on ranks that only take part in the gathers.

    Raises:
        NonFiniteExportError: a tensor holds NaN/Inf (names it; every rank sees the same gathered tensor, so all
            raise together and nothing is written).
        ValueError: a tensor does not match its spec.
    """
    it = iter(tensors)
    if not write:
        for name, t in it:
            _check(name, t, None)
        return location
    with storage.open_atomic(location) as w:
        w.write(header(specs, metadata))
        for name, shape, dtype in specs:
            got, t = next(it)
            _check(got, t, (name, shape, dtype))
            w.write(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    from safetensors import safe_open

    if storage.is_local(location):
        with safe_open(location, framework="pt") as f:  # the library parses what was written
            if sorted(f.keys()) != sorted(n for n, _, _ in specs):
                raise ValueError(f"{location}: safetensors header does not list the exported tensors")
    return location


def _check(name: str, t: torch.Tensor, spec) -> None:
    if spec is not None and (name != spec[0] or list(t.shape) != list(spec[1]) or t.dtype != spec[2]):
        raise ValueError(f"export: got {name} {tuple(t.shape)} {t.dtype}, expected {spec[0]} {tuple(spec[1])} "
                         f"{spec[2]}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteExportError(f"export refused: {name} holds non-finite values (NaN/Inf); no weights written")


__all__ = ["NonFiniteExportError", "header", "write_streamed"]
