#!/usr/bin/env python
"""Convergence study on the demo data (issue 15 part 5; paper claims method §10.3, §10.4, §12 #1).

    python tools/convergence.py --budgets 500,1000,1500 --seeds 0 --jobs 2          # train (or resume) + score + report
    python tools/convergence.py --budgets 500,1000,1500 --seeds 0,1 --no-train      # score what exists + report
    python tools/convergence.py --budgets 3,6 --every 3 --num-samples 40 --out /tmp/conv --md /tmp/conv/c.md \\
        --png /tmp/conv/c.png --scales 0,1                                          # smoke run

Runs (``<out>/<run>/``, one training process each, ``--jobs`` at a time, ``--threads`` torch threads, ``nice``):

    a_s<seed>            SimFlow: VAE + flow end to end, fixed posterior std 0.5 (configs/ablate/a_e2e_fixed.yaml,
                         the same model as configs/tiny.yaml)
    d_s<seed>            frozen-VAE baseline: a learned-variance VAE pretrained alone for ``--pretrain`` steps
                         (configs/ablate/d_vae_pretrain.yaml), then the flow on its frozen latents
                         (configs/ablate/d_frozen_vae.yaml); budgets count the flow stage's steps
    a_nll<w>_s<seed>     SimFlow with loss.nll_weight=w (method §12 #1), trained to ``--nll-budget``

Every run trains once to its largest budget and keeps a checkpoint every ``--every`` steps, so a longer budget
resumes a shorter one (``checkpoint.keep`` large); an interrupted run resumes from its newest checkpoint. Each
checkpoint at a budget is scored once (``score-step<N>.json`` next to it; skipped when present) with
:mod:`simflow.eval.self_score`: ``--num-samples`` EMA samples per guidance scale of ``--scales`` (``--cfg-mode``),
demo-FID (NOT Inception FID) against the 10,000 test images and class accuracy. The table and plot go to ``--md``
/ ``--png`` after every scored point, with the command, seeds, commit and wall times.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from simflow import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from simflow.runtime import code_version  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs", "ablate")


def plan(args) -> List[Dict[str, Any]]:
    """The runs of the study: dicts with ``name``, ``variant`` (a | d), ``seed``, ``steps``, ``budgets``, ``stages``
    (list of (config, overrides, out_dir)), ``score_config`` / ``score_overrides`` and ``train_dir``."""
    budgets = sorted(int(b) for b in args.budgets.split(","))
    common = ["data.source=npz", f"data.path={args.train_npz}", f"checkpoint.every_steps={args.every}",
              "checkpoint.keep=1000", "logging.wandb=disabled"]
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        a_dir = os.path.join(args.out, f"a_s{seed}")
        runs.append(dict(name=f"a_s{seed}", variant="a", seed=seed, budgets=budgets, train_dir=a_dir,
                         score_config=os.path.join(CONFIGS, "a_e2e_fixed.yaml"), score_overrides=[],
                         stages=[(os.path.join(CONFIGS, "a_e2e_fixed.yaml"),
                                  [*common, f"train.seed={seed}", f"train.steps={budgets[-1]}"], a_dir)]))
        d_dir = os.path.join(args.out, f"d_s{seed}")
        vae = os.path.join(d_dir, "vae_pretrain")
        init = [f"train.init_vae_from={os.path.join(vae, 'weights.safetensors')}"]
        runs.append(dict(name=f"d_s{seed}", variant="d", seed=seed, budgets=budgets,
                         train_dir=os.path.join(d_dir, "train"),
                         score_config=os.path.join(CONFIGS, "d_frozen_vae.yaml"), score_overrides=init,
                         stages=[(os.path.join(CONFIGS, "d_vae_pretrain.yaml"),
                                  [*common, f"train.seed={seed}", f"train.steps={args.pretrain}"], vae),
                                 (os.path.join(CONFIGS, "d_frozen_vae.yaml"),
                                  [*common, f"train.seed={seed}", f"train.steps={budgets[-1]}", *init],
                                  os.path.join(d_dir, "train"))]))
    if args.nll_weights:
        seed = int(args.seeds.split(",")[0])
        for w in [float(x) for x in args.nll_weights.split(",")]:
            if w == 1.0:
                continue  # the main run a_s<seed>
            name = f"a_nll{w:g}_s{seed}"
            out = os.path.join(args.out, name)
            over = [f"loss.nll_weight={w:g}"]
            runs.append(dict(name=name, variant=f"a_nll{w:g}", seed=seed, budgets=[args.nll_budget], train_dir=out,
                             score_config=os.path.join(CONFIGS, "a_e2e_fixed.yaml"), score_overrides=over,
                             stages=[(os.path.join(CONFIGS, "a_e2e_fixed.yaml"),
                                      [*common, *over, f"train.seed={seed}", f"train.steps={args.nll_budget}"], out)]))
    return runs


def train_run(run: Dict[str, Any], threads: int, nice: int) -> float:
    """Train every stage of ``run`` (resuming; a finished stage is a no-op) in a child process; wall seconds."""
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT}
    for config, overrides, out in run["stages"]:
        cmd = ["nice", "-n", str(nice), sys.executable, "-m", "simflow.train", "--config", config, *overrides,
               f"train.out_dir={out}"]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "train.log"), "a") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{run['name']}: training exited with {rc}; see {out}/train.log")
    return time.time() - t0


def step_dir(train_dir: str, step: int) -> str:
    return os.path.join(train_dir, "checkpoints", f"step-{step:07d}")


def score_point(run: Dict[str, Any], step: int, args) -> Optional[Dict[str, Any]]:
    """Score the checkpoint of ``run`` at ``step`` (cached in ``score-step<N>.json``); None when it does not exist."""
    import torch

    from simflow.config import load_config
    from simflow.eval.demo_features import DEFAULT_WEIGHTS, DemoFashionFeatures
    from simflow.eval.self_score import NOTE, DemoReference, score_model
    from simflow.eval.weights import load_generator

    ckpt = step_dir(run["train_dir"], step)
    suffix = "" if args.cfg_mode == "deep_only" else f"-{args.cfg_mode}"
    cache = os.path.join(run["train_dir"], f"score-step{step:07d}{suffix}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    if not os.path.isfile(os.path.join(ckpt, "COMMITTED")):
        return None
    torch.set_num_threads(args.threads)
    cfg = load_config(run["score_config"], [*run["score_overrides"], "data.source=npz", f"data.path={args.train_npz}",
                                            f"sample.cfg_mode={args.cfg_mode}", f"sample.batch_size={args.batch_size}"])
    if not hasattr(score_point, "_ref"):
        score_point._ref = DemoReference.from_npz(args.test_npz, DemoFashionFeatures(DEFAULT_WEIGHTS))
    model, _ = load_generator(ckpt, cfg, use_ema=True)
    t0 = time.time()
    scores = score_model(model, cfg, score_point._ref, args.num_samples, [float(w) for w in args.scales.split(",")])
    run_json = os.path.join(run["train_dir"], "checkpoints", "run.json")
    wall = os.path.getmtime(os.path.join(ckpt, "COMMITTED")) - os.path.getmtime(run_json)
    rec = {"run": run["name"], "variant": run["variant"], "seed": run["seed"], "step": step, "cfg_mode": args.cfg_mode,
           "num_samples": args.num_samples, "scores": scores, "train_wall_s": round(wall, 1),
           "score_s": round(time.time() - t0, 1), "note": NOTE}
    storage.write_bytes(cache, json.dumps(rec, indent=2).encode())
    return rec


# ----------------------------------------------------------------------------------------------------------------
def _best(rec: Dict[str, Any]):
    """(scale, scores) with the lowest demo-FID among the guided scales (w > 0), or the unguided one."""
    guided = {w: s for w, s in rec["scores"].items() if float(w) > 0} or rec["scores"]
    w = min(guided, key=lambda k: guided[k]["demo_fid"])
    return float(w), guided[w]


def write_plot(points: Sequence[Dict[str, Any]], path: str, num_samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant, colour, label in (("a", "C0", "SimFlow (end to end, std 0.5)"), ("d", "C1", "frozen VAE")):
        pts = sorted((p for p in points if p["variant"] == variant), key=lambda p: (p["seed"], p["step"]))
        for seed in sorted({p["seed"] for p in pts}):
            sp = [p for p in pts if p["seed"] == seed]
            steps = [p["step"] for p in sp]
            mark = "osD^v"[seed % 5]  # one marker per seed, one colour per variant
            for ax, key in ((axes[0], "demo_fid"), (axes[1], "class_accuracy")):
                ax.plot(steps, [_best(p)[1][key] for p in sp], "-" + mark, color=colour, ms=4,
                        label=f"{label}, best CFG, seed {seed}")
                unguided = [(p["step"], p["scores"]["0"][key]) for p in sp if "0" in p["scores"]]
                if unguided:
                    ax.plot(*zip(*unguided), "--" + mark, color=colour, alpha=0.5, ms=3, mfc="none",
                            label=f"{label}, no CFG, seed {seed}")
    for p in points:
        if p["variant"].startswith("a_nll"):
            for ax, key in ((axes[0], "demo_fid"), (axes[1], "class_accuracy")):
                ax.plot([p["step"]], [_best(p)[1][key]], "s", color="C2")
                ax.annotate(p["variant"][5:], (p["step"], _best(p)[1][key]), fontsize=7)
    axes[0].set_ylabel(f"demo-FID (NOT Inception FID), {num_samples} samples")
    axes[1].set_ylabel("class accuracy of samples")
    axes[0].axhline(8, color="grey", lw=0.5)  # issue 15's bars: demo-FID 8, class accuracy 0.8
    axes[1].axhline(0.8, color="grey", lw=0.5)
    for ax in axes:
        ax.set_xlabel("training steps (global batch 32)")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(points: Sequence[Dict[str, Any]], md: str, png: str, meta: Dict[str, Any]) -> None:
    """Table of every point scored with ``meta["cfg_mode"]`` (+ plot), then a table comparing guidance modes at the
    points scored with several modes."""
    every = sorted(points, key=lambda p: (p["variant"], p["seed"], p["step"], p.get("cfg_mode", "deep_only")))
    unguided = {(p["run"], p["step"]): p["scores"]["0"] for p in every if "0" in p["scores"]}
    points = []  # w = 0 is the same sampler in every mode: take it from any record of the same checkpoint
    for p in every:
        if p.get("cfg_mode", "deep_only") == meta["cfg_mode"]:
            zero = unguided.get((p["run"], p["step"]))
            points.append({**p, "scores": {**({"0": zero} if zero else {}), **p["scores"]}})
    scales = sorted({w for p in points for w in p["scores"]}, key=float)
    lines = [
        "# Convergence on the demo data (generated by tools/convergence.py; hand-written reading in "
        "docs/convergence.md)",
        "",
        f"- commands: {'; '.join(meta['commands'])}",
        f"- commit: `{meta['commit']}`; seeds: {meta['seeds']}; CFG mode `{meta['cfg_mode']}`; "
        f"{meta['num_samples']} samples per point against the {meta['num_reference']} test images",
        "- demo-FID is NOT Inception FID (Fashion-MNIST CNN features, docs/demo_fid.md); the floor for 1,000 real "
        "images is 0.151. Train wall = from the checkpoint root's creation (its run.json; for a converted root: "
        "from the resume) to the checkpoint, on a 2-core machine shared with other jobs.",
        "",
        "| run | step | train wall (min) | " + " | ".join(f"demo-FID / acc, w={w}" for w in scales) +
        " | best w |",
        "|---|---|---|" + "---|" * len(scales) + "---|",
    ]
    for p in points:
        cells = []
        for w in scales:
            s = p["scores"].get(w)
            cells.append(f"{s['demo_fid']:.2f} / {s['class_accuracy']:.3f}" if s else "-")
        lines.append(f"| {p['run']} | {p['step']} | {p['train_wall_s'] / 60:.1f} | " + " | ".join(cells) +
                     f" | {_best(p)[0]:g} |")
    lines += ["", f"![convergence]({os.path.basename(png)})", ""]
    modes = sorted({p.get("cfg_mode", "deep_only") for p in every})
    if len(modes) > 1:
        lines += ["## Guidance modes at the same checkpoints (demo-FID / class accuracy)", "",
                  "| run | step | mode | " + " | ".join(f"w={w}" for w in scales) + " |",
                  "|---|---|---|" + "---|" * len(scales)]
        for p in every:
            cells = [f"{p['scores'][w]['demo_fid']:.2f} / {p['scores'][w]['class_accuracy']:.3f}"
                     if w in p["scores"] else "-" for w in scales]
            lines.append(f"| {p['run']} | {p['step']} | {p.get('cfg_mode', 'deep_only')} | " + " | ".join(cells) + " |")
        lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    with open(md, "w") as f:
        f.write("\n".join(lines))
    if points:
        write_plot(points, png, meta["num_samples"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", default="500,1000,1500", help="training steps at which every run is scored")
    p.add_argument("--every", type=int, default=500, help="checkpoint interval (must divide every budget)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--pretrain", type=int, default=600, help="steps of the frozen-VAE baseline's VAE stage")
    p.add_argument("--nll-weights", default="", help="e.g. 0.25,0.5,1,2 (method §12 #1); empty = no sweep")
    p.add_argument("--nll-budget", type=int, default=1000)
    p.add_argument("--scales", default="0,1,2,3", help="guidance scales per point (0 = no guidance)")
    p.add_argument("--cfg-mode", default="deep_only", help="guidance mode used to score (cached per mode)")
    p.add_argument("--report-mode", default="deep_only_cond", help="guidance mode of the main table and plot")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nice", type=int, default=5)
    p.add_argument("--no-train", action="store_true", help="only score existing checkpoints and write the report")
    p.add_argument("--only", default="", help="comma-separated run names to train/score (default: all)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "conv"))
    p.add_argument("--train-npz", default=os.path.join(ROOT, "data", "demo", "demo.npz"))
    p.add_argument("--test-npz", default=os.path.join(ROOT, "data", "demo", "demo_test.npz"))
    p.add_argument("--md", default=os.path.join(ROOT, "docs", "convergence_table.md"))
    p.add_argument("--png", default=os.path.join(ROOT, "docs", "convergence.png"))
    args = p.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    if any(b % args.every for b in budgets + ([args.nll_budget] if args.nll_weights else [])):
        p.error(f"--every {args.every} must divide every budget ({args.budgets}, --nll-budget {args.nll_budget})")
    for path in (args.train_npz, args.test_npz):
        if not os.path.isfile(path):
            p.error(f"{path} not found (build it with: python tools/make_demo_data.py data/demo)")
    runs = plan(args)
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r["name"] in keep]
    log_path = os.path.join(args.out, "commands.json")
    os.makedirs(args.out, exist_ok=True)
    history = json.load(open(log_path)) if os.path.isfile(log_path) else []
    command = shlex.join(["python", "tools/convergence.py", *sys.argv[1:]])
    if all(h["command"] != command for h in history):  # a repeated invocation (e.g. a scoring loop) is one entry
        history.append({"command": command, "commit": code_version(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    with open(log_path, "w") as f:
        json.dump(history, f, indent=2)

    def report():
        points = [json.load(open(os.path.join(r["train_dir"], name)))
                  for r in plan(args) if os.path.isdir(r["train_dir"])
                  for name in sorted(os.listdir(r["train_dir"])) if name.startswith("score-step")
                  and name.endswith(".json")]
        meta = {"commands": [f"`{h['command']}` ({h['commit'][:12]}, {h['started']})" for h in history],
                "commit": history[-1]["commit"], "seeds": args.seeds, "cfg_mode": args.report_mode,
                "num_samples": args.num_samples, "num_reference": 10000}
        write_report(points, args.md, args.png, meta)
        return points

    def score_all(run):
        for b in run["budgets"]:
            rec = score_point(run, b, args)
            if rec:
                best_w, best = _best(rec)
                print(f"{run['name']} step {b}: best w={best_w:g} demo-FID {best['demo_fid']:.2f} class acc "
                      f"{best['class_accuracy']:.3f}", flush=True)
                report()

    if not args.no_train:
        with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(train_run, r, args.threads, args.nice): r for r in runs}
            for fut in cf.as_completed(futures):
                run = futures[fut]
                print(f"{run['name']}: trained in {fut.result() / 60:.1f} min", flush=True)
                score_all(run)
    else:
        for run in runs:
            score_all(run)
    report()
    print(f"report: {args.md}, {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
