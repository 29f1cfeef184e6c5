#!/usr/bin/env python
"""The paper's variant study (method §10.3) at small scale on the demo data, in one command (issue 8 item 2).

    python tools/ablate.py --budget 200 --deadline-min 40   # all variants + std sweep, 2 seeds for the top 2 (docs/)
    python tools/ablate.py --budget 3 --num-samples 40 --num-heldout 40 --out /tmp/abl --md /tmp/abl/ablation.md \\
        --png /tmp/abl/ablation.png                     # smoke run

``--budget`` is the number of training steps of every stage (equal compute per variant; the frozen-VAE variant d
additionally pretrains its VAE for the same number of steps). Variants (``configs/ablate/*.yaml``):

    a   end-to-end, fixed posterior std 0.5 (SimFlow)         a_std0.25 / a_std0.75 / a_std1   the std sweep of a
    b   end-to-end, learned variance + KL
    c   end-to-end, learned variance + STARFlow-style latent noise (model.flow.noise_std)
    d   frozen VAE: learned-variance VAE pretrained alone, then the flow on its frozen latents

Each (variant, seed) runs in its own process (``--jobs`` at a time, ``--threads`` torch threads each), writes
``<out>/<variant>/seed<k>/result.json`` and is skipped when that file exists, so an interrupted study resumes.
Order of work: the main variants a-d, then -- as soon as their first seed is done -- the extra ``--extra-seeds`` of
the ``--top`` best (demo-gFID without CFG), then the posterior_std sweep (which also fills idle workers while the
main variants finish). ``--deadline-min`` stops starting new tasks. The table and plot go to ``--md`` / ``--png``
(default ``docs/ablation.md``, ``docs/ablation.png``) after every finished task, with the exact command, seeds and
commit.

Needs the demo data (``tools/make_demo_data.py``; built into ``data/demo`` when missing) and the demo-FID network
(``tools/train_feature_net.py``, default ``weights/demo_fid/fashion_cnn.safetensors``).
"""

import argparse
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing as mp
import os
import shlex
import sys
import time

import numpy as np

from ablation.driver import RESULT_JSON, run_task
from ablation.plan import default_plan
from ablation.report import write_report
from simflow import storage
from simflow.eval.demo_features import DEFAULT_WEIGHTS, DemoFashionFeatures

