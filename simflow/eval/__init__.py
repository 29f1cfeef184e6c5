"""Evaluation: feature extractors, sample-quality metrics (FID, sFID, IS, precision/recall) and the ADM-format
evaluator behind ``python -m simflow.fid`` and ``tools/fid_ref.py``.

Modules: :mod:`~simflow.eval.metrics` (math on feature arrays), :mod:`~simflow.eval.features` (networks),
:mod:`~simflow.eval.npz` (streaming ``.npz`` access), :mod:`~simflow.eval.evaluator` (reference handling, checks,
CLI), :mod:`~simflow.eval.reference` (writing reference statistics), :mod:`~simflow.eval.sample_set` (index-seeded,
sharded, resumable sample sets behind ``python -m simflow.sample``), :mod:`~simflow.eval.weights` (generator weights
from an export or a checkpoint), :mod:`~simflow.eval.reconstruction` (VAE PSNR and rFID). The demo-FID network
(:mod:`~simflow.eval.demo_features`) is imported only when extractor ``"demo"`` is built (see
:mod:`~simflow.eval.features`).
"""

