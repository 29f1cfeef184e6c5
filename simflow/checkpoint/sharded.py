"""A rank's ZeRO-3 partition of one tensor, described to ``torch.distributed.checkpoint`` (DCP) as chunks of the full
tensor, so that every rank writes only the bytes it owns and a load at any other (TP, DP) reads only the bytes it needs.

The checkpoint layout is the **full tensor in its natural shape** (the shape of the plain, TP=1 module): the same
whatever topology wrote it, and the same as what :class:`~simflow.parallel.engine.LocalEngine` saves as plain tensors.

What a rank owns under ZeRO-3 + megatron-core TP: the tensor-parallel slice ``full.chunk(tp, dim=d)[tp_rank]`` (or
the whole tensor for a TP-replicated parameter) is flattened row-major, and DP rank ``r`` owns the flat range
``[r * part, min(n_local, (r + 1) * part))`` with ``part = ceil(n_local / dp)`` (ZeRO-3 pads the last partitions; a
rank of a tiny parameter may own nothing). A flat range of a row-major tensor is not one rectangle, but it is a short
list of rectangles (at most ``2 * ndim - 1``: a partial leading row, a block of whole rows, a partial trailing row,
recursively): :func:`flat_range_boxes`. Each rectangle, shifted by the TP offset along ``d``, is one DCP chunk of the
full tensor, and its bytes are a contiguous piece of the rank's flat partition (:class:`FlatShard`).

Why not DTensor placements over a (tp, dp) mesh: DTensor's ``Shard(0)`` needs the TP partition dimension to be the
leading one, while megatron's row-parallel weights are split along dim 1 and ZeRO-3 flattens the TP-local tensor
row-major; no topology-free 1-D layout makes both the TP slice and the ZeRO range contiguous. DCP's chunk model
(offset + size boxes, several per rank) describes the real ownership exactly, through the ``__create_write_items__`` /
``__create_chunk_list__`` / ``__get_tensor_shard__`` hooks DCP calls for DTensor.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

Box = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (offsets, sizes)


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> List[Box]:
    """Rectangles covering the row-major flat range ``[start, stop)`` of a tensor of ``shape``, in flat order.

    Args:
        shape: tensor shape (any number of dims; ``()`` is a scalar with one element).
        start, stop: flat element range, ``0 <= start <= stop <= prod(shape)``.

    Returns:
        ``[(offsets, sizes), ...]``; concatenating the boxes' elements (each row-major) gives the flat range.
        Empty for an empty range. At most ``2 * len(shape) - 1`` boxes.

    Raises:
        ValueError: the range is outside the tensor.
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if not 0 <= start <= stop <= n:
        raise ValueError(f"flat range [{start}, {stop}) is outside a tensor of shape {shape} ({n} elements)")
    if start == stop:
        return []
    if not shape:
        return [((), ())]
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    rest = shape[1:]
    first, last = start // inner, (stop - 1) // inner
    if first == last:  # inside one row
        return [((first, *o), (1, *s)) for o, s in flat_range_boxes(rest, start - first * inner, stop - first * inner)]
    out: List[Box] = []
    row0 = first
    if start % inner:
        out += [((first, *o), (1, *s)) for o, s in flat_range_boxes(rest, start % inner, inner)]
        row0 = first + 1
    row1 = stop // inner
    if row1 > row0:
        out.append(((row0,) + (0,) * len(rest), (row1 - row0, *rest)))
    if stop % inner:
        out += [((row1, *o), (1, *s)) for o, s in flat_range_boxes(rest, 0, stop % inner)]
    return out


