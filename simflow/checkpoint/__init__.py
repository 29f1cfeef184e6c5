"""Checkpoints: step directories written by all ranks in parallel, manifest + commit marker, verified discovery,
retention, run id and run lock, local or ``s3://`` storage (README "Checkpoints and fault tolerance").

Modules: :mod:`~simflow.checkpoint.store` (format, save, discovery, load), :mod:`~simflow.checkpoint.storage`
(fsspec I/O with atomic writes), :mod:`~simflow.checkpoint.lock` (run id and run lock).
"""
