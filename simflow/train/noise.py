"""Per-sample randomness derived from (seed, global sample index, stream), never from a rank's RNG stream.

design.md "Per-sample randomness in training": the posterior noise eps (method §3.2), label dropout (method §2) and
sampling noise (FID sets, method §9) of a sample depend only on the run seed and the sample's global index, so the
same global batch gives the same loss on 1, 2 or 4 processes and after a resume at another world size.
"""

from __future__ import annotations

from typing import Sequence

import torch

# Stream ids: independent random streams per sample.
STREAM_POSTERIOR = 1
STREAM_LABEL_DROP = 2
STREAM_SAMPLE_NOISE = 3
STREAM_SAMPLE_LABEL = 4
STREAM_LATENT_NOISE = 5  # extra STARFlow-style latent noise (model.flow.noise_std)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser (Steele et al., OOPSLA 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit generator seed that is a pure function of (run seed, global sample index, stream id)."""
    return _splitmix64(_splitmix64(_splitmix64(int(seed)) ^ int(index)) ^ int(stream)) >> 1


def _generator(seed: int, index: int, stream: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(sample_seed(seed, index, stream))
    return g


def per_sample_normal(shape: Sequence[int], seed: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """Standard normal noise, one independent draw of ``shape`` per sample: (B, *shape) float32 on CPU.

    ``indices`` (B,) int64 are global sample indices (the loader's ``index`` field, or FID sample indices).
    """
    return torch.stack([torch.randn(tuple(shape), generator=_generator(seed, int(i), stream)) for i in indices.tolist()])


def per_sample_uniform(seed: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """One U[0, 1) draw per sample: (B,) float64 on CPU."""
    return torch.tensor(
        [torch.rand(1, generator=_generator(seed, int(i), stream), dtype=torch.float64).item() for i in indices.tolist()],
        dtype=torch.float64,
    )


def per_sample_randint(high: int, seed: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """One integer in [0, high) per sample: (B,) int64 on CPU (e.g. random class labels of an FID set)."""
    return torch.tensor(
        [int(torch.randint(high, (1,), generator=_generator(seed, int(i), stream)).item()) for i in indices.tolist()],
        dtype=torch.int64,
    )


def drop_labels(labels: torch.Tensor, null_class: int, p: float, seed: int, indices: torch.Tensor) -> torch.Tensor:
    """Classifier-free-guidance label dropout (method §2, p = 0.1): replace a label by ``null_class`` when the
    sample's own uniform draw is below ``p``. Shapes: (B,) int64 -> (B,) int64."""
    if p <= 0:
        return labels
    drop = per_sample_uniform(seed, indices, STREAM_LABEL_DROP) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)
