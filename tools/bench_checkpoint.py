#!/usr/bin/env python
"""Benchmark checkpoint save and load (``simflow.checkpoint.store``) against ``dd`` writing the same bytes.

    python tools/bench_checkpoint.py                      # tiny and B, under $TMPDIR
    python tools/bench_checkpoint.py --configs tiny --dir /scratch/me --repeats 3

For each config it builds the real training state in one process (generator + discriminator on the local engine,
one AdamW step taken so the moments exist, EMA, loader and trainer counters, RNG), then times

* ``state``: ``Trainer.state_parts``-equivalent collection (``Engine.state_dict``: full fp32 copies);
* ``save``: :func:`~simflow.checkpoint.store.save_parallel` (serialise, sha256 while writing, fsync, rename,
  manifest, marker);
* ``verify``: :func:`~simflow.checkpoint.store.verify` (re-read every file, sha256), what resume discovery does;
* ``load``: :func:`~simflow.checkpoint.store.load_checkpoint` with ``verify_all=False`` (read, sha256, unpickle);
* ``dd``: ``dd if=/dev/zero of=FILE bs=4M count=N conv=fsync`` of the same number of bytes (the disk's sequential
  write speed with one fsync, the floor for ``save``).

MB/s = checkpoint bytes / seconds (1 MB = 1e6 bytes); the best of ``--repeats`` runs is printed. ``load`` usually
reads from the page cache right after the save (no cache drop without root), so it measures CPU cost (sha256 +
unpickling) rather than the disk.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {"tiny": "configs/tiny.yaml", "b": "configs/b.yaml", "l": "configs/l.yaml", "xl": "configs/xl.yaml"}


def build_state(name: str):
    """(shared parts, rank state, number of parameters) of a one-step-old run of config ``name``."""
    import torch

    from simflow.config import load_config
    from simflow.models.discriminator import NLayerDiscriminator
    from simflow.models.simflow import SimFlowModel
    from simflow.parallel.factory import build_engine
    from simflow.train.trainer import Topology, rng_state

    cfg = load_config(os.path.join(ROOT, CONFIGS[name]),
                      ["loss.perceptual.weight=0", "loss.repa.enabled=false", "parallel.engine=local"])
    topo = Topology()
    torch.manual_seed(0)
    gen = build_engine(cfg, lambda factory=None: SimFlowModel(cfg, factory), "generator", ["flow"], topo)
    g = cfg.loss.gan
    disc = build_engine(cfg, lambda factory=None: NLayerDiscriminator(3, g.ndf, g.n_layers, g.norm), "discriminator",
                        [], topo)
    for eng in (gen, disc):  # one AdamW step on small random gradients: the moments exist, as in a real run
        for p in eng.module.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        eng.step()
    gen.ema_update()
    n = sum(p.numel() for p in gen.module.parameters())
    t0 = time.perf_counter()
    parts = {"generator": gen.state_dict(), "discriminator": disc.state_dict(),
             "loader": {"consumed_samples": 256, "seed": 0}, "trainer": {"step": 1}}
    t_state = time.perf_counter() - t0
    return cfg, parts, rng_state(), n, t_state


def dd_seconds(path: str, nbytes: int) -> float:
    """Seconds for ``dd`` to write ``nbytes`` (rounded up to 4 MiB blocks) with a final fsync."""
    count = max(1, -(-nbytes // (4 << 20)))
    t0 = time.perf_counter()
    r = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={count}", "conv=fsync"],
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    os.remove(path)
    if r.returncode != 0:
        raise RuntimeError(f"dd failed: {r.stderr}")
    m = re.search(r"copied, ([0-9.]+) s", r.stderr)
    return float(m.group(1)) if m else dt


def bench(name: str, root: str, repeats: int):
    from simflow.checkpoint.store import load_checkpoint, save_parallel, verify
    from simflow.config import to_dict

    cfg, parts, rng, n_params, t_state = build_state(name)
    meta = {"run_id": f"bench-{name}", "config": to_dict(cfg), "code_version": "bench"}
    best = {"save": float("inf"), "verify": float("inf"), "load": float("inf"), "dd": float("inf")}
    nbytes = 0
    for i in range(repeats):
        run = os.path.join(root, f"{name}-{i}")
        t0 = time.perf_counter()
        d = save_parallel(run, 1, parts, meta, rank_state=rng, keep=2)
        best["save"] = min(best["save"], time.perf_counter() - t0)
        nbytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        t0 = time.perf_counter()
        ok, why = verify(d)
        best["verify"] = min(best["verify"], time.perf_counter() - t0)
        if not ok:
            raise RuntimeError(f"{d}: {why}")
        t0 = time.perf_counter()
        load_checkpoint(d, verify_all=False)
        best["load"] = min(best["load"], time.perf_counter() - t0)
        shutil.rmtree(run)
        best["dd"] = min(best["dd"], dd_seconds(os.path.join(root, "dd.bin"), nbytes))
    return {"config": name, "params_M": n_params / 1e6, "MB": nbytes / 1e6, "state_s": t_state, **best}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "b"], choices=sorted(CONFIGS))
    p.add_argument("--dir", default=None, help="where to write (default: a new folder under $TMPDIR)")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    root = tempfile.mkdtemp(prefix="simflow-bench-ckpt-", dir=a.dir)
    rows = []
    try:
        for name in a.configs:
            rows.append(bench(name, root, a.repeats))
            print(f"done {name}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    head = ("config", "gen params", "ckpt MB", "state s", "save s", "save MB/s", "verify s", "load s", "load MB/s",
            "dd s", "dd MB/s")
    lines = []
    for r in rows:
        mb = r["MB"]
        lines.append((r["config"], f"{r['params_M']:.1f}M", f"{mb:.1f}", f"{r['state_s']:.2f}", f"{r['save']:.2f}",
                      f"{mb / r['save']:.0f}", f"{r['verify']:.2f}", f"{r['load']:.2f}", f"{mb / r['load']:.0f}",
                      f"{r['dd']:.2f}", f"{mb / r['dd']:.0f}"))
    w = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |")
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for l in lines:
        print("| " + " | ".join(c.rjust(w[i]) for i, c in enumerate(l)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
