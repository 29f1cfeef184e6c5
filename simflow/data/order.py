"""The deterministic global sample order (design.md "Loader state"; issue 3 "Deterministic global order").

Every sample ever handed to the trainer has a **global position** ``p = 0, 1, 2, ...`` counted over the whole run,
over all ranks. The order is a pure function of ``(seed, p)``:

* epoch ``e = p // N`` and offset ``o = p % N`` (``N`` = number of samples in the data set);
* exact-epoch mode (default): the sample at ``p`` is ``perm(seed, e)[o]``, where ``perm(seed, e)`` is a uniformly
  random permutation of ``range(N)`` drawn from ``numpy.random.PCG64(SeedSequence([seed, e, Stream.PERMUTATION]))``. So positions
  ``[e*N, (e+1)*N)`` visit every sample exactly once;
* resampling mode (``data.resample=true``): the sample at ``p`` is ``draw(seed, e)[o]``, where ``draw(seed, e)`` is
  ``N`` independent uniform draws *with replacement* from the same kind of generator (``Stream.RESAMPLE``). An "epoch" is
  then just a block of ``N`` positions: some samples appear several times and about ``N/e`` never.

**Dealing positions to ranks.** A global batch of ``G = micro_batch_size * grad_accumulation * dp_size`` samples at
optimizer step ``s`` covers positions ``[s*G, (s+1)*G)``. It is cut into ``grad_accumulation * dp_size`` micro-batches
of ``B = micro_batch_size`` consecutive positions; micro-batch ``j = m * dp_size + dp_rank`` goes to rank
``dp_rank`` at accumulation step ``m``. Equivalently, the run is a sequence of *rounds* of ``dp_size * B`` positions
(round ``r = s * grad_accumulation + m``) and rank ``k`` takes positions ``r*dp_size*B + k*B + [0, B)``. Which
samples make up a global batch thus depends only on ``(seed, s, G)``, never on how many ranks share it, and a run
that stopped after ``consumed_samples`` positions continues at any world size with the same global batch.

**Partial global batches (elastic resume).** A loader deals from its ``consumed_samples`` *whatever it is*: with
``c0`` = the position it starts (or resumes) at, round ``k`` of this start covers ``c0 + k*dp_size*B + [0,
dp_size*B)`` (the ``origin`` argument of :func:`micro_batch_positions`). A run that resumes at another world size
without ``train.global_batch_size`` (so its global batch changes, say from 12 to 8 after 5 steps: ``c0 = 60``, not a
multiple of 8) thus continues at position 60 with batches ``[60, 68), [68, 76), ...``: every position is used exactly
once, none is skipped or repeated, and the global batches of all steps sum to ``consumed_samples``. Only the grid of
batch boundaries shifts; with ``train.global_batch_size`` set the global batch never changes, ``c0`` is always a
multiple of it and the order equals an uninterrupted run's.

**Per-sample randomness** (horizontal flip here; posterior noise and label dropout in the trainer) comes from a
counter-based hash of ``(seed, stream, epoch, position)`` (:func:`simflow.rng.per_sample_uniform`), not from a rank's RNG
stream, so it is identical whichever rank or worker processes the sample.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Tuple

import numpy as np

from simflow.rng import Stream, per_sample_hash, per_sample_uniform

_U64 = np.uint64


def micro_batch_positions(round_index: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                          origin: int = 0) -> np.ndarray:
    """Global positions of one rank's micro-batch in round ``round_index``, counted from position ``origin``.

    Round ``r`` = optimizer step ``s`` and accumulation step ``m`` with ``r = s * grad_accumulation + m`` when the
    run started at ``origin = 0``; a loader resumed at ``consumed_samples = c0`` counts its rounds from ``origin =
    c0`` (any value >= 0; see "Partial global batches" in the module docstring).

    Returns:
        int64 (micro_batch_size,): ``origin + r*dp_size*B + dp_rank*B + [0, B)``.

    Raises:
        ValueError: ``dp_rank`` outside ``[0, dp_size)`` or ``origin < 0``.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
    if origin < 0:
        raise ValueError(f"origin={origin}: global positions are >= 0")
    start = int(origin) + (round_index * dp_size + dp_rank) * micro_batch_size
    return np.arange(start, start + micro_batch_size, dtype=np.int64)


