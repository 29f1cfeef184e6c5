"""What the training loop records per step without waiting for the device: metric rows and skipped-step counters.

Both keep 0-dim device tensors and only device ops between log steps (no ``.item()``, ``.tolist()``, ``float(t)``
or Python branching on tensor values): the host reads them once per ``train.log_every`` steps and before every
checkpoint save (torchtitan's ``should_log`` / nanoGPT's "this is a CPU-GPU sync point" rule).

* :class:`MetricWindow`: one row per step (the step's micro-batch-averaged metrics stacked into one vector);
  :meth:`MetricWindow.flush` reduces every pending row across ranks with **one** all-reduce of the concatenated
  rows and converts them to Python floats with one ``.tolist()``.
* :class:`SkipTracker`: the non-finite (skipped) steps: cumulative count, consecutive count, first and last skipped
  step of the window and a bitmask of what was non-finite (bits of
  :func:`simflow.parallel.engine.nonfinite_bits`; the discriminator's shifted by 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

# what each bit of a step's combined mask means (generator engine bits 0-1, discriminator engine bits 2-3)
SKIP_REASONS = {1: "generator loss", 2: "generator grad norm", 4: "discriminator loss", 8: "discriminator grad norm"}


class MetricWindow:
    """Pending per-step metric rows (device tensors) until the next flush.

    Args:
        device: where the rows live (the compute device).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._rows: List[Tuple[int, List[str], torch.Tensor, Dict[str, float]]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, step: int, metrics: Dict[str, torch.Tensor], host: Dict[str, float]) -> None:
        """Queue step ``step``'s row: ``metrics`` 0-dim device tensors (reduced across ranks as a mean at flush),
        ``host`` Python floats already equal on every rank (lr, counters). Device ops only."""
        keys = sorted(metrics)
        vec = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]) if keys else \
            torch.zeros(0, device=self.device)
        self._rows.append((step, keys, vec, dict(host)))

    def flush(self, world_size: int = 1, group=None) -> List[Dict[str, float]]:
        """Collective when ``world_size > 1``: every rank flushes at the same step. Returns one dict per pending row,
        ``{"step": step, **metrics averaged over the ranks (float64), **host}``, and empties the window. One
        all-reduce (SUM of the concatenated rows, fp64) and one device-to-host copy (``tolist``), whatever the
        number of rows. TP ranks hold identical values, so the world mean equals the data-parallel mean."""
        if not self._rows:
            return []
        flat = torch.cat([r[2] for r in self._rows]).double()
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            if dist.get_backend(group) != "nccl":
                flat = flat.cpu()  # gloo reduces host tensors
            dist.all_reduce(flat, group=group)
            flat = flat / world_size
        values = flat.tolist()
        out, i = [], 0
        for step, keys, vec, host in self._rows:
            n = vec.numel()
            out.append({"step": step, **dict(zip(keys, values[i:i + n])), **host})
            i += n
        self._rows.clear()
        return out


@dataclass
class SkipReport:
    """Host view of :class:`SkipTracker` at a read: ``total`` skipped steps (cumulative, survives resume),
    ``consecutive`` skips ending at the last step, ``window`` skips since the previous read, the ``first`` / ``last``
    skipped step of that window (trainer step numbers, 1-based as logged; -1 if none) and the OR of their reason
    bits (:data:`SKIP_REASONS`)."""

    total: int
    consecutive: int
    window: int
    first: int
    last: int
    mask: int

    def reasons(self) -> List[str]:
        return [name for bit, name in SKIP_REASONS.items() if self.mask & bit]

    def describe(self) -> str:
        steps = f"step {self.first}" if self.window == 1 else f"{self.window} steps between {self.first} and {self.last}"
        return (f"skipped {steps} (non-finite {', '.join(self.reasons()) or '?'}); {self.consecutive} consecutive, "
                f"{self.total} in total")


class SkipTracker:
    """Device-side counters of skipped steps (see the module docstring); :meth:`update` is device ops only.

    Args:
        device: the compute device.
        total: skipped steps before this run segment (from the checkpoint's trainer state).
    """

    def __init__(self, device: torch.device, total: int = 0):
        z = lambda v=0: torch.full((), v, dtype=torch.int64, device=device)  # noqa: E731
        self.total, self.consecutive, self.window = z(total), z(), z()
        self.first, self.last, self.mask = z(-1), z(-1), z()

    def update(self, step: int, bits: torch.Tensor) -> None:
        """Record step ``step`` (host int) with its combined reason ``bits`` (0-dim int64; 0 = applied)."""
        skipped = (bits != 0).to(torch.int64)
        self.total += skipped
        self.window += skipped
        self.consecutive = (self.consecutive + 1) * skipped
        self.first = torch.where((self.first < 0) & (skipped > 0), step, self.first)
        self.last = torch.where(skipped > 0, step, self.last)
        self.mask = self.mask | bits.to(torch.int64)

    def read(self) -> SkipReport:
        """Host read (one device-to-host copy): the report, then the window part is reset."""
        vals = torch.stack([self.total, self.consecutive, self.window, self.first, self.last, self.mask]).tolist()
        self.window.zero_()
        self.first.fill_(-1)
        self.last.fill_(-1)
        self.mask.zero_()
        return SkipReport(*(int(v) for v in vals))


def poisoned_steps(spec: Optional[str], rank: int) -> Dict[int, None]:
    """Parse the test hook ``SIMFLOW_TEST_POISON_LOSS`` (trainer): ``STEP[@RANK][,STEP[@RANK]...]``, 0-based trainer
    steps whose generator and discriminator losses this rank multiplies by NaN (all ranks when ``@RANK`` is left
    out). Returns the steps for ``rank`` (as dict keys, for O(1) lookup).

    Raises:
        ValueError: a malformed entry, naming it.
    """
    out: Dict[int, None] = {}
    for item in (spec or "").replace(" ", "").split(","):
        if not item:
            continue
        step, _, r = item.partition("@")
        try:
            s, rr = int(step), (int(r) if r else None)
        except ValueError:
            raise ValueError(f"SIMFLOW_TEST_POISON_LOSS: bad entry {item!r}; expected STEP or STEP@RANK") from None
        if rr is None or rr == rank:
            out[s] = None
    return out


__all__ = ["MetricWindow", "SKIP_REASONS", "SkipReport", "SkipTracker", "poisoned_steps"]
