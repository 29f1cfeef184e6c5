"""One task of the variant study = one (variant, seed), trained and evaluated in its own process.

:func:`run_task` trains with :class:`simflow.train.trainer.Trainer` (both stages for frozen-VAE variants), evaluates
with :func:`simflow.eval.generator.evaluate_generator` and writes ``result.json``; a finished task is read back.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ablation.plan import Variant
from simflow import storage
from simflow.eval.generator import evaluate_generator

RESULT_JSON = "result.json"


def _train(config: str, overrides: Sequence[str], out_dir: str) -> Dict[str, Any]:
    """Train one stage with :class:`simflow.train.trainer.Trainer`; skip when ``stage.json`` says it finished."""
    from simflow.config import load_config
    from simflow.train.trainer import Trainer

    marker = os.path.join(out_dir, "stage.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            return json.load(f)
    cfg = load_config(config, [*overrides, f"train.out_dir={out_dir}"])
    t0 = time.time()
    out = Trainer(cfg).fit()
    seconds = time.time() - t0
    rec = {"weights": out["weights"], "train_seconds": round(seconds, 1), "steps": out["step"],
           "final_metrics": {k: float(v) for k, v in out["metrics"].items()}, "config": config,
           "overrides": list(overrides)}
    with open(marker, "w") as f:
        json.dump(rec, f, indent=2)
    return rec


def run_task(task: Dict[str, Any]) -> Dict[str, Any]:
    """Train (both stages for frozen-VAE variants) and evaluate one (variant, seed); write ``result.json``.

    ``task`` keys: ``variant`` (:class:`Variant` as a dict), ``seed``, ``steps``, ``out_dir``, ``train_npz``,
    ``test_npz``, ``extractor_weights``, ``reference``, ``num_heldout``, ``num_samples``, ``cfg_scales``,
    ``threads``, ``overrides`` (applied to every stage, e.g. smoke-test sizes). A finished task (``result.json``
    present) is returned from disk; an interrupted one resumes from its last checkpoint.
    """
    path = os.path.join(task["out_dir"], RESULT_JSON)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    torch.set_num_threads(int(task.get("threads", 1)))
    from simflow.config import load_config
    from simflow.data.demo import load_npz
    from simflow.eval.demo_features import DemoFashionFeatures
    from simflow.eval.weights import load_generator

    v = Variant(**task["variant"])
    seed, steps = int(task["seed"]), int(task["steps"])
    common = [f"train.seed={seed}", f"train.steps={steps}", "data.source=npz", f"data.path={task['train_npz']}",
              *task.get("overrides", [])]
    os.makedirs(task["out_dir"], exist_ok=True)
    stages: Dict[str, Any] = {}
    extra: List[str] = []
    if v.pretrain is not None:
        pre_cfg, pre_over = v.pretrain
        stages["pretrain"] = _train(pre_cfg, [*common, *pre_over], os.path.join(task["out_dir"], "vae_pretrain"))
        extra = [f"train.init_vae_from={stages['pretrain']['weights']}"]
    stages["main"] = _train(v.config, [*common, *v.overrides, *extra], os.path.join(task["out_dir"], "train"))
    cfg = load_config(v.config, [*common, *v.overrides, *extra, f"train.out_dir={task['out_dir']}/train"])
    model, _ = load_generator(stages["main"]["weights"], cfg)
    extractor = DemoFashionFeatures(task["extractor_weights"])
    with np.load(task["reference"]) as z:
        reference = {k: z[k] for k in ("mu", "sigma", "pool_features") if k in z.files}
    test = load_npz(task["test_npz"])
    n = int(task["num_heldout"])
    ev = evaluate_generator(model, extractor, reference, test["images"][:n], test["labels"][:n],
                            int(task["num_samples"]), task["cfg_scales"], sample_seed=0, noise_seed=seed,
                            out_dir=task["out_dir"])
    result = {
        "variant": v.name,
        "label": v.label,
        "group": v.group,
        "seed": seed,
        "steps": steps,
        "train_seconds": sum(s["train_seconds"] for s in stages.values()),
        "stages": stages,
        "feature_extractor": extractor.describe(),
        **ev,
    }
    storage.write_bytes(path, json.dumps(result, indent=2, default=float).encode())
    return result
