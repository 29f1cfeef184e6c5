"""The paper's variant study (method §10.3) at small scale on the demo data: train, evaluate, tabulate (issue 8).

Variants (configs under ``configs/ablate/``, all from the same base, trained for the same number of steps):

* **a** end-to-end, fixed posterior std 0.5 (SimFlow, method §3.2 / §5.1); plus a ``posterior_std`` sweep;
* **b** end-to-end, learned posterior variance with the KL term (LDM/REPA-E weight, method §5.2);
* **c** end-to-end, learned variance + STARFlow-style extra Gaussian latent noise (``model.flow.noise_std``,
  method §5.5 / §10.3 "Noise");
* **d** frozen VAE: a learned-variance VAE pretrained on the same data (``loss.nll_weight=0``), then the flow trained
  on its frozen latents (``train.init_vae_from`` + ``train.freeze_vae``; method §10.3 "Frozen VAE").

Per trained generator (:func:`evaluate_generator`), on the held-out Fashion-MNIST test split:

* VAE reconstruction decoding ``mu`` (method §12 #10): PSNR (dB) and demo-rFID (:mod:`simflow.eval.reconstruction`);
* flow NLL of the posterior latents in bits/dim (:func:`heldout_nll`, method §4.4), with the true labels;
* demo-gFID (and demo-IS, precision/recall) of class-conditional samples without guidance and for each CFG scale of a
  small sweep, against the test split's statistics (:mod:`simflow.eval.demo_features`; never Inception FID).

:func:`run_task` trains and evaluates one (variant, seed) in its own process and writes ``result.json``;
:func:`write_report` turns a set of results into the markdown table and plot under ``docs/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from simflow.data.transforms import to_model_input
from simflow.eval.features import FeatureExtractor
from simflow.eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from simflow.sampling import sample_images, sample_labels, save_grid, to_uint8
from simflow.rng import Stream, per_sample_normal

RESULT_JSON = "result.json"
LOG2 = math.log(2.0)
LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One row of the study.

    Attributes:
        name: short id (``a``, ``b``, ``c``, ``d``, ``a_std0.25``, ...).
        config: YAML file (``configs/ablate/*.yaml``).
        overrides: extra ``key=value`` overrides (the posterior_std sweep).
        label: what the row is, for the table.
        pretrain: for frozen-VAE variants, the (YAML, overrides) of the VAE pretraining stage that runs first with the
            same step budget; its exported weights feed ``train.init_vae_from`` of the main stage.
        group: ``main`` (the four variants of method §10.3) or ``sweep`` (posterior_std sweep of variant a).
    """

    name: str
    config: str
    overrides: List[str] = field(default_factory=list)
    label: str = ""
    pretrain: Optional[Tuple[str, List[str]]] = None
    group: str = "main"


STD_SWEEP = (0.25, 0.5, 0.75, 1.0)


def default_plan(config_dir: str) -> List[Variant]:
    """The four variants of issue 8 (a-d) and the ``posterior_std`` sweep of (a) (0.5 is (a) itself)."""
    c = lambda name: os.path.join(config_dir, name)  # noqa: E731
    plan = [
        Variant("a", c("a_e2e_fixed.yaml"), [], "end-to-end, fixed std 0.5 (SimFlow)"),
        Variant("b", c("b_e2e_learned.yaml"), [], "end-to-end, learned variance + KL"),
        Variant("c", c("c_e2e_noise.yaml"), [], "end-to-end, learned variance + latent noise 0.3 (STARFlow-style)"),
        Variant("d", c("d_frozen_vae.yaml"), [], "frozen VAE (learned variance, pretrained), then flow",
                pretrain=(c("d_vae_pretrain.yaml"), [])),
    ]
    for s in STD_SWEEP:
        if s != 0.5:
            plan.append(Variant(f"a_std{s:g}", c("a_e2e_fixed.yaml"), [f"model.vae.posterior_std={s}"],
                                f"end-to-end, fixed std {s:g}", group="sweep"))
    return plan


