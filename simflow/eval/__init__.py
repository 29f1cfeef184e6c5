"""Evaluation: feature extractors, sample-quality metrics (FID, sFID, IS, precision/recall) and the ADM-format
evaluator behind ``python -m simflow.fid`` and ``tools/fid_ref.py``.

Modules: :mod:`~simflow.eval.metrics` (math on feature arrays), :mod:`~simflow.eval.features` (networks),
:mod:`~simflow.eval.npz` (streaming ``.npz`` access), :mod:`~simflow.eval.evaluator` (reference handling, checks,
CLI), :mod:`~simflow.eval.reference` (writing reference statistics), :mod:`~simflow.eval.sample_set` (index-seeded,
sharded, resumable sample sets behind ``python -m simflow.sample``), :mod:`~simflow.eval.weights` (generator weights
from an export or a checkpoint), :mod:`~simflow.eval.reconstruction` (VAE PSNR and rFID).
"""

# Registers the demo-FID network (issue 8) as feature extractor "demo" / "demo_fashion_cnn", so that
# `python -m simflow.fid --extractor demo` and `tools/fid_ref.py --extractor demo` find it.
from simflow.eval import demo_features as _demo_features  # noqa: E402,F401
