#!/usr/bin/env python
"""Benchmark the SimFlow flow and joint training step; optionally side by side with the reference TarFlow.

    python tools/bench_flow.py                                   # flow at T1/T2 + joint step (tiny), eager+compiled
    python tools/bench_flow.py --reference /tmp/ref/transformer_flow.py --joint tiny b
    python tools/bench_flow.py --shapes T1 --rounds 3 --no-compile --joint
    python tools/bench_flow.py --gpu-xl                          # one GPU: XL MFU table (tools/gpu_check_engine.sh)
    python tools/bench_flow.py --gpu-xl --dry-run-cpu --micro-batches 4 2 --xl-sample-batch 4 --xl-steps 1

Prints one table. Rows:

* ``flow T1`` / ``flow T2`` (issue 14 shapes: T1 = 64 tokens x 48 channels, width 128; T2 = 256 tokens x 12
  channels, width 256; both 4 blocks x 2 layers, head_dim 64, MLP ratio 4, 10 classes): one training step of the
  flow alone = forward, NLL (method §4.4), backward, AdamW step (betas 0.9/0.95, weight decay 1e-4, the
  reference's train.py settings; ours fused as in ``LocalEngine``, the reference torch's default foreach). ``ours`` eager and compiled (``train.compile``:
  :func:`simflow.parallel.parallelize.apply_compile`); ``reference`` = the model class ``Model`` of apple/ml-tarflow's
  ``transformer_flow.py`` imported from ``--reference PATH`` (never vendored), at equal token shapes, eager and
  compiled (its ``train.py --compile``: the loss function under ``torch.compile``).
* ``sample T1/T2``: KV-cached sampling with linear CFG in every block (w = 1.5; ours ``Guidance(1.5, "linear")``,
  reference ``reverse(guidance=1.5)``), images/s.
* ``joint tiny`` / ``joint b``: one :meth:`simflow.train.trainer.Trainer.train_step` (VAE + flow + losses + GAN,
  backward, AdamW, EMA) on the config, eager and compiled, each in a fresh subprocess.

All cases of one shape run in one process on the same thread count (``--threads``, default 2), in alternating
rounds (ours eager, ours compiled, reference, ours eager, ...); the table shows the median over rounds and the
ratio to the reference's median. FLOPs per step are counted once per model on an eager step with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention; the compiled model does the same math), so
GFLOP/s = counted FLOPs / median step time; ``% ceiling`` divides by the best of 5 timed 2048^3 fp32 matmuls
measured in the same process at the row's precision (the machine's GEMM ceiling at that thread count).
``GEMM+attn ms`` is the part of a flow step spent inside GEMM and attention kernels (``torch.profiler``, a profiled
run after each timed one, median over rounds, :func:`gemm_attention_seconds`) and ``bound`` = reference step time /
that: the largest ``x ref`` that row's kernels allow even if every other operation cost nothing.

``--precision fp32 bf16`` (default both): every row once in fp32 and once under bf16 autocast, the precision both
trainers use on GPU (ours ``train.precision``, the reference's ``train.py``); ``x ref`` compares against the
reference at the same precision.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # name: (tokens side, channels, width, default train batch, default sample batch)
    "T1": (8, 48, 128, 64, 16),
    "T2": (16, 12, 256, 16, 8),
}
NUM_BLOCKS, LAYERS, HEAD_DIM, CLASSES, CFG = 4, 2, 64, 10, 1.5


def gemm_ceiling_gflops(n: int = 2048, reps: int = 5, dtype=None) -> float:
    """Best-of-``reps`` ``n x n @ n x n`` matmul rate in GFLOP/s (2 n^3 FLOPs each), fp32 unless ``dtype``."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


# The kernels no implementation of the model class can skip: GEMMs and attention (CPU profiler names).
FLOOR_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
})