# ------------------------------------------------------------------------------------------------------------------
# evaluation pieces
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_nll(model, images: np.ndarray, labels: np.ndarray, seed: int = 0, batch_size: int = 250,
                device: torch.device = torch.device("cpu")) -> Dict[str, float]:
    """Flow NLL of posterior latents of held-out images, conditional on their true labels (method §4.4).

    For each image ``x_i`` (index ``i`` seeds the noise): ``z = mu + std * eps`` (the posterior sample the flow is
    trained on, method §3.2), plus ``noise_std * eps'`` when ``model.flow.noise_std > 0``; then
    ``-log p(z | y) / d`` from the flow's exact change of variables.

    Args:
        model: :class:`~simflow.models.simflow.SimFlowModel` in eval mode on ``device``.
        images: uint8 (N, H, W, 3); labels: int (N,) class labels.
        seed: seed of the per-image noise streams.

    Returns:
        ``bits_per_dim`` and ``nats_per_dim`` (means over images, including the 1/2 log 2 pi constant),
        ``posterior_std`` (mean std of the latent noise: the fixed std, or mean exp(logvar/2) (+ noise) for learned
        posteriors), ``latent_rms`` (RMS of ``mu``), ``bound_bits_per_dim`` (the entropy bound 1/2 log2(2 pi e s^2)
        of method §4.4 for a fixed std s, else None) and ``num_images``.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"heldout_nll: {len(images)} images vs {len(labels)} labels (need the same, > 0)")
    vae, flow = model.vae, model.flow
    noise_std = float(model.cfg.model.flow.noise_std)
    shape = tuple(model.latent_shape)
    nll_sum, std_sum, mu_sq, count = 0.0, 0.0, 0.0, 0
    for lo in range(0, len(images), batch_size):
        idx = torch.arange(lo, min(lo + batch_size, len(images)), dtype=torch.int64)
        x = to_model_input(images[lo : lo + batch_size]).to(device)
        y = torch.as_tensor(labels[lo : lo + batch_size], dtype=torch.int64, device=device)
        mu, logvar = vae.encode(x)
        eps = per_sample_normal(shape, seed, idx, Stream.POSTERIOR).to(device)
        z = vae.reparameterize(mu, logvar, eps)
        std = vae.posterior_std(logvar)
        var = (std if isinstance(std, float) else std.float()) ** 2
        if noise_std > 0:
            z = z + noise_std * per_sample_normal(shape, seed, idx, Stream.LATENT_NOISE).to(device)
            var = var + noise_std**2
        flow_z, log_det, _ = flow(z, y)
        nll_sum += float(flow.nll_loss(flow_z, log_det).double().sum())
        std_sum += float(torch.as_tensor(var).sqrt().mean()) * len(idx)
        mu_sq += float(mu.float().pow(2).mean()) * len(idx)
        count += len(idx)
    nats = nll_sum / count + 0.5 * LOG_2PI
    bound = None
    if model.cfg.model.vae.posterior == "fixed":
        s2 = float(model.cfg.model.vae.posterior_std) ** 2 + noise_std**2
        bound = 0.5 * math.log2(2 * math.pi * math.e * s2)
    return {
        "bits_per_dim": nats / LOG2,
        "nats_per_dim": nats,
        "posterior_std": std_sum / count,
        "latent_rms": math.sqrt(mu_sq / count),
        "bound_bits_per_dim": bound,
        "num_images": count,
    }


@torch.no_grad()
def generate(model, num_samples: int, sample_cfg, batch_size: int = 500,
             device: torch.device = torch.device("cpu")) -> Tuple[np.ndarray, np.ndarray]:
    """Class-conditional samples for indices ``0..num_samples-1`` (labels and noise from (seed, index), design.md).

    Args:
        model: generator in eval mode; sample_cfg: :class:`simflow.config.SampleConfig` (CFG scale/mode, seed,
            temperature).

    Returns:
        (uint8 (N, H, W, 3) images, int64 (N,) labels).
    """
    out, labs = [], []
    for lo in range(0, num_samples, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, num_samples), dtype=torch.int64)
        y = sample_labels(model.flow.num_classes, sample_cfg.seed, idx)
        x = sample_images(model, idx, y, sample_cfg, device)
        out.append(to_uint8(x).numpy())
        labs.append(y.numpy())
    return np.concatenate(out), np.concatenate(labs)


def score_samples(images: np.ndarray, extractor: FeatureExtractor, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                  ref_features: Optional[np.ndarray] = None, pr_k: int = 3,
                  labels: Optional[np.ndarray] = None) -> Dict[str, float]:
    """demo-gFID (Fréchet distance of pool features, Heusel et al. 2017), demo-IS (one split over all images,
    Salimans et al. 2016) and, given reference features, precision/recall (Kynkäänniemi et al. 2019, k=``pr_k``).
    With ``labels``, also ``class_accuracy``: the share of samples the feature network classifies as their
    conditioning label (how well class conditioning works).

    Args:
        images: uint8 (N, H, W, 3); ref_mu/ref_sigma: float64 (D,), (D, D) reference statistics;
        ref_features: float (N_ref, D) reference pool features or None.

    Returns:
        dict with ``<prefix>fid``, ``<prefix>inception_score``, optional ``<prefix>precision``/``<prefix>recall``
        and ``class_accuracy`` (prefix ``demo_`` for the demo network).
    """
    feats = extractor.extract(images, batch_size=500, progress=False)
    mu, sigma = feature_statistics(feats["pool"])
    p = extractor.metric_prefix
    out = {p + "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma)}
    if "logits" in feats:
        out[p + "inception_score"] = inception_score(feats["logits"], split_size=len(images))[0]
        if labels is not None:
            out["class_accuracy"] = float((feats["logits"].argmax(1) == labels).mean())
    if ref_features is not None:
        out[p + "precision"], out[p + "recall"] = precision_recall(ref_features, feats["pool"], k=pr_k)
    return out


def evaluate_generator(
    model,
    extractor: FeatureExtractor,
    reference: Dict[str, np.ndarray],
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_samples: int,
    cfg_scales: Sequence[float],
    sample_seed: int = 0,
    noise_seed: int = 0,
    out_dir: Optional[str] = None,
    device: torch.device = torch.device("cpu"),
) -> Dict[str, Any]:
    """All per-variant numbers of the study for one trained generator.

    Args:
        model: :class:`~simflow.models.simflow.SimFlowModel` (EMA flow, raw VAE) in eval mode.
        extractor: demo feature network.
        reference: ``mu``, ``sigma`` (and ``pool_features``) of the test split (``tools/fid_ref.py`` format).
        test_images / test_labels: held-out uint8 (M, H, W, 3) images and labels for reconstruction and NLL.
        num_samples: samples per guidance setting for demo-gFID.
        cfg_scales: guidance scales w > 0 to sweep (``model.cfg.sample.cfg_mode``); w = 0 is always evaluated.
        sample_seed: seed of the sample noise and labels; noise_seed: seed of the posterior noise for the NLL.
        out_dir: where to write sample grids (``samples_cfg<w>.png``), or None.

    Returns:
        dict: ``reconstruction`` (psnr, demo_rfid, ...), ``nll`` (:func:`heldout_nll`), ``samples`` (scale ->
        scores), ``gfid_no_cfg``, ``gfid_best_cfg``, ``best_cfg_scale``, ``eval_seconds``.
    """
    from simflow.eval.reconstruction import evaluate_reconstruction
    from simflow.eval.reference import ImageSet

    t0 = time.time()

    class _Arrays(ImageSet):
        def __init__(self, images: np.ndarray):
            self.images, self.num_images = images, len(images)
            self.resolution = tuple(images.shape[1:3])
            self.description = f"held-out test images ({len(images)})"

        def batches(self, batch_size: int):
            for lo in range(0, self.num_images, batch_size):
                yield self.images[lo : lo + batch_size]

    rec = evaluate_reconstruction(model.vae, _Arrays(test_images), extractor, batch_size=250, device=device,
                                  progress=False)
    rec.pop("feature_extractor", None)
    nll = heldout_nll(model, test_images, test_labels, seed=noise_seed, device=device)
    samples: Dict[str, Dict[str, float]] = {}
    scales = [0.0] + [float(w) for w in cfg_scales if w != 0]
    for w in scales:
        scfg = dataclasses.replace(model.cfg.sample, cfg_scale=w, seed=sample_seed, temperature=1.0)
        ts = time.time()
        images, labels = generate(model, num_samples, scfg, device=device)
        scores = score_samples(images, extractor, reference["mu"], reference["sigma"],
                               reference.get("pool_features"), labels=labels)
        scores["seconds"] = round(time.time() - ts, 1)
        samples[f"{w:g}"] = scores
        if out_dir:
            per_class = [np.flatnonzero(labels == c)[:4] for c in range(model.flow.num_classes)]
            order = [p[j] for j in range(4) for p in per_class if j < len(p)]  # rows of one sample per class
            grid = torch.from_numpy(images[order]).permute(0, 3, 1, 2).float() / 127.5 - 1
            save_grid(grid, os.path.join(out_dir, f"samples_cfg{w:g}.png"), nrow=model.flow.num_classes)
    key = extractor.metric_prefix + "fid"
    guided = {w: s for w, s in samples.items() if float(w) != 0}
    best = min(guided, key=lambda w: guided[w][key]) if guided else "0"
    return {
        "reconstruction": rec,
        "nll": nll,
        "samples": samples,
        "gfid_no_cfg": samples["0"][key],
        "gfid_best_cfg": samples[best][key],
        "best_cfg_scale": float(best),
        "num_samples": num_samples,
        "num_heldout": len(test_images),
        "eval_seconds": round(time.time() - t0, 1),
    }


# ------------------------------------------------------------------------------------------------------------------
# one task = one (variant, seed), run in its own process
# ------------------------------------------------------------------------------------------------------------------
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
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=float)
    os.replace(tmp, path)
    return result


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------
def _agg(values: Sequence[float]) -> Tuple[float, float, int]:
    """(mean, half the range, count) of the finite values; (nan, nan, 0) when there are none."""
    vals = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not vals:
        return math.nan, math.nan, 0
    return float(np.mean(vals)), (max(vals) - min(vals)) / 2, len(vals)


def _fmt(values: Sequence[float], digits: int = 2) -> str:
    m, h, n = _agg(values)
    if n == 0:
        return "n/a"
    return f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f} ± {h:.{digits}f}"


def summarise(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Group results by variant (main variants first, then the sweep, each by name) and list per-seed values.

    Returns:
        one dict per variant: ``variant``, ``label``, ``group``, ``seeds``, and lists of per-seed values
        ``psnr``, ``rfid``, ``bpd``, ``std``, ``gfid0``, ``gfid_cfg``, ``cfg_scale``, ``is0``, ``acc0``, ``acc_cfg``,
        ``prec0``, ``rec0``, ``train_s``.
    """
    rows: Dict[str, Dict[str, Any]] = {}
    for r in results:
        row = rows.setdefault(r["variant"], {"variant": r["variant"], "label": r["label"], "group": r["group"],
                                             "seeds": []})
        row["seeds"].append(r["seed"])
        s0 = r["samples"]["0"]
        sb = r["samples"][f"{r['best_cfg_scale']:g}"]
        for key, val in (("psnr", r["reconstruction"]["psnr"]), ("rfid", r["reconstruction"].get("demo_rfid")),
                         ("bpd", r["nll"]["bits_per_dim"]), ("std", r["nll"]["posterior_std"]),
                         ("gfid0", r["gfid_no_cfg"]), ("gfid_cfg", r["gfid_best_cfg"]),
                         ("cfg_scale", r["best_cfg_scale"]), ("is0", s0.get("demo_inception_score")),
                         ("acc0", s0.get("class_accuracy")), ("acc_cfg", sb.get("class_accuracy")),
                         ("prec0", s0.get("demo_precision")), ("rec0", s0.get("demo_recall")),
                         ("train_s", r["train_seconds"])):
            row.setdefault(key, []).append(val)
    return sorted(rows.values(), key=lambda r: (r["group"] != "main", r["variant"]))


