#!/usr/bin/env python
"""Benchmark offline FID sampling: images per second per process, through the code path of ``python -m simflow.sample``.

    python tools/bench_sample.py                                   # tiny, batch 64, on this device
    python tools/bench_sample.py --cases b:1 --batches 1 --warmup 0  # B at 256 px: ~2 min per image on 2 CPU cores
    python tools/bench_sample.py --cases xl:16 --processes 8       # on a GPU machine: projected FID-50k hours

Each case times :func:`simflow.eval.sample_set.sample_range` (index-seeded labels and noise, KV-cached flow inverse
with classifier-free guidance -- the batch is doubled inside the flow --, VAE decode, uint8 quantisation) on randomly
initialised weights whose zero-initialised flow heads are perturbed (a fresh flow is the identity map), after one
warm-up batch (``--warmup``). Timing is the same for trained weights: sampling cost does not depend on the weight
values. It prints img/s per process and the projected wall-clock hours for ``--num-samples`` (default 50,000) on
``--processes`` processes that each run at that rate (ranks never communicate, so the projection is linear).
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_case(config: str, batch: int, batches: int, cfg_scale, device_name: str, warmup: int = 1) -> dict:
    """Time ``batches`` sampling batches of ``batch`` images for ``configs/<config>.yaml`` after ``warmup`` untimed
    ones; returns a result row (``img_per_s`` = images / seconds of this process)."""
    import torch

    from simflow.config import load_config
    from simflow.eval.sample_set import sample_range
    from simflow.models.simflow import SimFlowModel
    from simflow.runtime import autocast_dtype

    device = torch.device(device_name)
    path = os.path.join(ROOT, "configs", f"{config}.yaml")
    cfg = load_config(path, [f"sample.batch_size={batch}", "loss.repa.enabled=false"])
    if cfg_scale is not None:
        cfg.sample.cfg_scale = cfg_scale
    torch.manual_seed(0)
    model = SimFlowModel(cfg).to(device).eval()
    with torch.no_grad():
        for p in model.flow.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.02)
    dtype = autocast_dtype(cfg, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if warmup:
        sample_range(model, cfg, 0, batch * warmup, device, dtype)  # allocations, kernel selection, caches
    sync()
    t0 = time.perf_counter()
    images, _, nonfinite = sample_range(model, cfg, batch * warmup, batch * (warmup + batches), device, dtype)
    sync()
    dt = time.perf_counter() - t0
    n = batch * batches
    return {
        "config": config,
        "resolution": cfg.model.resolution,
        "flow_params_M": round(sum(p.numel() for p in model.flow.parameters()) / 1e6, 2),
        "tokens": model.flow.num_tokens,
        "batch": batch,
        "cfg_scale": cfg.sample.cfg_scale,
        "cfg_mode": cfg.sample.cfg_mode,
        "kv_cache": True,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "images": n,
        "warmup_batches": warmup,
        "seconds": round(dt, 3),
        "img_per_s": round(n / dt, 4),
        "nonfinite": nonfinite,
        "shape": list(images.shape[1:]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["tiny:64"], help="config:batch pairs (configs/<config>.yaml)")
    p.add_argument("--batches", type=int, default=2, help="timed batches per case")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance scale (default: the config's; 0 would disable CFG and halve the flow batch)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--num-samples", type=int, default=50_000, help="set size for the projection")
    p.add_argument("--processes", type=int, default=1, help="processes (e.g. GPUs) for the projection")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    # bad input exits 2 naming the flag, before any work (argparse's error: usage + message on stderr)
    for case in args.cases:
        config, _, batch = case.partition(":")
        if not batch.isdigit() or int(batch) < 1:
            p.error(f"--cases {case!r}: expected config:batch with batch >= 1")
    for flag in ("batches", "num_samples", "processes"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0; got {args.warmup}")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    rows = []
    for case in args.cases:
        config, _, batch = case.partition(":")
        row = run_case(config, int(batch), args.batches, args.cfg_scale, device, args.warmup)
        row["projected_hours"] = round(args.num_samples / (row["img_per_s"] * args.processes) / 3600, 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    hours = f"h for {args.num_samples} on {args.processes}"
    header = (f"{'config':<6} {'res':>4} {'flow M':>7} {'tokens':>6} {'batch':>5} {'cfg':>12} {'device':>7} "
              f"{'dtype':>8} {'thr':>3} {'img/s':>9} {'s/img':>8} {hours:>18}")
    print(header)
    for r in rows:
        cfg = f"{r['cfg_mode']}:{r['cfg_scale']:g}"
        print(f"{r['config']:<6} {r['resolution']:>4} {r['flow_params_M']:>7} {r['tokens']:>6} {r['batch']:>5} "
              f"{cfg:>12} {r['device']:>7} {r['dtype']:>8} {r['threads']:>3} {r['img_per_s']:>9.3f} "
              f"{1 / r['img_per_s']:>8.3f} {r['projected_hours']:>18.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
