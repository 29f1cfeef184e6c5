"""One loader interface for every data source, driven by the global sample order (:mod:`simflow.data.order`).

A :class:`Loader` belongs to one data-parallel rank. ``iter(loader)`` yields that rank's micro-batches forever, in
round order (round ``r`` = optimizer step ``r // grad_accumulation``, accumulation step ``r % grad_accumulation``),
each a dict::

    image      float32 (B, 3, H, W) in [-1, 1], H = W = model.resolution (ADM centre crop if the stored size differs)
    label      int64 (B,)   class index
    index      int64 (B,)   global position p of the sample (seed for per-sample noise in the trainer)
    epoch      int64 (B,)   p // N
    sample_id  int64 (B,)   which data-set sample was read (after any substitution of a corrupt sample)

**consumed_samples** counts positions handed out by *all* ranks, assuming they move in lock step (which the trainer
guarantees): when this rank yields its micro-batch of round ``r``, ``consumed_samples`` becomes
``(r + 1) * dp_size * micro_batch_size``; so after every micro-batch of optimizer step ``s`` has been yielded,
``consumed_samples == (s + 1) * global_batch_size`` on every rank. Batches prefetched by workers but not yet yielded
are not counted. A loader built (or :meth:`Loader.load_state_dict`-ed) with ``consumed_samples = c`` (any integer
>= 0, e.g. saved at another world size with another global batch) continues at position ``c``: its first round
covers ``[c, c + dp_size * micro_batch_size)`` and ``consumed_samples`` then grows by the round size per yielded
micro-batch (:mod:`simflow.data.order`, "Partial global batches"), so nothing is skipped or seen twice.

**Bad samples.** A source returns None for a sample it cannot read (corrupt JPEG, empty or truncated tar member,
missing class, read errors after bounded retries). It is replaced by a deterministic stand-in
(:meth:`GlobalOrder.substitute`) and counted in ``skipped_samples``, so batches keep their size and every rank takes
the same number of steps.

**Workers** (``num_workers > 0``) go through ``torch.utils.data.DataLoader`` over a map-style data set whose items
are whole rounds; the DataLoader returns items in sampler order, so the order does not depend on the worker count.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .order import GlobalOrder, micro_batch_positions
from .transforms import center_crop_array, to_model_input

log = logging.getLogger(__name__)

MAX_SUBSTITUTES = 16


class DataError(RuntimeError):
    """The data cannot be used (missing shard, too few shards, every stand-in unreadable, ...). Names the file."""


class SampleSource:
    """Random access to a data set's samples. Subclasses: :class:`NpzSource`, the shard and FFCV sources.

    Attributes:
        num_samples: N.
        class_names: list of C class names, label c <-> class_names[c].
    """

    num_samples: int
    class_names: List[str]

    def read(self, sample_ids: np.ndarray, resolution: int) -> List[Optional[Tuple[np.ndarray, int]]]:
        """Read samples by id.

        Args:
            sample_ids: int64 (B,) ids in [0, N).
            resolution: output side in pixels.

        Returns:
            one entry per id: ``(image uint8 (resolution, resolution, 3), label int)`` or None when unreadable.
        """
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class NpzSource(SampleSource):
    """An in-memory NPZ (``data.source=npz``): ``images`` uint8 (N, H, W, 3), ``labels`` int64 (N,), optional
    ``class_names`` (the format of ``tools/make_demo_data.py``)."""

    def __init__(self, path: str):
        from .demo import load_npz

        data = load_npz(path)
        self.path = path
        self.images: np.ndarray = data["images"]
        self.labels: np.ndarray = data["labels"]
        self.class_names = [str(c) for c in data["class_names"]]
        self.num_samples = int(self.images.shape[0])

    def read(self, sample_ids: np.ndarray, resolution: int) -> List[Optional[Tuple[np.ndarray, int]]]:
        imgs = self.images[sample_ids]
        labels = self.labels[sample_ids]
        return [(center_crop_array(imgs[i], resolution), int(labels[i])) for i in range(len(sample_ids))]

    def describe(self) -> str:
        return f"npz {self.path} ({self.num_samples} samples)"


class RoundDataset(torch.utils.data.Dataset):
    """Map-style data set whose item ``r`` is this rank's whole micro-batch of round ``r`` (a dict, see module doc),
    plus ``skipped`` int64 (): how many unreadable samples were replaced by stand-ins."""

    def __init__(self, source: SampleSource, order: GlobalOrder, dp_rank: int, dp_size: int, micro_batch_size: int,
                 resolution: int, hflip: bool, origin: int = 0):
        self.source, self.order, self.origin = source, order, origin
        self.dp_rank, self.dp_size, self.micro_batch_size = dp_rank, dp_size, micro_batch_size
        self.resolution, self.hflip = resolution, hflip

    def __getitem__(self, round_index: int) -> Dict[str, torch.Tensor]:
        positions = micro_batch_positions(round_index, self.dp_rank, self.dp_size, self.micro_batch_size, self.origin)
        ids, epochs = self.order.samples_at(positions)
        items = self.source.read(ids, self.resolution)
        skipped = 0
        for i, item in enumerate(items):
            attempt = 0
            while item is None:
                attempt += 1
                skipped += 1
                if attempt > MAX_SUBSTITUTES:
                    raise DataError(
                        f"{self.source.describe()}: sample {int(positions[i])} (id {int(ids[i])}) and "
                        f"{MAX_SUBSTITUTES} deterministic stand-ins are all unreadable; the data set is badly damaged"
                    )
                ids[i] = self.order.substitute(int(positions[i]), attempt)
                item = self.source.read(ids[i : i + 1], self.resolution)[0]
            items[i] = item
        images = np.stack([it[0] for it in items])
        flip = self.order.hflip(positions) if self.hflip else None
        return {
            "image": to_model_input(images, flip),
            "label": torch.tensor([it[1] for it in items], dtype=torch.int64),
            "index": torch.from_numpy(positions),
            "epoch": torch.from_numpy(epochs),
            "sample_id": torch.from_numpy(ids),
            "skipped": torch.tensor(skipped, dtype=torch.int64),
        }

    def __len__(self) -> int:  # pragma: no cover - the data set is unbounded; DataLoader only needs __getitem__
        raise TypeError("RoundDataset is unbounded")


class _CountFrom(torch.utils.data.Sampler):
    """Sampler yielding ``start, start + 1, ...`` forever."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class Loader:
    """One rank's view of the global sample order (see the module docstring for the exact semantics).

    Args:
        source: a :class:`SampleSource`.
        seed: ``train.seed`` (>= 0).
        micro_batch_size: B, samples per micro-batch on this rank.
        grad_accumulation: micro-batches per optimizer step on each rank.
        dp_rank, dp_size: this rank and the data-parallel world size.
        resolution: output side (``model.resolution``).
        hflip: random horizontal flips, decided by (seed, epoch, position) only.
        resample: sample with replacement (see :mod:`simflow.data.order`).
        num_workers: DataLoader worker processes (0 = read in the calling process).
        consumed_samples: global positions already consumed (any integer >= 0; see the module docstring).
        prefetch_factor: rounds prefetched per worker.
    """

    def __init__(self, source: SampleSource, *, seed: int, micro_batch_size: int, grad_accumulation: int,
                 dp_rank: int, dp_size: int, resolution: int, hflip: bool = True, resample: bool = False,
                 num_workers: int = 0, consumed_samples: int = 0, prefetch_factor: int = 2):
        if micro_batch_size < 1 or grad_accumulation < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}, grad_accumulation={grad_accumulation}: must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers}: must be >= 0")
        self.source = source
        self.order = GlobalOrder(source.num_samples, seed, resample=resample)
        self.micro_batch_size, self.grad_accumulation = micro_batch_size, grad_accumulation
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.resolution, self.hflip = resolution, hflip
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.skipped_samples = 0
        self._generation = 0
        self._consumed = 0
        self._set_consumed(consumed_samples)

    # -- sizes -------------------------------------------------------------------------------------------------
    @property
    def round_size(self) -> int:
        """Samples per round over all ranks: ``dp_size * micro_batch_size``."""
        return self.dp_size * self.micro_batch_size

    @property
    def global_batch_size(self) -> int:
        """G = micro_batch_size * grad_accumulation * dp_size."""
        return self.round_size * self.grad_accumulation

    @property
    def num_samples(self) -> int:
        return self.source.num_samples

    @property
    def class_names(self) -> List[str]:
        return self.source.class_names

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    @property
    def epoch(self) -> int:
        """Epoch of the next position to be consumed: ``consumed_samples // N``."""
        return self._consumed // self.num_samples

    def _set_consumed(self, consumed: int) -> None:
        if consumed < 0:
            raise ValueError(f"consumed_samples={consumed}: must be >= 0")
        self._consumed = int(consumed)
        self._generation += 1

    # -- iteration ---------------------------------------------------------------------------------------------
    def dataset(self, origin: int = 0) -> RoundDataset:
        """The rounds of this rank counted from global position ``origin`` (item ``k`` starts at ``origin + k *
        round_size``)."""
        return RoundDataset(self.source, self.order, self.dp_rank, self.dp_size, self.micro_batch_size,
                            self.resolution, self.hflip, origin)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        generation = self._generation
        origin = self._consumed  # deal from here, whether or not it is a multiple of the round or global batch
        ds = self.dataset(origin)
        if self.num_workers == 0:
            batches: Iterator[Dict[str, torch.Tensor]] = (ds[r] for r in itertools.count(0))
        else:
            batches = iter(torch.utils.data.DataLoader(
                ds, batch_size=None, sampler=_CountFrom(0), num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor, persistent_workers=False, in_order=True,
            ))
        for r, batch in zip(itertools.count(0), batches):
            if generation != self._generation:
                raise RuntimeError("the loader state changed (load_state_dict) while iterating; call iter(loader) again")
            skipped = int(batch.pop("skipped"))
            if skipped:
                self.skipped_samples += skipped
                log.warning("data: replaced %d unreadable sample(s) at positions %d.. (total skipped %d)", skipped,
                            origin + r * self.round_size, self.skipped_samples)
            self._consumed = origin + (r + 1) * self.round_size
            yield batch

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue the order: ``consumed_samples``, ``seed``, ``num_samples``, ``resample``,
        plus ``epoch``, ``global_batch_size``, ``skipped_samples`` for information."""
        return {
            "consumed_samples": self._consumed,
            "seed": self.order.seed,
            "num_samples": self.num_samples,
            "resample": self.order.resample,
            "epoch": self.epoch,
            "global_batch_size": self.global_batch_size,
            "skipped_samples": self.skipped_samples,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (possibly saved at another DP size).

        Raises:
            ValueError naming the key when the seed, sample count or resample mode differ (the order would not
            continue) or ``consumed_samples`` is missing or negative.
        """
        for key, mine in (("seed", self.order.seed), ("num_samples", self.num_samples), ("resample", self.order.resample)):
            if key in state and state[key] != mine:
                raise ValueError(f"loader state: {key}={state[key]!r} but this loader has {key}={mine!r}; "
                                 f"the saved order cannot be continued")
        if "consumed_samples" not in state:
            raise ValueError("loader state: missing key 'consumed_samples'")
        self._set_consumed(int(state["consumed_samples"]))
        self.skipped_samples = int(state.get("skipped_samples", 0))


__all__ = ["DataError", "SampleSource", "NpzSource", "RoundDataset", "Loader", "MAX_SUBSTITUTES"]