def ordering_verdict(rows: Sequence[Dict[str, Any]]) -> Tuple[List[str], str]:
    """Rank the main variants by mean demo-gFID without CFG (the paper's variant table reports gFID without CFG,
    method §10.3) and compare with the paper's ordering: end-to-end fixed variance (a) best, then end-to-end with
    latent noise (c), then the frozen VAE (d); (b) is not in the paper's table (method §5.1 predicts it degrades).

    Returns:
        (variant names best first, one-paragraph verdict in plain words).
    """
    main = [r for r in rows if r["group"] == "main"]
    rank = sorted(main, key=lambda r: _agg(r["gfid0"])[0])
    names = [r["variant"] for r in rank]
    pos = {n: i for i, n in enumerate(names)}
    parts = []
    if all(k in pos for k in ("a", "c", "d")):
        holds = pos["a"] < pos["c"] < pos["d"]
        parts.append(
            f"Paper ordering a (E2E fixed var) < c (E2E noise) < d (frozen VAE) on demo-gFID without CFG: "
            f"{'HOLDS' if holds else 'does NOT hold'} in the means over seeds (measured order, best first: {' < '.join(names)})."
        )
        a_best = pos["a"] == 0
        parts.append(f"End-to-end fixed variance is {'the best' if a_best else 'not the best'} of the main variants.")
        by = {r["variant"]: r for r in main}
        for key, what in (("gfid0", "without CFG"), ("gfid_cfg", "with the best CFG")):
            pairs = []
            for x, y in (("a", "c"), ("c", "d"), ("a", "d")):
                gx, gy = [float(v) for v in by[x][key]], [float(v) for v in by[y][key]]
                if len(gx) < 2 or len(gy) < 2:
                    pairs.append(f"{x} vs {y}: one seed only, noise unknown")
                elif max(gx) < min(gy):
                    pairs.append(f"{x} < {y} in every seed (ranges [{min(gx):.1f}, {max(gx):.1f}] and "
                                 f"[{min(gy):.1f}, {max(gy):.1f}] do not overlap)")
                elif max(gy) < min(gx):
                    pairs.append(f"{y} < {x} in every seed, AGAINST the paper (ranges [{min(gy):.1f}, {max(gy):.1f}] "
                                 f"and [{min(gx):.1f}, {max(gx):.1f}])")
                else:
                    pairs.append(f"{x} vs {y} within seed noise (ranges [{min(gx):.1f}, {max(gx):.1f}] and "
                                 f"[{min(gy):.1f}, {max(gy):.1f}] overlap)")
            parts.append(f"Pairwise, {what}: " + "; ".join(pairs) + ".")
    if "b" in pos:
        parts.append(f"Variant b (E2E learned variance, not in the paper's table) ranks {pos['b'] + 1} of {len(names)}.")
    return names, " ".join(parts)


