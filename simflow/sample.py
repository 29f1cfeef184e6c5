"""``python -m simflow.sample``: an index-seeded FID sample set, sharded over ranks and Slurm array tasks.

    # one process (packs at the end)
    python -m simflow.sample --weights runs/tiny/weights.safetensors --config configs/tiny.yaml --out samples/tiny \\
        --num-samples 1000 sample.cfg_scale=1.5
    # 8 GPUs: each rank writes its own ranges; the last one to finish packs samples.npz
    torchrun --nproc_per_node 8 -m simflow.sample --weights W --config C --out DIR
    # job array: every task calls the same line (SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)
    sbatch --array=0-15 --wrap "python -m simflow.sample --weights W --config C --out DIR"
    # pack only (after all tasks ended; names missing ranges otherwise)
    python -m simflow.sample --pack --out DIR

Sample ``i`` has its label and noise from (``sample.seed``, ``i``) alone, so the set does not depend on the world size
or the split into tasks; ranges of ``sample.range_size`` indices are written atomically as NPZ parts and re-running
skips finished ones (see :mod:`simflow.eval.sample_set`). The flow runs with its EMA weights (exported weights hold
them; from a checkpoint the ``ema`` entries are loaded). Output: ``DIR/samples.npz`` (``arr_0`` uint8 (N, H, W, 3),
``labels``) and ``DIR/samples.json``; score with ``python -m simflow.fid DIR/samples.npz --ref REF.npz ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simflow.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. sample.cfg_scale=1.5)")
    p.add_argument("--weights", default=None,
                   help="exported weights (.safetensors / .pt) or a checkpoint directory (step dir or root)")
    p.add_argument("--config", default=None,
                   help="training config YAML, or a checkpoint directory whose manifest holds it "
                        "(default: the checkpoint given as --weights)")
    p.add_argument("--out", default=None, help="output folder (default: sample.out_dir)")
    p.add_argument("--num-samples", type=int, default=None, help="N (default: sample.num_samples, 50000)")
    p.add_argument("--range-size", type=int, default=None, help="indices per part (default: sample.range_size)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: sample.batch_size)")
    p.add_argument("--array-index", type=int, default=None,
                   help="this task's index in a job array (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)")
    p.add_argument("--array-count", type=int, default=None,
                   help="number of array tasks (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--rank", type=int, default=None, help="default: RANK (torchrun) or SLURM_PROCID (srun step)")
    p.add_argument("--world-size", type=int, default=None, help="default: WORLD_SIZE or SLURM_STEP_NUM_TASKS")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: train.device; "
                                                  "auto = cuda:LOCAL_RANK when available)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--pack", action="store_true", help="only pack existing parts (no weights needed)")
    mode.add_argument("--no-pack", action="store_true", help="never pack, even when this process finishes the set")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status (0 done, 2 bad input / inconsistent folder)."""
    from simflow.config import ConfigError
    from simflow.eval.sample_set import (
        SampleSetError,
        generate,
        missing_ranges,
        pack,
        packed_up_to_date,
        sampling_settings,
        slot_from_env,
    )
    from simflow.checkpoint.weights import WeightsError, resolve_config
    from simflow.eval.weights import load_generator
    from simflow.runtime import autocast_dtype, resolve_device

    args = build_parser().parse_intermixed_args(argv)
    progress = not args.no_progress
    try:
        if args.pack:
            if not args.out:
                raise SampleSetError("--pack needs --out DIR")
            side = pack(args.out, progress=progress)
            print(json.dumps({"packed": os.path.join(args.out, "samples.npz"), "sha256": side["sha256"],
                              "num_samples": side["num_samples"]}))
            return 0
        if not args.weights:
            raise WeightsError("pass --weights (exported weights.safetensors or a checkpoint directory)")
        overrides = list(args.overrides)
        for flag, key in ((args.num_samples, "sample.num_samples"), (args.range_size, "sample.range_size"),
                          (args.batch_size, "sample.batch_size"), (args.out, "sample.out_dir")):
            if flag is not None:
                overrides.append(f"{key}={flag}")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value; got {bad}")
        cfg = resolve_config(args.config, args.weights, overrides)
        out_dir = cfg.sample.out_dir
        if not out_dir:
            raise ConfigError("no output folder: pass --out DIR (or set sample.out_dir)")
        slot = slot_from_env(rank=args.rank, world_size=args.world_size, array_index=args.array_index,
                             array_count=args.array_count)
        device = resolve_device(args.device or cfg.train.device, slot.local_rank,
                                "--device" if args.device else "train.device")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dtype = autocast_dtype(cfg, device)
        model, source = load_generator(args.weights, cfg, device)
        settings = sampling_settings(cfg, source.sha256, source.ema, dtype)
        summary = generate(model, cfg, out_dir, slot, settings, device, dtype, source=source.describe(),
                           progress=progress)
        left = missing_ranges(out_dir, settings)
        summary["ranges_left_in_set"] = len(left)
        if not left and not args.no_pack:
            if packed_up_to_date(out_dir, settings):
                summary["packed"] = "already up to date"
            else:
                side = pack(out_dir, settings, progress=progress)
                summary["packed"] = os.path.join(out_dir, "samples.npz")
                summary["sha256"] = side["sha256"]
        elif left:
            summary["packed"] = (f"not yet: {len(left)} ranges belong to other ranks/tasks or are unfinished; the "
                                 f"last process to finish packs, or run --pack --out {out_dir}")
        print(json.dumps(summary))
        return 0
    except (SampleSetError, WeightsError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