def gemm_attention_seconds(fn, n: int) -> float:
    """Seconds per call of ``fn`` spent inside GEMM and attention kernels (``FLOOR_OPS``), from
    ``torch.profiler``'s self CPU time over ``n`` calls (wall time inside the op, its intra-op threads included; CPU
    only: on CUDA self CPU time is not kernel time).

    ``reference step time / this`` is the ``bound`` column: the ``x ref`` this row's own GEMM and attention kernels
    would allow if every other operation (norms, activations, adaLN, residuals, autocast casts, the optimizer)
    cost nothing. A loose ceiling, and specific to the kernels the row uses (ours runs CPU attention in fp32 under
    bf16, README "Speed"); below 1.3 it shows a 1.3x lead is out of reach with those kernels.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in FLOOR_OPS) / n / 1e6


def _optimizer(params, fused: bool = False):
    """AdamW (betas 0.9/0.95, weight decay 1e-4). ``fused=True`` for ours, as ``LocalEngine`` trains with it; the
    reference keeps torch's default (foreach) AdamW, as its own training script does."""
    import torch

    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, fused=fused)


def ours(side: int, channels: int, width: int, batch: int, sample_batch: int, compiled: bool):
    """(train_step, sample, flops-counting step) closures for the SimFlow flow at one shape."""
    import torch

    from simflow.config import FlowConfig
    from simflow.models.flow import Guidance, TransformerFlow
    from simflow.parallel.parallelize import apply_compile

    torch.manual_seed(0)
    cfg = FlowConfig(width=width, num_blocks=NUM_BLOCKS, layers_per_block=[LAYERS] * NUM_BLOCKS, head_dim=HEAD_DIM,
                     num_classes=CLASSES, patch_size=1)
    flow = TransformerFlow(cfg, in_channels=channels, latent_size=side)
    with torch.no_grad():  # off the identity init (adaLN-Zero, zero head): same cost, realistic values
        for p in flow.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.02)
    if compiled:
        apply_compile(flow)
    opt = _optimizer(flow.parameters(), fused=True)
    x = torch.randn(batch, channels, side, side)
    y = torch.randint(0, CLASSES, (batch,))
    noise = torch.randn(sample_batch, side * side, channels)
    ys = torch.randint(0, CLASSES, (sample_batch,))
    guide = Guidance(CFG, "linear")

    def step():
        z, log_det, _ = flow(x, y)
        flow.nll_loss(z, log_det).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample():
        flow.inverse(noise, ys, guide)

    return step, sample


def reference(path: str, side: int, channels: int, width: int, batch: int, sample_batch: int,
              compiled: bool = False):
    """The same closures for apple/ml-tarflow's ``transformer_flow.Model`` loaded from ``path``; ``compiled``
    compiles its loss function as the reference's ``train.py --compile`` does (``torch.compile(compute_loss)``,
    inductor; default mode, not its ``max-autotune``, to bound the benchmark's compile time)."""
    import torch

    spec = importlib.util.spec_from_file_location("reference_transformer_flow", path)
    if spec is None or not os.path.isfile(path):
        raise ValueError(f"--reference {path}: not a file (expected apple/ml-tarflow's transformer_flow.py)")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.Model(in_channels=channels, img_size=side, patch_size=1, channels=width, num_blocks=NUM_BLOCKS,
                      layers_per_block=LAYERS, nvp=True, num_classes=CLASSES)
    with torch.no_grad():
        for blk in model.blocks:
            blk.proj_out.weight.normal_(std=0.02)
    opt = _optimizer(model.parameters())
    x = torch.randn(batch, channels, side, side)
    y = torch.randint(0, CLASSES, (batch,))
    noise = torch.randn(sample_batch, side * side, channels)
    ys = torch.randint(0, CLASSES, (sample_batch,))

    def loss():
        z, _, logdets = model(x, y)
        return model.get_loss(z, logdets)

    compute_loss = torch.compile(loss) if compiled else loss

    def step():
        compute_loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample():
        with torch.no_grad():
            model.reverse(noise.clone(), ys, guidance=CFG)

    return step, sample


def _autocast(fn, precision: str):
    """``fn`` under bf16 autocast (``precision="bf16"``, as both trainers run on GPU: ours ``train.precision``, the
    reference's ``train.py``), or as is (``"fp32"``)."""
    import torch

    if precision == "fp32":
        return fn

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()

    return run