def noise_note(rows: Sequence[Dict[str, Any]]) -> str:
    """Plain-words statement of seed-to-seed spread for variants with >= 2 seeds, and of the gaps between them."""
    lines = []
    multi = [r for r in rows if len(r["seeds"]) >= 2]
    for r in multi:
        g = [float(x) for x in r["gfid0"]]
        c = [float(x) for x in r["gfid_cfg"]]
        lines.append(f"{r['variant']}: demo-gFID without CFG {', '.join(f'{x:.2f}' for x in g)} over seeds "
                     f"{r['seeds']} (spread {max(g) - min(g):.2f}); with CFG {', '.join(f'{x:.2f}' for x in c)} "
                     f"(spread {max(c) - min(c):.2f}).")
    if len(multi) >= 2:  # the two best (by mean demo-gFID without CFG) of the multi-seed variants
        a, b = sorted(multi, key=lambda r: _agg(r["gfid0"])[0])[:2]
        gap = abs(_agg(a["gfid0"])[0] - _agg(b["gfid0"])[0])
        spread = max(max(map(float, r["gfid0"])) - min(map(float, r["gfid0"])) for r in (a, b))
        lines.append(f"Gap between {a['variant']} and {b['variant']} (no CFG): {gap:.2f}, "
                     f"{'larger' if gap > spread else 'NOT larger'} than the largest seed spread ({spread:.2f}).")
    return " ".join(lines) if lines else "Only one seed per variant: no estimate of seed noise."


