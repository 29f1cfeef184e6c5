"""Metrics logging: a JSONL file per run (the source of truth), wandb (offline by default) and a loss-curve PNG."""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional

log = logging.getLogger("simflow")

# Terms drawn in the loss-curve figure, one panel each (whatever of them the run logged).
CURVE_KEYS = ("loss", "rec", "lpips", "gan", "bits_per_dim", "log_det", "z2", "d_loss", "grad_norm", "kl", "repa")


class MetricsLogger:
    """Appends one JSON object per logged step to ``<out_dir>/metrics.jsonl`` and mirrors it to wandb.

    Args:
        out_dir: run directory.
        wandb_mode: ``offline`` | ``online`` | ``disabled`` (offline writes ``<out_dir>/wandb``; nothing leaves the
            machine unless the user runs ``wandb sync``).
        project / run_name / config: wandb metadata.
        enabled: False on non-zero ranks (they log nothing).
    """

    def __init__(self, out_dir: str, wandb_mode: str = "offline", project: str = "simflow",
                 run_name: Optional[str] = None, config: Optional[Dict] = None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if wandb_mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self._wandb = wandb.init(project=project, name=run_name, id=run_name, resume="allow", mode=wandb_mode,
                                         dir=out_dir, config=config)
            except Exception as e:  # wandb must never stop training
                log.warning("wandb disabled: %s", e)
                self._wandb = None

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=int(step))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str) -> List[Dict[str, float]]:
    """All records of a ``metrics.jsonl`` (a torn last line from a killed run is ignored)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def plot_loss_curve(jsonl_path: str, png_path: str) -> Optional[str]:
    """Draw one panel per logged term of :data:`CURVE_KEYS` against the step; returns the PNG path or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(jsonl_path)
    keys = [k for k in CURVE_KEYS if any(k in r for r in recs)]
    if not recs or not keys:
        return None
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in recs if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
