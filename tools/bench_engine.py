#!/usr/bin/env python
"""Benchmark the distributed engines side by side: per-rank memory, step time and checkpoint cost of DeepSpeed ZeRO-3
and FSDP2 (+ DTensor TP) against one process.

    python tools/bench_engine.py                          # CPU (gloo): tiny, local vs ZeRO-3 at DP = 1, 2, 4
    python tools/bench_engine.py --engines deepspeed,fsdp2 --tp 2 --tp-dps 1 2   # both engines, DP = 1, 2, 4, TP=2
    python tools/bench_engine.py --config b --dps 1 2 --steps 2 --global-batch 4
    python tools/bench_engine.py --tp 2 --dps 2           # adds TP=2 x DP=2 (4 processes)
    python tools/bench_engine.py --gpu-xl 16 --steps 5    # one GPU: XL joint step at micro-batch 16, bf16, MFU
    python tools/bench_engine.py --gpu-sanity --engines deepspeed,fsdp2   # one GPU: local vs both engines (tiny, bf16)

CPU mode prints one table. Every case trains the real generator + discriminator (the trainer's ``train_step``) at the
same global batch; the sharded cases split it over DP ranks. Memory columns count the bytes of the tensors each
rank holds for the generator (exact, from the engine): parameter shard, gradient shard (fp32, one element per local
parameter element), optimizer (ZeRO-3: a separate fp32 master partition + AdamW moments; FSDP2: the sharded fp32
parameter is the master, so AdamW moments only), EMA. They fall as 1/DP (TP-split weights also as 1/TP). Then each
case saves one checkpoint (synchronous, ``simflow-checkpoint/3``) and loads it back: seconds and the extra peak RSS
of a rank (VmHWM above the resident set before, as tools/bench_checkpoint.py measures it). Step time is the median
over ``--steps`` timed steps after one warm-up step; on a machine with fewer cores than processes the ranks share
cores, so step time there shows overhead, not speed-up.

``--gpu-xl MB`` (used by ``tools/gpu_check_engine.sh``) runs one process on CUDA with each engine of ``--engines``
at micro-batch MB and prints one JSON line per engine: step time, images/s, peak memory, model FLOPs per step
(counted with ``torch.utils.flop_counter`` on one real step, forward + backward of every network in it) and
MFU = FLOPs per step / step time / 989e12 (H100/H200 dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PEAK_BF16_FLOPS = 989e12


def _synthetic(cfg, batch: int, rank_offset: int):
    """Random batches at the config's resolution (throughput does not depend on pixel values)."""
    import torch

    g = torch.Generator().manual_seed(rank_offset)
    i = rank_offset
    r = cfg.model.resolution
    while True:
        yield {"image": torch.rand(batch, 3, r, r, generator=g) * 2 - 1,
               "label": torch.randint(0, cfg.model.flow.num_classes, (batch,), generator=g),
               "index": torch.arange(i, i + batch)}
        i += batch * 1000


def _overrides(data: str, micro: int, global_batch: int, extra):
    return ["loss.perceptual.weight=0", "loss.repa.enabled=false", "logging.wandb=disabled", "train.sample_every=0",
            "checkpoint.resume=false", "data.source=npz", f"data.path={data}", "loss.gan.start_step=0",
            f"train.micro_batch_size={micro}", "train.grad_accumulation=1", f"train.global_batch_size={global_batch}",
            f"train.out_dir={tempfile.gettempdir()}/simflow-bench-engine", *extra]


def _measure(tr, it, steps: int, cuda: bool):
    import torch

    tr.train_step(it)  # warm-up (first ZeRO-3 step also records the parameter trace)
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tr.train_step(it)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gen_bytes(engine) -> dict:
    """Bytes of generator state on this rank: parameters, gradients, optimizer, EMA (module docstring)."""
    import torch

    if hasattr(engine, "local_numel"):  # DeepSpeed ZeRO-3 or FSDP2: this rank's shards
        params = engine.local_numel() * 4
        opt = engine.local_optimizer_numel() * 4
    else:  # LocalEngine: parameters are the fp32 master; AdamW keeps exp_avg and exp_avg_sq
        params = sum(p.numel() * p.element_size() for p in engine.module.parameters())
        opt = sum(v.numel() * v.element_size() for s in engine.optimizer.state.values() for v in s.values()
                  if torch.is_tensor(v) and v.dim() > 0)
    ema = sum((e.to_local() if hasattr(e, "to_local") else e).numel() * 4 for e in engine.ema.values())
    return {"param_bytes": params, "grad_bytes": params, "optim_bytes": opt, "ema_bytes": ema}


