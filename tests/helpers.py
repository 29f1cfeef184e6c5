"""Test-only helpers that used to live in production modules: a random InceptionV3 weights file (real loading and
extraction code, meaningless features) and a WebDataset ``s3://`` opener (to show plain WebDataset pipelines read
SimFlow's S3 shards)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Optional

import torch
from torch import nn

from simflow.data.shards import s3_filesystem
from simflow.eval.features import _inception_class


def write_random_inception_weights(path: str, seed: int = 0) -> str:
    """Save a *randomly initialised* torch-fidelity InceptionV3 state dict to ``path`` (tests and offline demos).

    Features from these weights exercise the real loading and extraction code but say nothing about image quality.
    The module is built offline (torch-fidelity's constructor would otherwise download weights), then convolutions
    get He-normal weights and batch norms random affine parameters and running statistics, so activations keep a
    useful scale through all 48 layers.

    Args:
        path: output file (``torch.save`` of the state dict).
        seed: RNG seed; the same seed gives the same file contents.

    Returns:
        ``path``.
    """
    cls = _inception_class()

    class _Unloaded(cls):  # keep the constructor's fresh initialisation instead of loading a file
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: D401 - torch signature
            if state_dict:
                raise ValueError("_Unloaded only accepts the empty placeholder state dict")

    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pt")
        torch.save({}, empty)
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 1.0 + 0.1 * torch.randn(c, generator=g)
            m.bias.data = 0.1 * torch.randn(c, generator=g)
            m.running_mean.data = 0.1 * torch.randn(c, generator=g)
            m.running_var.data = 1.0 + 0.1 * torch.rand(c, generator=g)
        elif isinstance(m, nn.Linear):
            m.weight.data = torch.randn(m.weight.shape, generator=g) / m.in_features**0.5
            m.bias.data = 0.1 * torch.randn(m.out_features, generator=g)
    torch.save(net.state_dict(), path)
    return path


def register_s3_opener(endpoint: Optional[str] = None, timeout_s: float = 60.0) -> None:
    """Teach ``webdataset.gopen`` the ``s3://`` scheme (webdataset 1.0.2 has none), backed by s3fs.

    After this, plain WebDataset pipelines such as ``webdataset.WebDataset("s3://bucket/prefix/shard-000000.tar")``
    stream from S3 with the same endpoint/credential rules as the SimFlow loader.
    """
    import importlib

    wg = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function of that name)

    def gopen_s3(url, mode="rb", bufsize=8192, **kw):
        fs = s3_filesystem(endpoint, timeout_s)
        return fs.open(url, mode, block_size=max(bufsize, 8 << 20))

    wg.gopen_schemes["s3"] = gopen_s3


def metrics_by_step(out_dir: str) -> Dict[int, Dict[str, Any]]:
    """step -> the last record logged for that step in ``out_dir/metrics.jsonl`` (a resumed job may re-log steps)."""
    recs: Dict[int, Dict[str, Any]] = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            recs[r["step"]] = r
    return recs
