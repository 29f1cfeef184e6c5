"""This rank's RNG states (torch CPU and CUDA, numpy, python ``random``) for the checkpoint's ``rng-<rank>.pt``.

The data order and the per-sample noise never depend on these (:mod:`simflow.rng`); they are saved so that any
other use of the global generators (dropout, a user's augmentation) continues exactly after a resume at the same
world size (Megatron-LM saves per-rank RNG states the same way). Containers are ``torch.load(weights_only=True)``
loadable: tensors, ints, strings and lists only.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List

import numpy as np
import torch


def rng_state() -> Dict[str, Any]:
    """Per-rank RNG states (torch CPU/CUDA, numpy, python) as weights_only-loadable containers."""
    state = {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": _py_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _np_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
            "cached": cached}


def _py_state() -> List[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (the CUDA state only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


__all__ = ["rng_state", "set_rng_state"]