def _checkpoint_cost(tr) -> dict:
    """One synchronous save and one load of ``tr``'s state: seconds and extra peak RSS MiB of this rank."""
    import gc

    import torch

    from bench_checkpoint import _reset_peak, _rss_mib  # a sibling script: tools/ is sys.path[0] (spawn keeps it)

    out = {}
    for phase in ("save", "load"):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        gc.collect()
        base = _rss_mib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        if phase == "save":
            tr.save(block=True)
        else:
            tr.checkpointer.load_latest(lambda manifest, d: None)
        out[f"{phase}_s"] = time.perf_counter() - t0
        out[f"{phase}_extra_mib"] = _rss_mib("VmHWM") - base
    return out


def _worker(rank: int, world: int, port: int, out: str, config: str, data: str, tp: int, global_batch: int,
            steps: int, engine: str, threads: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("ignore")
    import torch

    try:
        from simflow.config import load_config
        from simflow.parallel.factory import build_engine
        from simflow.parallel.topology import destroy_topology, init_topology
        from simflow.train.trainer import Trainer

        dp = world // tp
        run_dir = tempfile.mkdtemp(prefix=f"simflow-bench-engine-{engine}-{world}-{tp}-") if rank == 0 else ""
        cfg = load_config(os.path.join(ROOT, "configs", f"{config}.yaml"),
                          _overrides(data, global_batch // dp, global_batch,
                                     [f"parallel.engine={engine}", f"parallel.tp_size={tp}"]))
        topo = init_topology(cfg)
        if topo.distributed:  # one checkpoint directory per case, rank 0's
            box = [run_dir]
            torch.distributed.broadcast_object_list(box, src=0)
            run_dir = box[0]
        cfg.train.out_dir = run_dir
        tr = Trainer(cfg, topo, build_engine=build_engine)
        it = _synthetic(cfg, cfg.train.micro_batch_size, topo.dp_rank * cfg.train.micro_batch_size)
        torch.set_num_threads(threads)  # the same for every case (DeepSpeed's build may change it)
        step_s = _measure(tr, it, steps, cuda=False)
        res = {"step_s": step_s, "threads": torch.get_num_threads(), **_gen_bytes(tr.gen)}
        ck = _checkpoint_cost(tr)
        peaks = [None] * world
        if topo.distributed:
            torch.distributed.all_gather_object(peaks, ck)
        else:
            peaks = [ck]
        res.update({k: max(p[k] for p in peaks) for k in ck})  # the slowest / largest rank
        if rank == 0:
            with open(out, "w") as f:
                json.dump(res, f)
        destroy_topology(topo)
    except BaseException:
        with open(out + f".err{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise


def cpu_case(config: str, data: str, world: int, tp: int, global_batch: int, steps: int, engine: str,
             threads: int) -> dict:
    import torch.multiprocessing as mp

    from simflow.parallel.topology import free_port

    out = tempfile.mktemp(suffix=".json")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker,
                         args=(r, world, port, out, config, data, tp, global_batch, steps, engine, threads))
             for r in range(world)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    for r in range(world):
        if os.path.exists(out + f".err{r}"):
            with open(out + f".err{r}") as f:
                raise RuntimeError(f"{engine} world={world} rank {r} failed:\n{f.read()}")
    with open(out) as f:
        return json.load(f)


def gpu_xl(micro: int, steps: int, config: str, dry_run_cpu: bool = False, engine: str = "deepspeed") -> dict:
    """One CUDA process, ``engine`` (DeepSpeed ZeRO-3 or FSDP2 at DP=1), bf16 autocast: XL joint step time, peak
    memory, FLOPs, MFU. ``dry_run_cpu`` runs the same code path on CPU in fp32 (to check the script without a GPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from simflow.config import load_config
    from simflow.parallel.factory import build_engine
    from simflow.parallel.topology import destroy_topology, init_topology
    from simflow.train.trainer import Trainer

    cuda = torch.cuda.is_available() and not dry_run_cpu
    if not cuda and not dry_run_cpu:
        raise ValueError("--gpu-xl needs CUDA")
    data = _demo(tempfile.gettempdir())
    cfg = load_config(os.path.join(ROOT, "configs", f"{config}.yaml"),
                      _overrides(data, micro, 0, [f"parallel.engine={engine}", "data.num_workers=0",
                                                  f"train.precision={'bf16' if cuda else 'fp32'}"]))
    topo = init_topology(cfg)
    t0 = time.perf_counter()
    tr = Trainer(cfg, topo, build_engine=build_engine)
    build_s = time.perf_counter() - t0
    it = _synthetic(cfg, micro, 0)
    tr.train_step(it)  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        tr.train_step(it)
    flops = counter.get_total_flops()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = _measure(tr, it, steps, cuda=cuda)
    res = {
        "config": config, "engine": engine, "micro_batch": micro,
        "precision": "bf16 autocast" if cuda else "fp32 (CPU dry run)",
        "build_s": build_s, "step_s": step_s, "img_per_s": micro / step_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "flops_per_step": flops, "tflops_per_s": flops / step_s / 1e12, "mfu": flops / step_s / PEAK_BF16_FLOPS,
        "gen_params": tr.gen.full_numel(), "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    destroy_topology(topo)
    return res


def gpu_sanity(steps: int, dry_run_cpu: bool = False, engines=("deepspeed",)) -> dict:
    """CUDA correctness check on the tiny config (seconds): the local engine and each sharded engine of ``engines``
    (NCCL, DP=1, bf16 autocast; FSDP2 with bf16 parameters and fp32 reduction) train ``steps`` identical steps;
    losses agree to bf16 accuracy; the EMA model sampled through ``full_params`` equals the exported weights sampled
    in a plain model."""
    import torch

    from simflow.config import load_config
    from simflow.models.simflow import SimFlowModel
    from simflow.parallel.factory import build_engine
    from simflow.parallel.topology import destroy_topology, init_topology
    from simflow.sampling import sample_images
    from simflow.train.trainer import Trainer

    cuda = torch.cuda.is_available() and not dry_run_cpu
    if not cuda and not dry_run_cpu:
        raise ValueError("--gpu-sanity needs CUDA")
    data = _demo(tempfile.gettempdir())
    base = _overrides(data, 8, 0, [f"train.device={'cuda' if cuda else 'cpu'}", "loss.gan.norm=group"])
    metrics, samples = {}, {}
    for engine in ("local", *engines):
        cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), base + [f"parallel.engine={engine}"])
        topo = init_topology(cfg)
        tr = Trainer(cfg, topo, build_engine=build_engine)
        it = iter(tr.loader)
        metrics[engine] = [tr.train_step_logged(it)["loss"] for _ in range(steps)]
        if engine != "local":
            idx = torch.arange(4)
            with torch.no_grad(), tr.gen.full_params(ema=True) as m:
                m.eval()
                x_sharded = sample_images(m, idx, idx % 10, cfg.sample, topo.device, torch.float32).float().cpu()
            plain = SimFlowModel(cfg)
            plain.load_state_dict(tr.gen.full_state_dict(ema=True))
            plain.to(topo.device).eval()
            with torch.no_grad():
                x_plain = sample_images(plain, idx, idx % 10, cfg.sample, topo.device, torch.float32).float().cpu()
            samples[engine] = ((x_sharded - x_plain).abs().max().item(), x_plain.abs().max().item())
        destroy_topology(topo)
    out = {"losses_local": metrics["local"], "ok": True}
    for engine in engines:
        rel = max(abs(a - b) / max(abs(a), 1e-3) for a, b in zip(metrics["local"], metrics[engine]))
        diff, scale = samples[engine]
        out.update({f"losses_{engine}": metrics[engine], f"max_rel_loss_diff_{engine}": rel,
                    f"sample_max_diff_{engine}": diff, f"sample_max_abs_{engine}": scale})
        out["ok"] = out["ok"] and rel < 2e-2 and diff < 1e-4 * max(1.0, scale)
    return out


def _demo(folder: str) -> str:
    """A small real demo set (the Trainer's loader needs a file; timed steps use synthetic batches)."""
    path = os.path.join(folder, "simflow-bench-demo", "demo.npz")
    if not os.path.isfile(path):
        from simflow.data.demo import build_demo

        build_demo(os.path.dirname(path), limit=256)
    return path


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--engines", default="deepspeed",
                   help="comma-separated sharded engines to compare: deepspeed, fsdp2 (default deepspeed)")
    p.add_argument("--dps", nargs="+", type=int, default=[1, 2, 4], help="data-parallel sizes of the sharded "
                   "engines (TP=1)")
    p.add_argument("--tp", type=int, default=1, help="also run TP=tp x DP for each --tp-dps (tp x dp processes)")
    p.add_argument("--tp-dps", nargs="+", type=int, help="data-parallel sizes of the TP cases (default: --dps)")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process, the same in every case (default 1: on a shared or small machine "
                        "more threads than free cores make OpenMP regions wait, which swamps the comparison)")
    p.add_argument("--gpu-xl", type=int, metavar="MICRO_BATCH", help="CUDA: XL step at this micro-batch, JSON out")
    p.add_argument("--gpu-config", default="xl")
    p.add_argument("--gpu-sanity", action="store_true", help="CUDA: local vs the --engines on tiny, JSON out")
    p.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    # bad input exits 2 naming the flag, before any work (argparse's error: usage + message on stderr)
    if not a.dps or any(dp < 1 for dp in a.dps):
        p.error(f"--dps must be data-parallel sizes >= 1; got {a.dps}")
    for flag in ("tp", "global_batch", "steps", "threads"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(a, flag)}")
    if a.gpu_xl is not None and a.gpu_xl < 1:
        p.error(f"--gpu-xl MICRO_BATCH must be >= 1; got {a.gpu_xl}")
    if (a.gpu_xl or a.gpu_sanity) and not a.dry_run_cpu:
        import torch

        if not torch.cuda.is_available():
            p.error(f"{'--gpu-sanity' if a.gpu_sanity else '--gpu-xl'} needs CUDA")
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ("deepspeed", "fsdp2")]
    if bad or not engines:
        p.error(f"--engines={a.engines!r}: unknown engine(s) {bad}; choose from deepspeed, fsdp2")
    if a.gpu_sanity:
        r = gpu_sanity(a.steps, a.dry_run_cpu, engines)
        print(json.dumps(r), flush=True)
        return 0 if r["ok"] else 1
    if a.gpu_xl:
        for engine in engines:  # one JSON line per engine
            print(json.dumps(gpu_xl(a.gpu_xl, a.steps, a.gpu_config, a.dry_run_cpu, engine)), flush=True)
        return 0
    data = _demo(tempfile.gettempdir())
    cases = [("local", 1, 1)]
    for engine in engines:
        cases += [(engine, dp, 1) for dp in a.dps]
        if a.tp > 1:
            cases += [(engine, dp * a.tp, a.tp) for dp in (a.tp_dps or a.dps)]
    rows = []
    for engine, world, tp in cases:
        if a.global_batch % (world // tp):
            print(f"skip {engine} world={world}: global batch {a.global_batch} not divisible by DP", file=sys.stderr)
            continue
        t0 = time.time()
        r = cpu_case(a.config, data, world, tp, a.global_batch, a.steps, engine, a.threads)
        r["wall_s"] = time.time() - t0
        rows.append((engine, world, tp, r))
        print(f"done {engine} world={world} tp={tp} in {r['wall_s']:.0f}s", file=sys.stderr, flush=True)
    def state(r) -> int:
        return r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] + r["ema_bytes"]

    base = rows[0][3]  # the local engine, one process
    print(f"\nconfig {a.config}, global batch {a.global_batch}, {os.cpu_count()} CPU cores, {a.threads} thread(s) per "
          f"process, generator state per rank (MiB), checkpoint of generator + discriminator")
    print("| engine | procs | TP | DP | micro | params | grads | optim | EMA | state x local | step s | "
          "ckpt save s | save extra MiB/rank | ckpt load s | load extra MiB/rank |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for engine, world, tp, r in rows:
        dp = world // tp
        print(f"| {engine} | {world} | {tp} | {dp} | {a.global_batch // dp} | {_mib(r['param_bytes'])} | "
              f"{_mib(r['grad_bytes'])} | {_mib(r['optim_bytes'])} | {_mib(r['ema_bytes'])} | "
              f"{state(r) / state(base):.3f} | {r['step_s']:.3f} | {r['save_s']:.2f} | {r['save_extra_mib']:.0f} | "
              f"{r['load_s']:.2f} | {r['load_extra_mib']:.0f} |")
    print("(state x local: parameters + gradients + optimizer + EMA of one rank relative to the local engine; ZeRO-3 "
          "in fp32 keeps a parameter partition and a separate fp32 master partition, FSDP2 one fp32 shard; times "
          "and extra RSS are the slowest / largest rank's)")
    return 0


if __name__ == "__main__":
    from simflow.parallel.topology import process_group_started
    from simflow.runtime import exit_now

    code = main()
    if process_group_started():
        exit_now(code or 0)  # gloo's threads can abort a finalizing interpreter (simflow.runtime.exit_now)
    sys.exit(code)