def step_positions(step: int, micro_step: int, dp_rank: int, dp_size: int, micro_batch_size: int, grad_accumulation: int) -> np.ndarray:
    """Positions of rank ``dp_rank``'s micro-batch ``micro_step`` of optimizer step ``step`` (int64 (B,)).

    Micro-batch ``j = micro_step * dp_size + dp_rank`` of the global batch ``[step*G, (step+1)*G)``.
    """
    if not 0 <= micro_step < grad_accumulation:
        raise ValueError(f"micro_step={micro_step} is outside [0, grad_accumulation={grad_accumulation})")
    return micro_batch_positions(step * grad_accumulation + micro_step, dp_rank, dp_size, micro_batch_size)


class GlobalOrder:
    """Maps global positions to sample ids (see the module docstring for the exact rule).

    Args:
        num_samples: N, samples in the data set (> 0).
        seed: run seed (>= 0).
        resample: draw with replacement instead of exact epochs.
        cache_epochs: how many epoch permutations to keep in memory (8 bytes x N each).
    """

    def __init__(self, num_samples: int, seed: int, resample: bool = False, cache_epochs: int = 2):
        if num_samples <= 0:
            raise ValueError(f"num_samples={num_samples}: the data set is empty")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.resample = bool(resample)
        self._cache: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._cache_epochs = max(1, cache_epochs)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample ids in position order for one epoch: int64 (N,). A permutation unless ``resample``."""
        order = self._cache.get(epoch)
        if order is not None:
            self._cache.move_to_end(epoch)
            return order
        stream = Stream.RESAMPLE if self.resample else Stream.PERMUTATION
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch), int(stream)])))
        if self.resample:
            order = rng.integers(0, self.num_samples, size=self.num_samples, dtype=np.int64)
        else:
            order = rng.permutation(self.num_samples).astype(np.int64)
        order.setflags(write=False)
        self._cache[epoch] = order
        while len(self._cache) > self._cache_epochs:
            self._cache.popitem(last=False)
        return order

    def samples_at(self, positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Sample ids and epochs of global positions.

        Args:
            positions: int64 (B,) global positions (>= 0).

        Returns:
            (sample_ids int64 (B,), epochs int64 (B,)).
        """
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and positions.min() < 0:
            raise ValueError("global positions must be >= 0")
        epochs, offsets = np.divmod(positions, self.num_samples)
        ids = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            ids[sel] = self.epoch_order(int(e))[offsets[sel]]
        return ids, epochs

    def hflip(self, positions: np.ndarray) -> np.ndarray:
        """Whether to mirror each sample horizontally: bool (B,), probability 1/2, from
        ``per_sample_uniform(seed, Stream.HFLIP, epoch, position)`` only."""
        positions = np.asarray(positions, dtype=np.int64)
        return per_sample_uniform(self.seed, Stream.HFLIP, positions // self.num_samples, positions) < 0.5

    def substitute(self, position: int, attempt: int) -> int:
        """A deterministic stand-in sample id for an unreadable sample at ``position`` (attempt 1, 2, ...).

        Used when a sample is corrupt so that every rank still takes the same number of steps with full batches:
        the stand-in is ``epoch_order(e)[(o + k) % N]`` with ``k`` from :func:`per_sample_hash` of
        ``(seed, Stream.SUBSTITUTE, attempt, position)`` -- a pure function of the position and the data.
        """
        e, o = divmod(int(position), self.num_samples)
        k = int(per_sample_hash(self.seed, Stream.SUBSTITUTE, attempt, position) % _U64(self.num_samples))
        return int(self.epoch_order(e)[(o + max(k, 1)) % self.num_samples])


__all__ = [
    "GlobalOrder",
    "micro_batch_positions",
    "step_positions",
]
