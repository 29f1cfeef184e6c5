"""The variant study's report: per-variant table, the paper-ordering verdict, seed noise, plots
(``docs/ablation.md``, ``docs/ablation.png``)."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


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


PAIRS = (("a", "c"), ("c", "d"), ("a", "d"))  # the paper's ordering a < c < d (method §10.3), pairwise


def _pair_outcome(gx: Sequence[float], gy: Sequence[float]) -> str:
    """How variant x's per-seed demo-gFIDs ``gx`` compare with y's ``gy``: ``one_seed`` (a side has < 2 seeds, noise
    unknown), ``as_paper`` (x < y in every seed: the ranges do not overlap), ``against`` (y < x in every seed) or
    ``overlap`` (within seed noise)."""
    if len(gx) < 2 or len(gy) < 2:
        return "one_seed"
    if max(gx) < min(gy):
        return "as_paper"
    if max(gy) < min(gx):
        return "against"
    return "overlap"


def ordering_verdict(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Rank the main variants by mean demo-gFID without CFG (the paper's variant table reports gFID without CFG,
    method §10.3) and compare with the paper's ordering: end-to-end fixed variance (a) best, then end-to-end with
    latent noise (c), then the frozen VAE (d); (b) is not in the paper's table (method §5.1 predicts it degrades).

    Args:
        rows: :func:`summarise` output; only ``group == "main"`` rows are ranked.

    Returns:
        dict: ``order`` (variant names, best first), ``paper_order_holds`` (a < c < d in the means; None unless a,
        c and d all ran), ``a_best`` (a ranks first; None likewise), ``pairs`` (``"gfid0"``/``"gfid_cfg"`` ->
        ``(x, y)`` -> :func:`_pair_outcome` for the pairs of :data:`PAIRS`; empty unless a, c, d ran),
        ``b_rank`` (1-based rank of b, or None) and ``text`` (the same in one paragraph of plain words).
    """
    main = [r for r in rows if r["group"] == "main"]
    rank = sorted(main, key=lambda r: _agg(r["gfid0"])[0])
    names = [r["variant"] for r in rank]
    pos = {n: i for i, n in enumerate(names)}
    out: Dict[str, Any] = {"order": names, "paper_order_holds": None, "a_best": None, "pairs": {},
                           "b_rank": pos["b"] + 1 if "b" in pos else None}
    parts = []
    if all(k in pos for k in ("a", "c", "d")):
        out["paper_order_holds"] = holds = pos["a"] < pos["c"] < pos["d"]
        out["a_best"] = a_best = pos["a"] == 0
        parts.append(
            f"Paper ordering a (E2E fixed var) < c (E2E noise) < d (frozen VAE) on demo-gFID without CFG: "
            f"{'HOLDS' if holds else 'does NOT hold'} in the means over seeds (measured order, best first: {' < '.join(names)})."
        )
        parts.append(f"End-to-end fixed variance is {'the best' if a_best else 'not the best'} of the main variants.")
        by = {r["variant"]: r for r in main}
        for key, what in (("gfid0", "without CFG"), ("gfid_cfg", "with the best CFG")):
            out["pairs"][key] = {}
            words = []
            for x, y in PAIRS:
                gx, gy = [float(v) for v in by[x][key]], [float(v) for v in by[y][key]]
                outcome = out["pairs"][key][(x, y)] = _pair_outcome(gx, gy)
                if outcome == "one_seed":
                    words.append(f"{x} vs {y}: one seed only, noise unknown")
                    continue
                rx, ry = f"[{min(gx):.1f}, {max(gx):.1f}]", f"[{min(gy):.1f}, {max(gy):.1f}]"
                words.append({"as_paper": f"{x} < {y} in every seed (ranges {rx} and {ry} do not overlap)",
                              "against": f"{y} < {x} in every seed, AGAINST the paper (ranges {ry} and {rx})",
                              "overlap": f"{x} vs {y} within seed noise (ranges {rx} and {ry} overlap)"}[outcome])
            parts.append(f"Pairwise, {what}: " + "; ".join(words) + ".")
    if out["b_rank"] is not None:
        parts.append(f"Variant b (E2E learned variance, not in the paper's table) ranks {out['b_rank']} of {len(names)}.")
    out["text"] = " ".join(parts)
    return out


def seed_noise(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Seed-to-seed spread (max - min demo-gFID) of every variant with >= 2 seeds, and whether the gap between the
    two best of them (by mean demo-gFID without CFG) exceeds their larger spread.

    Returns:
        dict: ``spread`` (variant -> {``gfid0``, ``gfid_cfg``}: spreads) and ``gap`` (None with < 2 multi-seed
        variants, else {``between``: (best, second), ``gap``, ``spread``: the larger no-CFG spread of the two,
        ``larger``: gap > spread}).
    """
    multi = [r for r in rows if len(r["seeds"]) >= 2]
    spread = {r["variant"]: {k: max(map(float, r[k])) - min(map(float, r[k])) for k in ("gfid0", "gfid_cfg")}
              for r in multi}
    gap = None
    if len(multi) >= 2:
        a, b = sorted(multi, key=lambda r: _agg(r["gfid0"])[0])[:2]
        g = abs(_agg(a["gfid0"])[0] - _agg(b["gfid0"])[0])
        sp = max(spread[a["variant"]]["gfid0"], spread[b["variant"]]["gfid0"])
        gap = {"between": (a["variant"], b["variant"]), "gap": g, "spread": sp, "larger": g > sp}
    return {"spread": spread, "gap": gap}


def noise_note(rows: Sequence[Dict[str, Any]]) -> str:
    """:func:`seed_noise` in plain words, with the per-seed values."""
    noise = seed_noise(rows)
    lines = []
    for r in rows:
        if r["variant"] in noise["spread"]:
            sp = noise["spread"][r["variant"]]
            lines.append(f"{r['variant']}: demo-gFID without CFG {', '.join(f'{float(x):.2f}' for x in r['gfid0'])} "
                         f"over seeds {r['seeds']} (spread {sp['gfid0']:.2f}); with CFG "
                         f"{', '.join(f'{float(x):.2f}' for x in r['gfid_cfg'])} (spread {sp['gfid_cfg']:.2f}).")
    if noise["gap"]:
        g = noise["gap"]
        lines.append(f"Gap between {g['between'][0]} and {g['between'][1]} (no CFG): {g['gap']:.2f}, "
                     f"{'larger' if g['larger'] else 'NOT larger'} than the largest seed spread ({g['spread']:.2f}).")
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
    verdict = ordering_verdict(rows)["text"]
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
