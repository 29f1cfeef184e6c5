#!/usr/bin/env python
"""Benchmark the SimFlow model: training and sampling throughput, KV-cache speed-up, peak memory.

    python tools/bench_flow.py                          # tiny and B on this machine's device
    python tools/bench_flow.py --configs tiny --steps 5 --sample-batch 8

Prints one table. Each case runs in a fresh subprocess so its peak memory is its own (CPU: peak RSS of the
process; CUDA: ``torch.cuda.max_memory_allocated``). Training img/s counts images through one full joint step
(VAE encode/decode, flow NLL, losses, backward, AdamW); sampling img/s counts decoded images, with and without the
flow's KV cache, CFG on (the batch is doubled inside the flow).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def case(kind: str, config: str, batch: int, steps: int) -> dict:
    import torch

    from simflow.config import load_config
    from simflow.models.flow import Guidance
    from simflow.train.trainer import Trainer

    torch.set_num_threads(os.cpu_count() or 1)
    path = os.path.join(ROOT, "configs", f"{config}.yaml")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(path, ["loss.perceptual.weight=0", "loss.repa.enabled=false", "logging.wandb=disabled",
                             f"train.micro_batch_size={batch}", "train.out_dir=/tmp/simflow-bench",
                             "checkpoint.resume=false", "data.source=npz",
                             f"data.path={os.path.join(ROOT, 'data/demo/demo.npz')}"])
    if kind == "train":
        cfg.data.path = _ensure_demo()
        t = Trainer(cfg)
        it = iter(_synthetic(cfg, batch, dev)) if cfg.model.resolution != 32 else iter(t.loader)
        t.train_step(it)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            t.train_step(it)
        if dev == "cuda":
            torch.cuda.synchronize()
        rate = batch * steps / (time.perf_counter() - t0)
    else:
        from simflow.models.simflow import SimFlowModel

        torch.manual_seed(0)
        model = SimFlowModel(cfg).to(dev).eval()
        with torch.no_grad():  # a non-identity flow (zero-init heads would make sampling trivially cheap to check)
            for p in model.flow.parameters():
                if p.abs().sum() == 0:
                    p.normal_(std=0.02)
        f = model.flow
        noise = torch.randn(batch, f.num_tokens, f.token_dim, device=dev)
        y = torch.randint(0, f.num_classes, (batch,), device=dev)
        g = Guidance(1.5, "deep_only")
        use_cache = kind == "sample_cached"
        t0 = time.perf_counter()
        for _ in range(steps):
            model.sample(y, noise, g, use_cache=use_cache)
        if dev == "cuda":
            torch.cuda.synchronize()
        rate = batch * steps / (time.perf_counter() - t0)
    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"img_per_s": rate, "peak_mib": peak, "device": dev}


def _ensure_demo() -> str:
    path = os.path.join(ROOT, "data/demo/demo.npz")
    if not os.path.isfile(path):
        from simflow.data.demo import build_demo

        build_demo(os.path.dirname(path))
    return path


def _synthetic(cfg, batch, dev):
    """Random 256-px batches for B (the demo set is 32 px); throughput does not depend on pixel values."""
    import torch

    i = 0
    while True:
        yield {"image": torch.rand(batch, 3, cfg.model.resolution, cfg.model.resolution) * 2 - 1,
               "label": torch.randint(0, cfg.model.flow.num_classes, (batch,)),
               "index": torch.arange(i, i + batch)}
        i += batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "b"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=0, help="0 = 32 for tiny, 2 for larger configs")
    p.add_argument("--sample-batch", type=int, default=0, help="0 = 64 for tiny (its sample.batch_size), 1 for larger configs")
    p.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.case:
        print(json.dumps(case(a.case[0], a.case[1], int(a.case[2]), int(a.case[3]))))
        return 0
    rows = []
    for c in a.configs:
        small = c == "tiny"
        tb = a.train_batch or (32 if small else 2)
        sb = a.sample_batch or (64 if small else 1)
        for kind, b, n in (("train", tb, a.steps), ("sample_cached", sb, a.steps), ("sample_naive", sb, 1)):
            if kind == "sample_naive" and not small:
                continue  # O(T^2) prefix recomputation over 256 tokens x 56 layers: minutes per image on CPU
            r = subprocess.run([sys.executable, __file__, "--case", kind, c, str(b), str(n)], capture_output=True,
                               text=True)
            if r.returncode != 0:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append((c, kind, b, json.loads(r.stdout.strip().splitlines()[-1])))
    print(f"\n{'config':<8}{'case':<16}{'batch':>6}{'img/s':>12}{'peak MiB':>12}  device")
    for c, kind, b, r in rows:
        print(f"{c:<8}{kind:<16}{b:>6}{r['img_per_s']:>12.3f}{r['peak_mib']:>12.0f}  {r['device']}")
    for c in a.configs:
        cached = [r for cc, k, _, r in rows if cc == c and k == "sample_cached"]
        naive = [r for cc, k, _, r in rows if cc == c and k == "sample_naive"]
        if cached and naive:
            print(f"{c}: KV-cache speed-up {cached[0]['img_per_s'] / naive[0]['img_per_s']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
