"""Checkpoints: DCP-sharded step directories (each rank writes and reads only the chunks it owns, reshardable to any
TP/DP layout), written synchronously or in the background, manifest + commit marker, verified discovery, retention,
run id and run lock, local or ``s3://`` storage (README "Checkpoints and fault tolerance").

Modules: :mod:`~simflow.checkpoint.manager` (the trainer's ``Checkpointer``: save, async commit, resume),
:mod:`~simflow.checkpoint.store` (format, DCP I/O with per-rank verification, discovery, offline full loads),
:mod:`~simflow.checkpoint.sharded` (a ZeRO-3 partition as chunks of the full tensor),
:mod:`~simflow.checkpoint.export` (streamed safetensors export), :mod:`~simflow.checkpoint.lock` (run id and run
lock), :mod:`~simflow.checkpoint.rng` (per-rank RNG states), :mod:`~simflow.checkpoint.weights` (weights and their
config from an export or a checkpoint). Bytes go through :mod:`simflow.storage` (fsspec I/O, atomic writes, streamed
sha256, retries), which data and eval use too.
"""