from simflow.runtime import code_version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_reference(test_npz: str, extractor_weights: str, path: str) -> str:
    """demo-FID reference statistics of the test split (``tools/fid_ref.py`` format), computed once and reused
    while the feature network's SHA-256 and the source file's SHA-256 match."""
    import numpy as np

    from simflow.storage import sha256_file
    from simflow.eval.reference import compute_reference, open_image_set, write_reference

    ext = DemoFashionFeatures(extractor_weights)
    if os.path.isfile(path):
        with np.load(path) as z:
            if (str(z["feature_extractor_sha256"]) == ext.weights_sha256
                    and str(z["source_sha256"]) == sha256_file(test_npz)):
                return path
    arrays = compute_reference(open_image_set(test_npz), ext, batch_size=500, keep_images=False, progress=False)
    write_reference(path, arrays)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=200, help="training steps per stage (equal for every variant)")
    p.add_argument("--seed", type=int, default=0, help="training seed of the first pass")
    p.add_argument("--extra-seeds", default="1", help="comma list of further seeds for the --top best variants")
    p.add_argument("--top", type=int, default=2, help="how many main variants get the extra seeds")
    p.add_argument("--variants", default=None, help="comma list (default: a,b,c,d,a_std0.25,a_std0.75,a_std1)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per guidance setting for demo-gFID")
    p.add_argument("--num-heldout", type=int, default=1000, help="test images for PSNR / demo-rFID / NLL")
    p.add_argument("--cfg-scales", default="0.5,1,2", help="CFG scales swept (w = 0 is always evaluated)")
    p.add_argument("--jobs", type=int, default=2, help="tasks in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per task")
    p.add_argument("--config-dir", default=os.path.join(ROOT, "configs", "ablate"))
    p.add_argument("--train-npz", default=os.path.join(ROOT, "data", "demo", "demo.npz"))
    p.add_argument("--test-npz", default=os.path.join(ROOT, "data", "demo", "demo_test.npz"))
    p.add_argument("--extractor-weights", default=DEFAULT_WEIGHTS, help="demo-FID network (train_feature_net.py)")
    p.add_argument("--out", default=None, help="run folder (default runs/ablate/budget<N>)")
    p.add_argument("--md", default=os.path.join(ROOT, "docs", "ablation.md"))
    p.add_argument("--png", default=os.path.join(ROOT, "docs", "ablation.png"))
    p.add_argument("--deadline-min", type=float, default=0.0,
                   help="start no new task after this many minutes (0: no deadline); unstarted tasks are listed")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every stage of every variant (repeatable)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    t0 = time.time()
    commit = code_version()  # the code this run executes (workers import it at start)
    for name in ("budget", "num_samples", "num_heldout", "jobs", "threads"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.num_heldout < 2 or args.num_samples < 2:
        print("error: --num-heldout and --num-samples must be >= 2 (a covariance needs 2 images)", file=sys.stderr)
        return 2
    try:
        cfg_scales = [float(w) for w in args.cfg_scales.split(",") if w.strip()]
        extra_seeds = [int(s) for s in args.extra_seeds.split(",") if s.strip()]
    except ValueError as e:
        print(f"error: --cfg-scales / --extra-seeds: {e}", file=sys.stderr)
        return 2
    plan = default_plan(args.config_dir)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [w for w in wanted if w not in {v.name for v in plan}]
        if unknown:
            print(f"error: --variants: unknown {unknown}; choose from {[v.name for v in plan]}", file=sys.stderr)
            return 2
        plan = [v for v in plan if v.name in wanted]
    for v in plan:
        for path in [v.config] + ([v.pretrain[0]] if v.pretrain else []):
            if not os.path.isfile(path):
                print(f"error: variant {v.name}: config file not found: {path}", file=sys.stderr)
                return 2
    if not os.path.isfile(args.train_npz) or not os.path.isfile(args.test_npz):
        from simflow.data.demo import build_demo

        print(f"building the demo data into {os.path.dirname(args.train_npz)}", file=sys.stderr)
        build_demo(os.path.dirname(args.train_npz))
    if not os.path.isfile(args.extractor_weights):
        print(f"error: demo-FID network not found: {args.extractor_weights}; run `python tools/train_feature_net.py "
              f"--out {args.extractor_weights}`", file=sys.stderr)
        return 2
    out = args.out or os.path.join(ROOT, "runs", "ablate", f"budget{args.budget}")
    os.makedirs(out, exist_ok=True)
    reference = ensure_reference(args.test_npz, args.extractor_weights, os.path.join(out, "demo_test_ref.npz"))
    extractor = DemoFashionFeatures(args.extractor_weights).describe()
    with np.load(reference) as z:
        num_reference = int(z["num_images"])
        ref_arrays = {k: z[k] for k in ("mu", "sigma", "pool_features") if k in z.files}
    # The floor: real training images scored like samples (same count), i.e. what a perfect generator would get.
    from simflow.data.demo import load_npz
    from simflow.eval.generator import score_samples

    real = load_npz(args.train_npz)
    real_floor = score_samples(real["images"][: args.num_samples], DemoFashionFeatures(args.extractor_weights),
                               ref_arrays["mu"], ref_arrays["sigma"], ref_arrays.get("pool_features"),
                               labels=real["labels"][: args.num_samples])
    del real
    extractor["weights"] = os.path.relpath(extractor["weights"], ROOT) if extractor["weights"].startswith(ROOT) \
        else extractor["weights"]

    def task(v, seed):
        return {
            "variant": dataclasses.asdict(v), "seed": seed, "steps": args.budget,
            "out_dir": os.path.join(out, v.name, f"seed{seed}"), "train_npz": args.train_npz,
            "test_npz": args.test_npz, "extractor_weights": args.extractor_weights, "reference": reference,
            "num_heldout": args.num_heldout, "num_samples": args.num_samples, "cfg_scales": cfg_scales,
            "threads": args.threads, "overrides": list(args.override),
        }

    results, missing = [], []
    ctx = mp.get_context("spawn")

    def label(t):
        return f"{t['variant']['name']} seed {t['seed']}"

    def run_all(first, later):
        """One pool, one queue: the main variants (two-stage ones first), then the sweep; as soon as every main
        variant's first seed is done, the extra seeds of the --top best go to the front of the queue. A task whose
        result.json exists is read from disk instead of run."""
        pending = sorted(first, key=lambda t: t["variant"]["pretrain"] is None) + list(later)
        main_left = {label(t) for t in first}
        seeds_queued = not (extra_seeds and args.top > 0)
        by_name = {v.name: v for v in plan}

        def finished(t, r=None, error=None):
            nonlocal seeds_queued, pending
            if r is not None:
                results.append(r)
                print(f"[{(time.time() - t0) / 60:.1f} min] {label(t)}: demo-gFID {r['gfid_no_cfg']:.2f} / CFG "
                      f"{r['gfid_best_cfg']:.2f}, PSNR {r['reconstruction']['psnr']:.2f}, "
                      f"train {r['train_seconds']:.0f}s", flush=True)
            else:
                missing.append(f"{label(t)}: failed: {error}")
                print(f"task {label(t)} failed: {error}", file=sys.stderr, flush=True)
            main_left.discard(label(t))
            if not main_left and not seeds_queued:
                ranked = sorted((x for x in results if x["group"] == "main" and x["seed"] == args.seed),
                                key=lambda x: x["gfid_no_cfg"])
                extra = [task(by_name[x["variant"]], s) for x in ranked[: args.top] for s in extra_seeds]
                pending = sorted(extra, key=lambda t: t["variant"]["pretrain"] is None) + pending
                seeds_queued = True
            report()

        with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            futures = {}
            while pending or futures:
                while pending and len(futures) < args.jobs:
                    t = pending.pop(0)
                    if os.path.isfile(os.path.join(t["out_dir"], RESULT_JSON)):
                        finished(t, run_task(t))  # read from disk
                    elif args.deadline_min and time.time() - t0 > 60 * args.deadline_min:
                        missing.append(f"{label(t)}: not started (deadline {args.deadline_min:g} min reached)")
                    else:
                        futures[pool.submit(run_task, t)] = t
                if not futures:
                    continue
                done, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
                for f in done:
                    t = futures.pop(f)
                    try:
                        r = f.result()
                    except Exception as e:  # one failed variant must not lose the others
                        finished(t, error=f"{type(e).__name__}: {e}")
                    else:
                        finished(t, r)

    # Every invocation on this run folder (a first run, resumes) is recorded, so the report's wall time and commits
    # cover all of them.
    run_log = os.path.join(out, "run.json")
    invocations = []
    if os.path.isfile(run_log):
        with open(run_log) as f:
            invocations = json.load(f)["invocations"]
    invocations.append({"command": "python tools/ablate.py " + " ".join(shlex.quote(a) for a in argv_list),
                        "commit": commit, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t0)),
                        "seconds": 0.0})

    def report():
        invocations[-1]["seconds"] = round(time.time() - t0, 1)
        storage.write_bytes(run_log, json.dumps({"invocations": invocations}, indent=2).encode())
        meta = {
            "command": "python tools/ablate.py " + " ".join(shlex.quote(a) for a in argv_list),
            "commit": ", ".join(dict.fromkeys(i["commit"] for i in invocations)),
            "steps": args.budget,
            "batch_size": _batch_size(plan[0].config, args.override),
            "seeds": sorted({r["seed"] for r in results}),
            "num_samples": args.num_samples,
            "num_heldout": args.num_heldout,
            "num_reference": num_reference,
            "cfg_scales": cfg_scales,
            "cfg_mode": "deep_only_cond",  # configs/ablate/base.yaml (the former "deep_only", issue 15)
            "jobs": args.jobs,
            "threads": args.threads,
            "wall_seconds": sum(i["seconds"] for i in invocations),
            "invocations": invocations,
            "run_dir": out,
            "extractor": extractor,
            "missing": missing,
            "real_floor": real_floor,
            "notes": [
                "d's VAE is pretrained with the same step budget, then frozen; its flow stage skips the "
                "reconstruction and GAN terms (nothing in the VAE trains), so its stage is cheaper per step.",
                "b, c and d use the KL weight 1e-6 of LDM/REPA-E (method §5.2); c adds noise 0.3 (STARFlow's "
                "noise_std) to the latent seen by both the flow and the decoder.",
                "Wall times are measured with other jobs sharing the 2 cores; compare them only roughly.",
            ],
        }
        write_report(results, args.md, args.png, meta)

    run_all([task(v, args.seed) for v in plan if v.group == "main"],
            [task(v, args.seed) for v in plan if v.group != "main"])
    report()
    print(json.dumps({"md": args.md, "png": args.png, "results": len(results), "missing": missing,
                      "minutes": round((time.time() - t0) / 60, 1)}, indent=2))
    return 0 if not missing else 1


def _batch_size(config: str, overrides) -> int:
    from simflow.config import load_config

    cfg = load_config(config, list(overrides))
    return cfg.train.micro_batch_size * cfg.train.grad_accumulation


if __name__ == "__main__":
    raise SystemExit(main())
