#!/usr/bin/env python
"""Benchmark the sharded checkpoint (``simflow.checkpoint.manager.Checkpointer``) at DP = 1, 2, 4 on CPU/gloo.

    python tools/bench_checkpoint.py                                  # ~100M-parameter flow, DP 1 2 4, under $TMPDIR
    python tools/bench_checkpoint.py --dp 1 2 --width 256 --layers 1 1 1 1 --dir /scratch/me

Each DP size runs ``DP`` processes (DeepSpeed ZeRO-3, gloo) of the tiny config with a wide flow (default width 768,
``layers_per_block=[3,2,2,2]``: 99M flow parameters), AdamW moments present. Per rank it measures

* ``save``: a synchronous save (stage own shards, DCP write, sha256 of its files, commit) — seconds and the extra peak
  RSS above the RSS before the save (``VmHWM`` reset through ``/proc/self/clear_refs``);
* ``async stall``: how long an asynchronous save blocks the training loop (staging), and when its commit landed;
* ``load``: a resume (verify + read the chunks it owns, install them) — seconds, extra peak RSS, bytes of tensor
  data read and bytes hashed (the files its plan touches);
* ``dd``: ``dd if=/dev/zero bs=4M conv=fsync`` of the checkpoint's total bytes (the disk's floor for one writer).

The table shows the maximum over ranks. The "full state" column is the whole training state (fp32 weights, 2 AdamW
moments, EMA) that the previous format held on *every* rank during a save or load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def worker(rank: int, world: int, port: int, out: str, overrides) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from simflow.config import load_config
    from simflow.parallel.factory import build_engine
    from simflow.parallel.topology import init_topology
    from simflow.train.trainer import Trainer

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides)
    topo = init_topology(cfg)
    tr = Trainer(cfg, topo, build_engine=build_engine)
    for eng in (tr.gen, tr.disc):
        eng._adam_state()  # AdamW moments exist, as after the first step (zeros here: sizes are what matters)
        for f in eng._flat_partitions():
            eng.optimizer.state[f]["exp_avg"].normal_()
    res = {"rank": rank, "full_numel": tr.gen.full_numel(), "local_numel": tr.gen.local_numel()}
    torch.distributed.barrier()
    import gc

    gc.collect()
    base = _rss_mib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    tr.step = 1
    tr.save(block=True)
    res["save_s"] = time.perf_counter() - t0
    res["save_extra_mib"] = _rss_mib("VmHWM") - base
    torch.distributed.barrier()
    gc.collect()
    tr.step = 2
    t0 = time.perf_counter()
    tr.save()
    res["async_stall_s"] = time.perf_counter() - t0
    tr.checkpointer.wait()
    res["async_commit_s"] = time.perf_counter() - t0
    torch.distributed.barrier()
    gc.collect()
    base = _rss_mib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    got = tr.checkpointer.load_latest(lambda manifest, d: None)
    res["load_s"] = time.perf_counter() - t0
    res["load_extra_mib"] = _rss_mib("VmHWM") - base
    res["read"] = got[2]["read"]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    torch.distributed.barrier()


def run_dp(dp: int, work: str, overrides) -> dict:
    import torch.multiprocessing as mp

    from simflow.parallel.topology import free_port

    out = os.path.join(work, f"dp{dp}")
    os.makedirs(out, exist_ok=True)
    ov = list(overrides) + [f"train.out_dir={out}", f"checkpoint.dir={out}/checkpoints",
                            f"train.micro_batch_size={max(1, 4 // dp)}", f"train.global_batch_size={4 // dp * dp}"]
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, dp, port, out, ov)) for r in range(dp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"DP={dp}: workers exited {[p.exitcode for p in procs]}")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(dp)]
    step = os.path.join(out, "checkpoints", "step-0000002")
    total = sum(os.path.getsize(os.path.join(step, n)) for n in os.listdir(step))
    dd = os.path.join(out, "dd.bin")
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={dd}", "bs=4M", f"count={max(1, total // (4 << 20))}", "conv=fsync"],
                   check=True, capture_output=True)
    dd_s = time.perf_counter() - t0
    os.remove(dd)
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    mx = lambda k: max(r[k] for r in ranks)  # noqa: E731
    return {"dp": dp, "params_M": ranks[0]["full_numel"] / 1e6, "ckpt_MB": total / 1e6, "save_s": mx("save_s"),
            "stall_s": mx("async_stall_s"), "commit_s": mx("async_commit_s"), "save_mib": mx("save_extra_mib"),
            "load_s": mx("load_s"), "load_mib": mx("load_extra_mib"),
            "read_MB": max(r["read"].get("bytes", 0) for r in ranks) / 1e6,
            "hashed_MB": max(r["read"].get("hashed_bytes", 0) for r in ranks) / 1e6, "dd_s": dd_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 2, 2, 2])
    ap.add_argument("--dir", default=None, help="work directory (default: a new one under $TMPDIR)")
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "demo", "demo.npz"))
    a = ap.parse_args(argv)
    # bad input exits 2 naming the flag, before any work (argparse's error: usage + message on stderr)
    if not a.dp or any(dp < 1 for dp in a.dp):
        ap.error(f"--dp must be data-parallel sizes >= 1; got {a.dp}")
    if a.width < 1 or not a.layers or any(n < 1 for n in a.layers):
        ap.error(f"--width and --layers must be >= 1; got --width {a.width} --layers {a.layers}")
    if not os.path.isfile(a.data):
        ap.error(f"--data {a.data}: not a file (build it with `python tools/make_demo_data.py`)")
    work = a.dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    ov = ["parallel.engine=deepspeed", "data.source=npz", f"data.path={a.data}", "logging.wandb=disabled",
          f"model.flow.width={a.width}", f"model.flow.layers_per_block=[{','.join(map(str, a.layers))}]",
          "train.sample_every=0", "checkpoint.lock=false", "checkpoint.keep=2"]
    rows = [run_dp(dp, work, ov) for dp in a.dp]
    full_mib = rows[0]["params_M"] * 1e6 * 16 / 2**20
    print(f"flow+VAE {rows[0]['params_M']:.1f}M parameters; full training state (fp32 weights, 2 moments, EMA) "
          f"~{full_mib:.0f} MiB; load: `uptime` = {os.getloadavg()[0]:.1f}")
    print("| DP | ckpt MB | save s (sync) | async stall s | async commit s | save extra peak MiB/rank | "
          "load s | load extra peak MiB/rank | tensor MB read/rank | MB hashed/rank | dd s (same bytes) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dp']} | {r['ckpt_MB']:.0f} | {r['save_s']:.2f} | {r['stall_s']:.2f} | {r['commit_s']:.2f} | "
              f"{r['save_mib']:.0f} | {r['load_s']:.2f} | {r['load_mib']:.0f} | {r['read_MB']:.0f} | "
              f"{r['hashed_MB']:.0f} | {r['dd_s']:.2f} |")
    if 1 in a.dp and 2 in a.dp:
        one = next(r for r in rows if r["dp"] == 1)
        two = next(r for r in rows if r["dp"] == 2)
        print(f"DP=2 / DP=1 extra peak RSS: save {two['save_mib'] / one['save_mib']:.2f}x, "
              f"load {two['load_mib'] / one['load_mib']:.2f}x; async stall / sync save at DP=1: "
              f"{one['stall_s'] / one['save_s']:.2f}")
    return 0


if __name__ == "__main__":
    from simflow.parallel.topology import process_group_started
    from simflow.runtime import exit_now

    code = main()
    if process_group_started():
        exit_now(code or 0)  # gloo's threads can abort a finalizing interpreter (simflow.runtime.exit_now)
    sys.exit(code)
