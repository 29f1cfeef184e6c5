"""Per-sample randomness: one counter-based hash, one stream-id namespace (design.md "Per-sample randomness").

Every random draw that belongs to one *sample* (its place in the data order, its horizontal flip, its posterior
noise eps (method §3.2), its CFG label dropout (method §2), the noise and label of an FID sample (method §9)) is a
pure function of the run seed, the sample's global key (position, epoch or sample index) and a :class:`Stream` id,
never of a rank's RNG stream. So the same global batch gives the same loss on 1, 2 or 4 processes, after a resume at
another world size, and an FID set is identical for any number of GPUs.

**The hash.** :func:`hash_words` folds 64-bit words into the run seed with the SplitMix64 finaliser (Steele, Lea &
Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014; a bijective avalanche mixer ``mix64``)::

    h = mix64(seed);  for w in words: h = mix64(h ^ w)

Two key layouts use it, each fixed forever (changing one changes every run's draws):

* data-side draws (:func:`per_sample_hash`, numpy, vectorised): words ``(stream, epoch, position)``;
* model-side noise (:func:`sample_seed`): words ``(index, stream)``, shifted right by one bit to a 63-bit seed of
  one ``torch.Generator`` per sample, from which ``torch.randn`` / ``rand`` / ``randint`` draw (so the noise is
  exactly torch's normal sampler, on CPU, whatever device the model runs on).

The epoch permutations themselves come from ``numpy.random.PCG64(SeedSequence([seed, epoch, stream]))``
(:mod:`simflow.data.order`), also keyed by a :class:`Stream` id.

**Stream ids** are one :class:`Stream` ``IntEnum``, unique across both layouts. The ids 0-5 are those the code used
before this namespace existed; the data-side ``RESAMPLE``, ``HFLIP`` and ``SUBSTITUTE`` had the ids 1, 2, 3 (which
the noise streams also used) and were renumbered 6, 7, 8 when the two namespaces were merged (issue 13). So the
exact-epoch data order, all training noise and every FID sample are unchanged; the horizontal flips, the
``data.resample=true`` order and the stand-ins for unreadable samples drew from other keys before that change.
"""

from __future__ import annotations

import enum
from typing import Sequence

import numpy as np
import torch


class Stream(enum.IntEnum):
    """What a per-sample draw is for. Values are part of every run's data and noise: never reuse or renumber one."""

    PERMUTATION = 0   # exact-epoch permutation (SeedSequence key), simflow.data.order
    POSTERIOR = 1     # posterior noise eps of the VAE (method §3.2)
    LABEL_DROP = 2    # CFG label dropout (method §2)
    SAMPLE_NOISE = 3  # flow-side noise of an FID / grid sample (method §9)
    SAMPLE_LABEL = 4  # random class label of an FID sample (method §9)
    LATENT_NOISE = 5  # extra STARFlow-style latent noise (model.flow.noise_std)
    RESAMPLE = 6      # with-replacement draws (data.resample=true; SeedSequence key), simflow.data.order
    HFLIP = 7         # horizontal flip of a training sample, simflow.data.order
    SUBSTITUTE = 8    # stand-in for an unreadable sample, simflow.data.order


_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele, Lea & Flood, OOPSLA 2014): bijective avalanche hash uint64 -> uint64,
    elementwise, with wrap-around arithmetic."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def hash_words(seed: int, *words) -> np.ndarray:
    """``h = mix64(seed); h = mix64(h ^ w)`` for each word: uint64 of the words' broadcast shape.

    Args:
        seed: run seed (any int; taken mod 2**64).
        words: ints or int arrays >= 0 (stream ids, epochs, positions, sample indices), broadcastable.
    """
    arrays = [np.asarray(w).astype(np.uint64) for w in words]
    h = mix64(np.full(np.broadcast_shapes(*(a.shape for a in arrays)), _U64(int(seed) & _MASK64)))
    for a in arrays:
        h = mix64(h ^ a)
    return h


# ---- data-side draws (numpy, vectorised): key (seed, stream, epoch, position) ----

def per_sample_hash(seed: int, stream: int, epoch, position) -> np.ndarray:
    """64-bit hash of ``(seed, stream, epoch, position)``, elementwise over broadcast arrays.

    Args:
        seed: run seed (``train.seed``), >= 0.
        stream: a :class:`Stream` id.
        epoch, position: int arrays (or scalars) of broadcastable shapes.

    Returns:
        uint64 array of the broadcast shape.
    """
    return hash_words(seed, int(stream), epoch, position)


def per_sample_uniform(seed: int, stream: int, epoch, position) -> np.ndarray:
    """Uniform float64 in [0, 1) from :func:`per_sample_hash` (top 53 bits / 2**53), elementwise."""
    return (per_sample_hash(seed, stream, epoch, position) >> _U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


# ---- model-side noise (torch, one generator per sample): key (seed, index, stream) ----

def sample_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit ``torch.Generator`` seed, a pure function of (run seed, global sample index, stream id)."""
    return int(hash_words(seed, int(index), int(stream))) >> 1


def _generators(seed: int, indices: torch.Tensor, stream: int):
    seeds = hash_words(seed, np.asarray(indices.tolist(), dtype=np.int64), int(stream)) >> _U64(1)
    for s in seeds.tolist():
        g = torch.Generator(device="cpu")
        g.manual_seed(int(s))
        yield g


def per_sample_normal(shape: Sequence[int], seed: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """Standard normal noise, one independent draw of ``shape`` per sample: (B, *shape) float32 on CPU.

    ``indices`` (B,) int64 are global sample indices (the loader's ``index`` field, or FID sample indices).
    """
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in _generators(seed, indices, stream)])


def per_sample_rand(seed: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """One U[0, 1) draw per sample from its own generator: (B,) float64 on CPU."""
    return torch.tensor([torch.rand(1, generator=g, dtype=torch.float64).item()
                         for g in _generators(seed, indices, stream)], dtype=torch.float64)


def per_sample_randint(high: int, seed: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """One integer in [0, high) per sample: (B,) int64 on CPU (e.g. random class labels of an FID set)."""
    return torch.tensor([int(torch.randint(high, (1,), generator=g).item())
                         for g in _generators(seed, indices, stream)], dtype=torch.int64)


def drop_labels(labels: torch.Tensor, null_class: int, p: float, seed: int, indices: torch.Tensor) -> torch.Tensor:
    """Classifier-free-guidance label dropout (method §2, p = 0.1): replace a label by ``null_class`` when the
    sample's own uniform draw (:attr:`Stream.LABEL_DROP`) is below ``p``. Shapes: (B,) int64 -> (B,) int64."""
    if p <= 0:
        return labels
    drop = per_sample_rand(seed, indices, Stream.LABEL_DROP) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


__all__ = [
    "Stream", "mix64", "hash_words", "per_sample_hash", "per_sample_uniform", "sample_seed",
    "per_sample_normal", "per_sample_rand", "per_sample_randint", "drop_labels",
]