def plot_results(rows: Sequence[Dict[str, Any]], path: str) -> str:
    """Bar chart of demo-gFID (no CFG, best CFG) per variant with seed ranges, PSNR/demo-rFID per variant, and the
    posterior_std sweep of variant a. Writes a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r["variant"] for r in rows]
    x = np.arange(len(rows))
    for off, key, lab in ((-0.2, "gfid0", "no CFG"), (0.2, "gfid_cfg", "best CFG")):
        m = [_agg(r[key])[0] for r in rows]
        h = [_agg(r[key])[1] if _agg(r[key])[2] > 1 else 0.0 for r in rows]
        axes[0].bar(x + off, m, 0.4, yerr=h, capsize=3, label=lab)
    axes[0].set_xticks(x, names, rotation=30)
    axes[0].set_ylabel("demo-gFID (lower is better)")
    axes[0].set_title("generation (error bar: half range over seeds)")
    axes[0].legend()
    ax = axes[1]
    ax.bar(x - 0.2, [_agg(r["psnr"])[0] for r in rows], 0.4, color="tab:green", label="PSNR (dB)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_xticks(x, names, rotation=30)
    ax2 = ax.twinx()
    ax2.bar(x + 0.2, [_agg(r["rfid"])[0] for r in rows], 0.4, color="tab:red", label="demo-rFID")
    ax2.set_ylabel("demo-rFID")
    ax.set_title("VAE reconstruction (decode mu)")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    sweep = []
    for r in rows:
        if r["variant"] == "a" or r["variant"].startswith("a_std"):
            s = 0.5 if r["variant"] == "a" else float(r["variant"][len("a_std"):])
            sweep.append((s, _agg(r["gfid0"])[0], _agg(r["gfid_cfg"])[0], _agg(r["rfid"])[0]))
    sweep.sort()
    if sweep:
        s = [t[0] for t in sweep]
        axes[2].plot(s, [t[1] for t in sweep], "o-", label="demo-gFID no CFG")
        axes[2].plot(s, [t[2] for t in sweep], "s-", label="demo-gFID best CFG")
        axes[2].plot(s, [t[3] for t in sweep], "^--", label="demo-rFID")
        axes[2].set_xlabel("posterior_std (variant a)")
        axes[2].set_title("posterior_std sweep")
        axes[2].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_samples(rows: Sequence[Dict[str, Any]], run_dir: str, path: str, seed: int = 0) -> Optional[str]:
    """One panel per variant: the ``samples_cfg0.png`` grid (no guidance; rows of one sample per class) of its run
    with training seed ``seed`` under ``run_dir/<variant>/seed<seed>/``. Returns ``path``, or None when no grid
    exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    grids = [(r["variant"], r["label"], os.path.join(run_dir, r["variant"], f"seed{seed}", "samples_cfg0.png"))
             for r in rows]
    grids = [g for g in grids if os.path.isfile(g[2])]
    if not grids:
        return None
    cols = min(4, len(grids))
    nrows = (len(grids) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.2 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, label, p) in zip(axes.flat, grids):
        ax.imshow(mpimg.imread(p), interpolation="nearest")
        ax.set_title(f"{name}: {label}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_report(results: Sequence[Dict[str, Any]], md_path: str, png_path: str, meta: Dict[str, Any]) -> str:
    """Write the markdown table (with the command, seeds, commit and the ordering verdict) and the plot.

    Args:
        results: ``result.json`` dicts of finished tasks.
        md_path / png_path: outputs.
        meta: ``command``, ``commit``, ``steps``, ``num_samples``, ``num_heldout``, ``cfg_scales``, ``seeds``,
            ``wall_seconds``, ``extractor`` (describe()), ``notes`` (list of strings), ``missing`` (tasks that did
            not finish), ``real_floor`` (:func:`score_samples` of real training images, or absent), ``run_dir``
            (the run folder: adds a figure of each variant's samples, ``<png>_samples.png``), ``invocations``.

    Returns:
        ``md_path``.
    """
    rows = summarise(results)
    plot_results(rows, png_path)
    names, verdict = ordering_verdict(rows)
    ex = meta.get("extractor", {})
    lines = [
        "# Variant study at small scale (method §10.3) on Fashion-MNIST 32x32",
        "",
        "All quality numbers are **demo-FID**: Fréchet distances of the penultimate features of a small Fashion-MNIST "
        "classifier (`simflow/eval/demo_features.py`), **not Inception FID**, and not comparable with the paper's "
        "numbers; only the ordering and the gaps between variants can be compared.",
        "",
        "Reproduce with (from scratch this trains and evaluates every row below; finished tasks in the run folder are "
        "read back from disk instead):",
        "",
        "```",
        meta.get("command", ""),
        "```",
        "",
    ]
    if len(meta.get("invocations", [])) > 1:
        lines += ["These numbers were produced by the following invocations on the same run folder:", ""]
        lines += [f"{i + 1}. `{inv['command']}` at commit `{inv['commit']}`, started {inv['started']}, "
                  f"{inv['seconds'] / 60:.1f} min" for i, inv in enumerate(meta["invocations"])]
        lines.append("")
    lines += [
        f"- commit: `{meta.get('commit', 'unknown')}`",
        f"- training steps per stage: {meta.get('steps')} (global batch {meta.get('batch_size')}); variant d also "
        f"pretrains its VAE for the same number of steps first (its wall time includes both stages)",
        f"- training seeds: {meta.get('seeds')}; sample seed 0 (labels and noise per sample index)",
        f"- demo-gFID: {meta.get('num_samples')} samples per guidance setting vs. the statistics of "
        f"{meta.get('num_reference')} test images; CFG (`{meta.get('cfg_mode', 'deep_only')}`) scales swept: {meta.get('cfg_scales')}, the best "
        f"one reported (chosen on the same samples, so slightly optimistic)",
        f"- PSNR / demo-rFID (decode mu) and flow NLL on the first {meta.get('num_heldout')} test images",
        f"- feature network: `{ex.get('weights', '')}` (sha256 `{ex.get('weights_sha256', '')}`, test accuracy "
        f"{ex.get('test_accuracy')})",
        f"- wall time of the whole run: {meta.get('wall_seconds', 0) / 60:.1f} min with {meta.get('jobs')} "
        f"parallel jobs x {meta.get('threads')} thread(s) on a shared 2-core CPU machine"
        + (f" ({len(meta['invocations'])} invocations of the command: first run and resumes)"
           if len(meta.get("invocations", [])) > 1 else ""),
        "",
        "| variant | what | seeds | PSNR (dB) | demo-rFID | NLL (bits/dim) | posterior std | demo-gFID no CFG | "
        "demo-gFID best CFG (w) | class acc. no CFG / CFG | demo-IS no CFG | prec / rec no CFG | train wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ws = sorted({f"{float(w):g}" for w in r["cfg_scale"]})
        lines.append(
            f"| {r['variant']} | {r['label']} | {','.join(map(str, r['seeds']))} | {_fmt(r['psnr'])} | "
            f"{_fmt(r['rfid'])} | {_fmt(r['bpd'], 3)} | {_fmt(r['std'], 3)} | **{_fmt(r['gfid0'])}** | "
            f"{_fmt(r['gfid_cfg'])} ({'/'.join(ws)}) | {_fmt(r['acc0'])} / {_fmt(r['acc_cfg'])} | "
            f"{_fmt(r['is0'])} | {_fmt(r['prec0'])} / {_fmt(r['rec0'])} | {_fmt(r['train_s'], 0)} |"
        )
    lines += [
        "",
        (f"Floor (no model): the first {meta.get('num_samples')} real training images scored like samples give "
         f"demo-gFID {meta['real_floor'].get('demo_fid', math.nan):.3f}, class accuracy "
         f"{meta['real_floor'].get('class_accuracy', math.nan):.3f}, precision/recall "
         f"{meta['real_floor'].get('demo_precision', math.nan):.3f} / {meta['real_floor'].get('demo_recall', math.nan):.3f}."
         if meta.get("real_floor") else ""),
        "",
        "Values with two or more seeds are `mean ± half range` over the seeds. NLL is of the posterior latents of held-out images under "
        "the flow (true labels); it is a density of a *different variable* for each variant (the latent scale is "
        "learned), so it compares across variants only loosely; for fixed std s it cannot go below "
        "1/2 log2(2 pi e s^2) bits/dim (method §4.4).",
        "",
        "## Does the paper's ordering hold here?",
        "",
        verdict,
        "",
        "## How noisy are the numbers?",
        "",
        noise_note(rows),
        "",
        f"![ablation plot]({os.path.basename(png_path)})",
        "",
    ]
    if meta.get("run_dir"):
        grid_png = os.path.splitext(png_path)[0] + "_samples.png"
        if plot_samples(rows, meta["run_dir"], grid_png):
            lines += ["Samples without guidance (seed 0; each row has one sample per class, in class order):", "",
                      f"![samples]({os.path.basename(grid_png)})", ""]
    for n in meta.get("notes", []):
        lines.append(f"- {n}")
    if meta.get("missing"):
        lines += ["", "## Did not finish", ""] + [f"- {m}" for m in meta["missing"]]
    os.makedirs(os.path.dirname(os.path.abspath(md_path)) or ".", exist_ok=True)
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md_path


__all__ = [
    "Variant",
    "STD_SWEEP",
    "default_plan",
    "heldout_nll",
    "generate",
    "score_samples",
    "evaluate_generator",
    "run_task",
    "summarise",
    "ordering_verdict",
    "noise_note",
    "plot_results",
    "plot_samples",
    "write_report",
]