def _timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def flow_case(name: str, precision: str, args) -> list:
    """All flow rows for one shape and precision, measured in this process in alternating rounds."""
    import torch

    torch.set_num_threads(args.threads)
    side, ch, width, tb, sb = SHAPES[name]
    tb, sb = args.batch or tb, args.sample_batch or sb
    variants = {"ours eager": ours(side, ch, width, tb, sb, False)}
    if not args.no_compile:
        variants["ours compiled"] = ours(side, ch, width, tb, sb, True)
    if args.reference:
        variants["reference"] = reference(args.reference, side, ch, width, tb, sb)
        if not args.no_compile:
            variants["ref compiled"] = reference(args.reference, side, ch, width, tb, sb, compiled=True)
    variants = {v: tuple(_autocast(f, precision) for f in fns) for v, fns in variants.items()}
    flops = {}
    for v, (step, sample) in variants.items():
        t0 = time.perf_counter()
        step()  # warm-up (and compilation)
        if not args.no_sample:
            sample()
        print(f"[{name} {precision}] {v}: warm-up {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        if "compiled" not in v:
            flops[v] = (count_flops(step), 0 if args.no_sample else count_flops(sample))
    flops["ours compiled"] = flops["ours eager"]
    if "ref compiled" in variants:
        flops["ref compiled"] = flops["reference"]
    ceiling = gemm_ceiling_gflops(dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    train_t = {v: [] for v in variants}
    sample_t = {v: [] for v in variants}
    floor_t = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, (step, sample) in variants.items():
            train_t[v].append(_timed(step, args.steps))
            floor_t[v].append(gemm_attention_seconds(step, args.steps))
        for v, (step, sample) in variants.items():
            if not args.no_sample:
                sample_t[v].append(_timed(sample, 1))
    floor = {v: statistics.median(ts) for v, ts in floor_t.items()}
    rows = []
    for kind, times, batch, fi in (("flow", train_t, tb, 0),) + (() if args.no_sample else (("sample", sample_t, sb, 1),)):
        ref = statistics.median(times["reference"]) if "reference" in times else None
        for v, ts in times.items():
            med = statistics.median(ts)
            gflops = flops[v][fi] / med / 1e9
            row = dict(case=f"{kind} {name} {precision}", variant=v, batch=batch, img_s=batch / med,
                       gflops=gflops, ceiling=ceiling, vs_ref=(ref / med) if ref else None, spread=(min(ts), max(ts)))
            if kind == "flow":
                row.update(floor_ms=1e3 * floor[v], bound=(ref / floor[v]) if ref and floor[v] > 0 else None)
            rows.append(row)
    return rows


def joint_case(config: str, compiled: bool, steps: int, threads: int, precision: str = "fp32") -> dict:
    """One config's joint training step through the real Trainer (fresh process), eager or compiled, at
    ``train.precision=precision``."""
    import torch

    from simflow.config import load_config
    from simflow.train.trainer import Trainer

    torch.set_num_threads(threads)
    batch = 32 if config == "tiny" else 2
    cfg = load_config(os.path.join(ROOT, "configs", f"{config}.yaml"), [
        "loss.perceptual.weight=0", "loss.repa.enabled=false", "logging.wandb=disabled",
        f"train.micro_batch_size={batch}", "train.out_dir=/tmp/simflow-bench", "checkpoint.resume=false",
        "data.source=npz", f"data.path={_ensure_demo()}", "loss.gan.start_step=0", f"train.compile={compiled}",
        f"train.precision={precision}"])
    tr = Trainer(cfg)
    it = iter(tr.loader) if cfg.model.resolution == 32 else _synthetic(cfg, batch)
    t0 = time.perf_counter()
    tr.train_step(it)  # warm-up (and compilation)
    warm = time.perf_counter() - t0
    flops = count_flops(lambda: tr.train_step(it)) if not compiled else None
    times = [_timed(lambda: tr.train_step(it), 1) for _ in range(steps)]
    return {"step_s": statistics.median(times), "batch": batch, "flops": flops, "warmup_s": warm,
            "ceiling": gemm_ceiling_gflops(dtype=torch.bfloat16 if precision == "bf16" else torch.float32)}


PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16


def _set_variant(model, compiled: bool, checkpointed: bool) -> None:
    """Put ``model``'s flow layers and VAE into one of the four (compile, activation checkpointing) variants, in
    place, undoing the previous one (benchmark only: the trainer applies :func:`parallelize` once)."""
    from simflow.models.flow import TransformerLayer
    from simflow.models.vae import VAE
    from simflow.parallel.parallelize import apply_activation_checkpointing, apply_compile

    for m in model.modules():
        if isinstance(m, TransformerLayer):
            m.__dict__.pop("forward", None)  # back to the class's eager forward
            m._compiled = m._activation_checkpointing = False
        elif isinstance(m, VAE):
            for part in (m.encoder, m.decoder):
                part._compiled_call_impl = None
    if compiled:
        apply_compile(model)
    if checkpointed:
        apply_activation_checkpointing(model)


def gpu_xl(args) -> dict:
    """One CUDA process, local engine, bf16 autocast: the XL joint step (VAE + 1.36B flow + GAN, AdamW, EMA) for
    eager / compiled x without / with activation checkpointing, each at the largest micro-batch of
    ``--micro-batches`` that fits (tried from the largest, out-of-memory caught in process), then KV-cached guided
    sampling at ``--xl-sample-batch``. MFU = model FLOPs per step (counted with FlopCounterMode on the eager
    variant without recomputation, scaled by micro-batch) / step time / 989e12. ``--dry-run-cpu``: the same code
    on CPU with the tiny config in fp32 (checks the script; numbers meaningless)."""
    import gc

    import torch

    from simflow.config import load_config
    from simflow.models.flow import Guidance
    from simflow.train.trainer import Trainer

    cuda = torch.cuda.is_available() and not args.dry_run_cpu
    if not cuda and not args.dry_run_cpu:
        raise ValueError("--gpu-xl needs CUDA (or --dry-run-cpu)")
    config = "tiny" if args.dry_run_cpu else args.gpu_config
    mbs = sorted(args.micro_batches, reverse=True)
    cfg = load_config(os.path.join(ROOT, "configs", f"{config}.yaml"), [
        "loss.perceptual.weight=0", "loss.repa.enabled=false", "logging.wandb=disabled", "train.sample_every=0",
        "checkpoint.resume=false", "data.source=npz", f"data.path={_ensure_demo(small=True)}",
        "loss.gan.start_step=0", f"train.micro_batch_size={mbs[0]}", "train.global_batch_size=0",
        f"train.precision={'bf16' if cuda else 'fp32'}", "train.out_dir=/tmp/simflow-bench-xl"])
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    build_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows, flops_per_image = [], None
    for compiled, ckpt in ((False, False), (False, True)) + (() if args.no_compile else ((True, False), (True, True))):
        _set_variant(tr.model, compiled, ckpt)
        row = {"compiled": compiled, "activation_checkpointing": ckpt}
        for mb in mbs:
            it = _synthetic(cfg, mb)
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                tr.train_step(it)  # warm-up (compilation for a new shape)
                sync()
                warm = time.perf_counter() - t0
                if flops_per_image is None:
                    flops_per_image = count_flops(lambda: tr.train_step(it)) / mb
                times = []
                for _ in range(args.xl_steps):
                    sync()
                    t0 = time.perf_counter()
                    tr.train_step(it)
                    sync()
                    times.append(time.perf_counter() - t0)
            except torch.OutOfMemoryError:
                for p in tr.model.parameters():
                    p.grad = None
                if tr.disc is not None:
                    for p in tr.disc.module.parameters():
                        p.grad = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                row.setdefault("oom", []).append(mb)
                continue
            step_s = statistics.median(times)
            row.update(micro_batch=mb, step_s=step_s, warmup_s=warm, img_per_s=mb / step_s,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                       mfu=flops_per_image * mb / step_s / PEAK_BF16_FLOPS)
            break
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    _set_variant(tr.model, False, False)
    model, sb = tr.model, args.xl_sample_batch
    f = model.flow
    gen = torch.Generator().manual_seed(0)
    dev = tr.device
    noise = torch.randn(sb, f.num_tokens, f.token_dim, generator=gen).to(dev)
    y = torch.randint(0, f.num_classes, (sb,), generator=gen).to(dev)
    g = Guidance(cfg.sample.cfg_scale or 1.5, cfg.sample.cfg_mode)
    model.eval()
    with torch.no_grad(), tr._autocast():
        model.sample(y[:2], noise[:2], g)  # warm-up
        sync()
        t0 = time.perf_counter()
        model.sample(y, noise, g)
        sync()
        sample_s = time.perf_counter() - t0
    return {"config": config, "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
            "build_s": build_s, "flops_per_image": flops_per_image, "rows": rows, "sample_batch": sb,
            "cfg_mode": g.mode, "sample_img_per_s": sb / sample_s, "precision": "bf16 autocast" if cuda else "fp32",
            "fid50k_gpu_hours": 50000 / (sb / sample_s) / 3600}


def print_gpu_table(r: dict) -> None:
    print(f"\n{r['config']} on {r['device']}: joint step (VAE + flow + GAN, {r['precision']}, local engine, AdamW, EMA); "
          f"model FLOPs {r['flops_per_image'] / 1e12:.2f} TFLOP/image; MFU vs 989 TFLOP/s")
    hdr = f"{'variant':<26}{'micro':>6}{'step s':>9}{'img/s':>9}{'peak GiB':>10}{'MFU %':>7}{'warm-up s':>11}"
    print(hdr)
    print("-" * len(hdr))
    for row in r["rows"]:
        name = ("compiled" if row["compiled"] else "eager") + (" + act. ckpt" if row["activation_checkpointing"] else "")
        if "step_s" not in row:
            print(f"{name:<26}  nothing fits (out of memory at {row.get('oom')})")
            continue
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        print(f"{name:<26}{row['micro_batch']:>6}{row['step_s']:>9.3f}{row['img_per_s']:>9.1f}{peak:>10}"
              f"{100 * row['mfu']:>7.1f}{row['warmup_s']:>11.1f}")
    print(f"KV-cached guided sampling ({r['cfg_mode']}), batch {r['sample_batch']}: {r['sample_img_per_s']:.1f} img/s "
          f"-> FID-50k sampling {r['fid50k_gpu_hours']:.2f} GPU-hours")


def _ensure_demo(small: bool = False) -> str:
    """The demo NPZ the Trainer's loader needs (timed steps of 256-px configs use synthetic batches); ``small``
    builds a 256-image one under /tmp when the repository's is absent (fresh GPU machine)."""
    path = os.path.join(ROOT, "data/demo/demo.npz")
    if os.path.isfile(path):
        return path
    from simflow.data.demo import build_demo

    if small:
        path = "/tmp/simflow-bench-demo/demo.npz"
        if not os.path.isfile(path):
            build_demo(os.path.dirname(path), limit=256)
        return path
    build_demo(os.path.dirname(path))
    return path


def _synthetic(cfg, batch):
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
    p.add_argument("--reference", help="path to apple/ml-tarflow's transformer_flow.py (measured side by side)")
    p.add_argument("--shapes", nargs="*", default=["T1", "T2"], choices=sorted(SHAPES))
    p.add_argument("--joint", nargs="*", default=["tiny"], help="configs for the joint-step rows (e.g. tiny b)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    p.add_argument("--steps", type=int, default=3, help="flow training steps per round")
    p.add_argument("--joint-steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=0, help="flow train batch (0 = 64 at T1, 16 at T2)")
    p.add_argument("--sample-batch", type=int, default=0, help="sampling batch (0 = 16 at T1, 8 at T2)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    p.add_argument("--no-sample", action="store_true", help="skip the sampling rows")
    p.add_argument("--gpu-xl", action="store_true", help="CUDA: XL step x (eager, compiled) x (AC off, on) + sampling")
    p.add_argument("--gpu-config", default="xl")
    p.add_argument("--micro-batches", nargs="+", type=int, default=[64, 48, 32, 24, 16, 8])
    p.add_argument("--xl-steps", type=int, default=3)
    p.add_argument("--xl-sample-batch", type=int, default=256)
    p.add_argument("--json", help="also write the --gpu-xl result here")
    p.add_argument("--dry-run-cpu", action="store_true", help="--gpu-xl code path on CPU with the tiny config")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="autocast precision of every row (bf16: both trainers' GPU setting; on CPU it uses AMX/AVX512-BF16 "
                        "GEMMs where the CPU has them)")
    p.add_argument("--joint-case", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    # bad input exits 2 naming the flag, before any work (argparse's error: usage + message on stderr)
    if a.reference and not os.path.isfile(a.reference):
        p.error(f"--reference {a.reference}: not a file (expected apple/ml-tarflow's transformer_flow.py)")
    for flag in ("threads", "rounds", "steps", "joint_steps", "xl_steps", "xl_sample_batch"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(a, flag)}")
    if any(m < 1 for m in a.micro_batches):
        p.error(f"--micro-batches must all be >= 1; got {a.micro_batches}")
    if a.gpu_xl and not a.dry_run_cpu:
        import torch

        if not torch.cuda.is_available():
            p.error("--gpu-xl needs CUDA (or --dry-run-cpu)")
    if a.gpu_xl:
        r = gpu_xl(a)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(r, f)
        print_gpu_table(r)
        return 0 if any("step_s" in row for row in r["rows"]) else 1
    if a.joint_case:
        print(json.dumps(joint_case(a.joint_case[0], a.joint_case[1] == "compiled", a.joint_steps, a.threads,
                                    a.joint_case[2])))
        return 0
    rows = []
    for prec in a.precision:
        for s in a.shapes:
            rows += flow_case(s, prec, a)
    for c, prec in ((c, prec) for prec in a.precision for c in a.joint):
        for mode in ("eager",) + (() if a.no_compile else ("compiled",)):
            r = subprocess.run([sys.executable, __file__, "--joint-case", c, mode, prec, "--joint-steps",
                                str(a.joint_steps), "--threads", str(a.threads)], capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            j = json.loads(r.stdout.strip().splitlines()[-1])
            if mode == "eager":
                flops = j["flops"]
            rows.append(dict(case=f"joint {c} {prec}", variant=f"ours {mode}", batch=j["batch"],
                             img_s=j["batch"] / j["step_s"], gflops=flops / j["step_s"] / 1e9,
                             ceiling=j["ceiling"], vs_ref=None, spread=None))
    print(f"\n{a.threads} threads, {a.rounds} alternating rounds x {a.steps} steps (flow), medians; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    hdr = (f"{'case':<17}{'variant':<15}{'batch':>6}{'img/s':>10}{'GFLOP/s':>9}{'% ceiling':>10}{'x ref':>7}"
           f"{'GEMM+attn ms':>13}{'bound':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ratio = f"{r['vs_ref']:.2f}" if r["vs_ref"] else "-"
        floor = f"{r['floor_ms']:.1f}" if r.get("floor_ms") else "-"
        bound = f"{r['bound']:.2f}" if r.get("bound") else "-"
        print(f"{r['case']:<17}{r['variant']:<15}{r['batch']:>6}{r['img_s']:>10.1f}{r['gflops']:>9.1f}"
              f"{100 * r['gflops'] / r['ceiling']:>9.0f}%{ratio:>7}{floor:>13}{bound:>7}")
    ceilings = {r["case"].rsplit(" ", 1)[-1]: r["ceiling"] for r in rows}
    print("GEMM ceiling (2048^3 matmul, best of 5; % ceiling is against the row's precision): "
          + ", ".join(f"{p} {c:.0f} GFLOP/s" for p, c in ceilings.items()))
    print("GEMM+attn ms: time per step inside GEMM and attention kernels (torch.profiler, a profiled run after each "
          "timed one, median);\nbound: reference step time / that, the largest 'x ref' the row's kernels allow if all "
          "other work were free")
    return 0


if __name__ == "__main__":
    sys.exit(main())