def zero3_range(numel: int, dp_rank: int, dp_size: int) -> Tuple[int, int]:
    """Flat range ``[start, stop)`` of a ``numel``-element tensor owned by DP rank ``dp_rank`` under ZeRO-3
    (``ceil(numel / dp_size)`` elements per rank, the last ranks short or empty)."""
    part = -(-numel // dp_size)
    return min(numel, dp_rank * part), min(numel, (dp_rank + 1) * part)


class FlatShard(torch.Tensor):
    """One rank's piece of a full tensor: the flat range ``[start, stop)`` of its TP slice, stored contiguously in a
    1-D tensor (its first ``stop - start`` elements are the data, any tail is ZeRO padding), as DCP chunks.

    Build with :meth:`wrap`. The object *is* that 1-D tensor (a ``torch.Tensor`` subclass sharing its storage, since
    DCP looks shards up only on tensors) and carries the chunk description DCP asks for: on save each box is one write
    item (a view of the flat data reshaped to the box); on load DCP copies the overlapping bytes of the saved chunks
    into the same views, i.e. into the flat tensor in place. ``global_shape`` is the full shape (DCP's size check).
    """

    @staticmethod
    def wrap(flat: torch.Tensor, full_shape: Sequence[int], tp_dim: Optional[int], tp_rank: int, tp_size: int,
             start: int, stop: int) -> "FlatShard":
        """Args:
            flat: 1-D tensor holding the rank's elements (a ZeRO-3 fp32 partition, an AdamW moment partition, an
                EMA partition, or a fresh buffer that a load fills in place).
            full_shape: shape of the full (TP=1) tensor.
            tp_dim: dimension along which TP splits the tensor, or None when it is replicated over TP.
            tp_rank, tp_size: this rank's place in its TP group.
            start, stop: the flat range of the TP slice this rank holds (:func:`zero3_range`).

        Raises:
            ValueError: ``flat`` is not 1-D or too short, or ``full_shape[tp_dim]`` does not divide by ``tp_size``.
        """
        if flat.dim() != 1 or flat.numel() < stop - start:
            raise ValueError(f"FlatShard: need a 1-D tensor of >= {stop - start} elements, got {tuple(flat.shape)}")
        full_shape = tuple(int(s) for s in full_shape)
        local = list(full_shape)
        shift = 0
        if tp_dim is not None and tp_size > 1:
            if local[tp_dim] % tp_size:
                raise ValueError(f"FlatShard: dim {tp_dim} of {full_shape} does not divide by TP={tp_size}")
            local[tp_dim] //= tp_size
            shift = tp_rank * local[tp_dim]
        boxes: List[Box] = []
        starts: List[int] = []
        pos = 0
        for off, size in flat_range_boxes(local, start, stop):
            off = list(off)
            if shift:
                off[tp_dim] += shift
            boxes.append((tuple(off), tuple(size)))
            starts.append(pos)
            pos += math.prod(size)
        return FlatShard._make(flat, full_shape, boxes, starts)

    @staticmethod
    def wrap_box(flat: torch.Tensor, full_shape: Sequence[int], offset: Sequence[int],
                 size: Sequence[int]) -> "FlatShard":
        """One rectangle of the full tensor: ``full[offset[0]:offset[0]+size[0], ...]`` held row-major in ``flat``
        (a DTensor's local shard, e.g. FSDP2's ``Shard(0)`` over DP on top of a TP ``Shard(d)``, flattened). An
        empty rectangle (a DP rank that owns no rows) gives no chunk.

        Raises:
            ValueError: ``flat`` is not 1-D, is shorter than the box, or the box leaves the tensor.
        """
        full_shape = tuple(int(s) for s in full_shape)
        offset, size = tuple(int(o) for o in offset), tuple(int(s) for s in size)
        n = math.prod(size)
        if flat.dim() != 1 or flat.numel() < n:
            raise ValueError(f"FlatShard: need a 1-D tensor of >= {n} elements, got {tuple(flat.shape)}")
        if len(offset) != len(full_shape) or any(o < 0 or o + s > f for o, s, f in zip(offset, size, full_shape)):
            raise ValueError(f"FlatShard: box at {offset} of size {size} is outside a tensor of shape {full_shape}")
        boxes = [(offset, size)] if n else []
        return FlatShard._make(flat, full_shape, boxes, [0] * len(boxes))

    @staticmethod
    def _make(flat: torch.Tensor, full_shape: Tuple[int, ...], boxes: List[Box], starts: List[int]) -> "FlatShard":
        self = torch.Tensor._make_subclass(FlatShard, flat.detach(), False)
        self._plain = flat.detach()
        self.boxes, self.starts, self.global_shape = boxes, starts, full_shape
        # the CheckpointableTensor fields DCP's size check reads (the chunk hooks below take precedence)
        self.global_offsets = tuple(o for o, _ in boxes)
        self.local_sizes = tuple(s for _, s in boxes)
        self.local_offsets = tuple((s,) for s in starts)
        return self

    # --- DCP hooks (the _Checkpointable protocol DTensor implements) ---------------------------------------
    def __create_write_items__(self, fqn: str, obj: Any) -> List[WriteItem]:
        props = TensorProperties.create_from_tensor(self._plain)
        size = torch.Size(self.global_shape)
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(off), i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(off), torch.Size(sz)),
                                                      properties=props, size=size))
                for i, (off, sz) in enumerate(self.boxes)]

    def __create_chunk_list__(self) -> List[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(off), torch.Size(sz)) for off, sz in self.boxes]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        i = index.index
        if i is None or i >= len(self.boxes) or torch.Size(self.boxes[i][0]) != index.offset:
            i = next((j for j, (off, _) in enumerate(self.boxes) if torch.Size(off) == index.offset), None)
            if i is None:
                raise ValueError(f"{index.fqn}: this rank holds no chunk at offset {tuple(index.offset)}")
        size = self.boxes[i][1]
        return self._plain[self.starts[i]: self.starts[i] + math.prod(size)].view(size)

    def data_range(self) -> torch.Tensor:
        """The rank's elements (plain 1-D view, padding excluded)."""
        n = sum(math.prod(s) for _, s in self.boxes)
        return self._plain[:n]


__all__ = ["FlatShard", "flat_range_boxes", "zero3_range"]
