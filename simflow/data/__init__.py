"""Data for SimFlow: demo data, the deterministic global sample order, and one loader interface.

Entry point: :func:`build_loader` (dispatches on ``cfg.data.source``). Modules:

* :mod:`simflow.data.demo` -- the real demo set (Fashion-MNIST from apt, or crops of shipped photos);
* :mod:`simflow.data.order` -- position -> sample rule, dealing to ranks (per-sample randomness: :mod:`simflow.rng`);
* :mod:`simflow.data.loader` -- :class:`Loader` (iteration, ``consumed_samples`` state) and the NPZ source;
* :mod:`simflow.data.shards` -- WebDataset shards with a byte-range index (local, ``s3://``, ``pipe:``);
  :mod:`simflow.data.shard_writer` writes them (``tools/make_shards.py``);
* :mod:`simflow.data.ffcv_loader` -- FFCV ``.beton`` files behind the same interface (optional ``ffcv`` extra);
* :mod:`simflow.data.transforms` -- ADM centre crop and [-1, 1] scaling.
"""

from __future__ import annotations

from .loader import DataError, Loader, NpzSource, SampleSource
from .order import GlobalOrder, micro_batch_positions, step_positions


def build_source(cfg) -> SampleSource:
    """The :class:`SampleSource` named by ``cfg.data.source`` / ``cfg.data.path``."""
    d = cfg.data
    if d.source == "npz":
        return NpzSource(d.path)
    if d.source == "shards":
        from .shards import ShardSource

        return ShardSource(d.path, endpoint=d.s3_endpoint, timeout_s=d.timeout_s, retries=d.retries,
                           cache_dir=d.cache_dir, io_threads=d.io_threads)
    raise ValueError(f"data.source={d.source!r}: must be one of ['npz', 'shards', 'ffcv']")


def build_loader(cfg, dp_rank: int, dp_size: int, consumed_samples: int = 0) -> Loader:
    """One data-parallel rank's loader for a :class:`simflow.config.SimFlowConfig`.

    Args:
        cfg: the run config; uses ``data.*``, ``train.seed``, ``train.micro_batch_size``,
            ``train.grad_accumulation`` and ``model.resolution``.
        dp_rank, dp_size: this rank and the data-parallel world size.
        consumed_samples: global positions already consumed (from a checkpoint's loader state).

    Returns:
        a :class:`Loader`; ``iter(loader)`` yields dicts with ``image`` float32 (B, 3, H, W) in [-1, 1],
        ``label``/``index``/``epoch``/``sample_id`` int64 (B,).
    """
    if cfg.data.source == "ffcv":
        from .ffcv_loader import FfcvLoader

        return FfcvLoader.from_config(cfg, dp_rank, dp_size, consumed_samples)
    source = build_source(cfg)
    if hasattr(source, "check_parallelism"):
        source.check_parallelism(dp_size, cfg.data.num_workers)
    return Loader(
        source,
        seed=cfg.train.seed,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accumulation=cfg.train.grad_accumulation,
        dp_rank=dp_rank,
        dp_size=dp_size,
        resolution=cfg.model.resolution,
        hflip=cfg.data.hflip,
        resample=cfg.data.resample,
        num_workers=cfg.data.num_workers,
        consumed_samples=consumed_samples,
    )


__all__ = [
    "build_loader",
    "build_source",
    "Loader",
    "SampleSource",
    "NpzSource",
    "DataError",
    "GlobalOrder",
    "micro_batch_positions",
    "step_positions",
]
