"""Command-line pieces shared by the evaluation entry points (``python -m simflow.fid`` and
``python -m simflow.reconstruction``): one parent parser for the feature-network, device and output flags, one
rule for which weights a feature extractor gets, one way to report bad input.

Exit codes of these entry points: 0 success; 2 bad input (a flag, a file or a config value), with one line
``error: ...`` on stderr that names the flag or file. Never ``SystemExit("...")`` (status 1).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Optional, Tuple

from simflow import storage


class UsageError(ValueError):
    """Bad command-line input; the message names the flag (or config key) and what to pass instead."""


def eval_parent_parser() -> argparse.ArgumentParser:
    """Parent parser (``argparse.ArgumentParser(parents=[...])``) with the flags both evaluation CLIs share.

    Flags (all default None/False, so the config's ``eval.*`` section supplies the default):
    ``--extractor``, ``--inception-weights``, ``--extractor-weights``, ``--fd-method``, ``--device``, ``--out``,
    ``--no-progress``.
    """
    from simflow.eval.features import available_feature_extractors
    from simflow.eval.metrics import FD_METHODS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("feature network, device and output")
    g.add_argument("--extractor", default=None,
                   help=f"feature network (default: eval.feature_extractor; registered: "
                        f"{list(available_feature_extractors())})")
    g.add_argument("--inception-weights", default=None, help="local InceptionV3 weights (.pth), never downloaded")
    g.add_argument("--extractor-weights", default=None, help="weights of a non-Inception --extractor")
    g.add_argument("--fd-method", choices=FD_METHODS, default=None,
                   help="matrix square root of the Frechet distance: sqrtm (ADM) or eigh (default: eval.fd_method)")
    g.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: eval.device)")
    g.add_argument("--out", default=None, help="write the result JSON here (atomically; default: print only)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_extractor(args: argparse.Namespace, ecfg: Any, purpose: str = "FID",
                      hint: str = "") -> Tuple[str, str]:
    """``(kind, weights_path)`` of the feature network: the flags win over the config's ``eval`` section.

    Inception reads ``--inception-weights`` / ``eval.inception_weights``; any other kind ``--extractor-weights`` /
    ``eval.extractor_weights``.

    Args:
        args: parsed with :func:`eval_parent_parser` among the parents.
        ecfg: a :class:`simflow.config.EvalConfig`.
        purpose: names the metric in the message (``"FID"``, ``"rFID"``).
        hint: appended to the message (e.g. ``" (or --metrics psnr)"``).

    Raises:
        UsageError: no weights for the chosen kind (names the flag and the config key).
    """
    kind = args.extractor or ecfg.feature_extractor
    if kind == "inception":
        weights, flag, key = args.inception_weights or ecfg.inception_weights, "--inception-weights", "inception_weights"
    else:
        weights, flag, key = args.extractor_weights or ecfg.extractor_weights, "--extractor-weights", "extractor_weights"
    if not weights:
        raise UsageError(f"{purpose} needs {kind} weights: pass {flag} PATH (or set eval.{key} in the config){hint}")
    return kind, weights


def write_result(result: Dict[str, Any], out: Optional[str]) -> str:
    """The result as indented JSON text; also written atomically to ``out`` when given."""
    text = json.dumps(result, indent=2)
    if out:
        storage.write_bytes(out, (text + "\n").encode())
    return text


__all__ = ["UsageError", "eval_parent_parser", "resolve_extractor", "write_result"]
