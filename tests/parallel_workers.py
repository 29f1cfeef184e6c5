"""Multi-process helpers for the distributed tests (not collected by pytest: no ``test_`` prefix).

:func:`spawn` starts ``world`` CPU processes (gloo, 127.0.0.1, a free port) running ``fn(rank, world, *args)`` with
torchrun-style environment variables; each worker's exception is written to a file and re-raised in the parent, and
a hung group is killed after ``timeout`` seconds. Workers return results by ``torch.save`` into a shared folder.
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _entry(rank: int, world: int, port: int, errdir: str, fn: Callable, args: Sequence[Any]) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's notes on DeepSpeed's collective calls
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    try:
        fn(rank, world, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(os.path.join(errdir, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    from simflow.runtime import exit_now

    exit_now(0)  # as simflow.launch does: gloo's threads can abort a finalizing interpreter


def spawn(fn: Callable, world: int, args: Sequence[Any], errdir: str, timeout: float = 600.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes; raise with the first worker traceback."""
    from simflow.parallel.topology import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, errdir, fn, tuple(args))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs) or time.time() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    errors = sorted(f for f in os.listdir(errdir) if f.startswith("error_rank"))
    if errors:
        with open(os.path.join(errdir, errors[0])) as f:
            raise RuntimeError(f"worker {errors[0]} failed:\n{f.read()}")
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        raise RuntimeError(f"workers exited with {codes} (timeout {timeout}s or crash)")


# ----------------------------------------------------------------------------------------------------------------
# tensor parallelism on the real flow, no DeepSpeed
def _perturb(model: torch.nn.Module, tp_rank: int, tp_size: int) -> None:
    """Add the same N(0, 0.05^2) full-size noise to every parameter of a dense and a TP model (TP models keep
    their slice), so the zero-initialised adaLN and heads do not make the flow the identity."""
    from simflow.parallel.engine import tp_partition_dim

    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            dim = tp_partition_dim(p)
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= tp_size
            g = torch.Generator().manual_seed(1000 + i)
            noise = torch.randn(shape, generator=g) * 0.05
            if dim is not None:
                noise = noise.chunk(tp_size, dim=dim)[tp_rank]
            p.add_(noise)


def tp_flow_checks(cfg, tp_group) -> Dict[str, float]:
    """Max |TP - dense| for initial weights, forward (z, log_det), parameter gradients and KV-cached CFG sampling
    of the real :class:`~simflow.models.flow.TransformerFlow` (same seed, same perturbation)."""
    import torch.distributed as dist

    from simflow.models.flow import TransformerFlow
    from simflow.parallel.engine import tp_partition_dim
    from simflow.parallel.tensor_parallel import TensorParallelLinearFactory

    tp_size, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    c, h = cfg.model.vae.latent_channels, cfg.model.resolution // 2 ** (len(cfg.model.vae.ch_mult) - 1)
    torch.manual_seed(123)
    dense = TransformerFlow(cfg.model.flow, c, h)
    torch.manual_seed(123)
    factory = TensorParallelLinearFactory(tp_group)
    tp = TransformerFlow(cfg.model.flow, c, h, linear_factory=factory)
    out: Dict[str, float] = {"tp_size": float(factory.tp_size)}

    def full(p: torch.Tensor, value: torch.Tensor = None) -> torch.Tensor:
        """The TP=1 view of ``value`` (default ``p``), gathering slices when ``p`` is split over TP."""
        value = p.detach() if value is None else value.detach()
        dim = tp_partition_dim(p)
        if dim is None:
            return value
        parts = [torch.empty_like(value) for _ in range(tp_size)]
        dist.all_gather(parts, value.contiguous(), group=tp_group)
        return torch.cat(parts, dim=dim)

    dn = dict(dense.named_parameters())
    tn = dict(tp.named_parameters())
    out["init_max_diff"] = max((full(tn[k]) - dn[k]).abs().max().item() for k in dn)
    out["n_split_params"] = float(sum(tp_partition_dim(p) is not None for p in tn.values()))
    _perturb(dense, 0, 1)
    _perturb(tp, tp_rank, tp_size)

    g = torch.Generator().manual_seed(7)
    z_img = torch.randn(3, c, h, h, generator=g)
    y = torch.tensor([1, 4, cfg.model.flow.num_classes])
    w = torch.randn(3, h * h, c, generator=g)
    res = {}
    for name, m in (("dense", dense), ("tp", tp)):
        z, log_det, _ = m(z_img, y)
        loss = (z * w).sum() + log_det.sum() * 0.01
        loss.backward()
        res[name] = (z.detach(), log_det.detach(), {k: full(p, p.grad) for k, p in m.named_parameters()})
    out["fwd_z_max_diff"] = (res["tp"][0] - res["dense"][0]).abs().max().item()
    out["fwd_logdet_max_diff"] = (res["tp"][1] - res["dense"][1]).abs().max().item()
    out["grad_max_diff"] = max((res["tp"][2][k] - res["dense"][2][k]).abs().max().item() for k in dn)
    out["grad_max_abs"] = max(res["dense"][2][k].abs().max().item() for k in dn)
    out["z_max_abs"] = res["dense"][0].abs().max().item()
    out["logdet_max_abs"] = res["dense"][1].abs().max().item()

    noise = torch.randn(2, h * h, c, generator=g)
    yl = torch.tensor([3, 7])
    out.update(guided_sampling_diffs(dense, lambda *a: tp.inverse(*a, use_cache=True), noise, yl))
    with torch.no_grad():
        # the cached TP decode is also the exact inverse of the TP forward (no guidance)
        zf, _, _ = tp(z_img, y)
        back = tp.inverse(zf, y, None, use_cache=True)
        out["tp_roundtrip_max_diff"] = (back - z_img).abs().max().item()
    return out


# ----------------------------------------------------------------------------------------------------------------
# the real trainer on the DeepSpeed engine
def guided_sampling_diffs(dense, tp_inverse: Callable, noise: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """KV-cached guided sampling (w = 1.5, ``deep_only`` and ``gaussian``) of the dense flow vs ``tp_inverse(noise,
    labels, guidance)`` (the same weights under tensor parallelism): ``sample_<mode>_max_diff`` and the dense
    samples' ``sample_<mode>_max_abs`` (the scale the tests' tolerance is relative to)."""
    from simflow.models.flow import Guidance

    out: Dict[str, float] = {}
    with torch.no_grad():
        for mode in ("deep_only", "gaussian"):
            guide = Guidance(scale=1.5, mode=mode)
            a = dense.inverse(noise, labels, guide, use_cache=True)
            out[f"sample_{mode}_max_diff"] = (a - tp_inverse(noise, labels, guide)).abs().max().item()
            out[f"sample_{mode}_max_abs"] = a.abs().max().item()
    return out


def trainer_worker(rank: int, world: int, outdir: str, overrides: List[str], steps: int, bf16_steps: int = 0,
                   local_state: str = None) -> None:
    """Build the tiny config's Trainer on the DeepSpeed engine, run ``steps`` steps, snapshot the topology-free
    state, export, sample from the sharded EMA, run one more step; load ``local_state`` (a LocalEngine state) when
    given and run one step from it; then, if ``bf16_steps``, a second Trainer with
    ``train.precision=bf16`` (DeepSpeed's torch_autocast path, used on CUDA) in the same process groups. Rank 0
    saves everything to ``outdir``."""
    from simflow.config import load_config
    from simflow.parallel.factory import build_engine
    from simflow.parallel.topology import destroy_topology, init_topology
    from simflow.sampling import sample_images
    from simflow.train.trainer import Trainer

    cfg = load_config(TINY, overrides)
    topo = init_topology(cfg)
    res: Dict[str, Any] = {"topology": topo.as_dict()}
    if topo.tp_size > 1:
        res["tp_checks"] = tp_flow_checks(cfg, topo.tp_group)
    t0 = time.time()
    tr = Trainer(cfg, topo, build_engine=build_engine)
    res["build_s"] = time.time() - t0
    gen = tr.gen
    res["orphans"] = gen.orphans
    res["local_numel"] = gen.local_numel()
    res["full_numel"] = gen.full_numel()
    res["tp_local_numel"] = sum(int(p.ds_numel) for p in gen.inner.parameters())
    res["n_params"] = len(list(gen.inner.parameters()))
    from simflow.parallel.engine import tp_partition_dim

    res["tp_split_local_numel"] = sum(int(p.ds_numel) for p in gen.inner.parameters() if tp_partition_dim(p) is not None)
    numels = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    torch.distributed.all_gather(numels, torch.tensor([res["local_numel"]]))
    res["local_numel_all"] = [int(t.item()) for t in numels]
    it = iter(tr.loader)
    t0 = time.time()
    res["metrics"] = [tr.train_step_logged(it) for _ in range(steps)]
    res["steps_s"] = time.time() - t0
    res["gen_state"] = gen.state_dict()
    res["disc_state"] = tr.disc.state_dict() if tr.disc is not None else None
    res["loader_state"] = tr.loader.state_dict()
    res["export"] = gen.full_state_dict(ema=True)
    idx = torch.arange(6)
    with torch.no_grad(), gen.full_params(ema=True) as model:
        model.eval()
        res["samples"] = sample_images(model, idx, idx % cfg.model.flow.num_classes, cfg.sample, topo.device,
                                       torch.float32)
        model.train()
    res["next_metrics"] = tr.train_step_logged(it)
    res["after_next_export"] = gen.full_state_dict(ema=False)
    if local_state:  # a LocalEngine state (1 process) loaded into these sharded engines, then one step
        st = torch.load(local_state, weights_only=True)
        gen.load_state_dict(st["gen"])
        tr.disc.load_state_dict(st["disc"])
        tr.loader.load_state_dict(st["loader"])
        tr.step = steps
        res["from_local_metrics"] = tr.train_step_logged(iter(tr.loader))
    res["errors"] = {}
    try:  # the accumulation protocol is enforced
        gen.step()
    except RuntimeError as e:
        res["errors"]["step_without_backward"] = str(e)
    bad = dict(res["gen_state"], module=dict(res["gen_state"]["module"]))
    bad["module"]["flow.blocks.0.proj_in.weight"] = torch.zeros(3, 3)
    try:
        gen.load_state_dict(bad)
    except ValueError as e:
        res["errors"]["bad_shape"] = str(e)
    del bad["module"]["flow.blocks.0.proj_in.weight"]
    try:
        gen.load_state_dict(bad)
    except KeyError as e:
        res["errors"]["missing"] = str(e)
    if bf16_steps:
        tb = Trainer(load_config(TINY, overrides + ["train.precision=bf16"]), topo, build_engine=build_engine)
        res["bf16_autocast"] = tb.gen._ds.torch_autocast_enabled()
        itb = iter(tb.loader)
        res["bf16_metrics"] = [tb.train_step_logged(itb) for _ in range(bf16_steps)]
    if rank == 0:
        torch.save(res, os.path.join(outdir, "result.pt"))
    destroy_topology(topo)


# ----------------------------------------------------------------------------------------------------------------
# non-finite guard and fp32 gradient reduction on the DeepSpeed engine (tests/test_step_dist.py)
def _local_state(tr) -> Dict[str, Any]:
    """This rank's own shards, copied: fp32 master partitions, AdamW moments/step of the flat partitions (DeepSpeed)
    or of each parameter (FSDP2), EMA."""
    from simflow.parallel.fsdp2_engine import FSDP2Engine

    if isinstance(tr.gen, FSDP2Engine):
        def local(v):
            return v.to_local().detach().clone() if hasattr(v, "to_local") else v.detach().clone()

        out: Dict[str, Any] = {}
        for role, eng in (("gen", tr.gen), ("disc", tr.disc)):
            out[f"{role}.master"] = {n: local(eng._params[n]) for n in eng._trainable}
            out[f"{role}.adam"] = [{k: (local(v) if torch.is_tensor(v) else v)
                                    for k, v in eng.optimizer.state.get(eng._params[n], {}).items()}
                                   for n in eng._trainable]
            out[f"{role}.ema"] = {k: local(v) for k, v in eng.ema.items()}
        return out
    from deepspeed.utils import safe_get_local_fp32_param

    out = {}
    for role, eng in (("gen", tr.gen), ("disc", tr.disc)):
        out[f"{role}.master"] = {n: safe_get_local_fp32_param(p).detach().clone() for n, p in eng._params.items()
                                 if n in eng._trainable}
        out[f"{role}.adam"] = [{k: (v.detach().clone() if torch.is_tensor(v) else v)
                                for k, v in eng.optimizer.state.get(f, {}).items()} for f in eng._flat_partitions()]
        out[f"{role}.ema"] = {k: v.detach().clone() for k, v in eng.ema.items()}
    return out


def _save_with_poisoned_zero3_padding(tr) -> Dict[str, Any]:
    """Fill the ZeRO-3 padding tail of every fp32 master partition, AdamW moment and EMA partition on this rank with
    NaN (DeepSpeed allocates those tails with ``torch.empty``: whatever bytes the allocator hands back), save a
    checkpoint, put the tails back, and report: padded elements poisoned, whether the step committed, whether the
    full (gathered) state is finite."""
    from deepspeed.utils import safe_get_local_optimizer_state

    from simflow.checkpoint.sharded import zero3_range
    from simflow.checkpoint.store import MARKER

    poisoned, tails = 0, []
    with torch.no_grad():
        for eng in (tr.gen, tr.disc):
            for name, p in eng._params.items():
                start, stop = zero3_range(int(p.ds_numel), eng.dp_rank, eng.dp_size)
                flats = [eng._local_fp32(p)] if name in eng._trainable else []
                flats += [safe_get_local_optimizer_state(p, k).view(-1) for k in ("exp_avg", "exp_avg_sq")
                          if name in eng._trainable]
                flats += [eng.ema[name]] if name in eng.ema else []
                for flat in flats:
                    tails.append((flat, flat[stop - start:].clone()))
                    flat[stop - start:] = float("nan")
                    poisoned += flat.numel() - (stop - start)
    before = tr.gen.state_dict()
    d = tr.save(block=True)
    committed = os.path.exists(os.path.join(d, MARKER))
    with torch.no_grad():
        for flat, tail in tails:
            flat[flat.numel() - tail.numel():] = tail
    return {"poisoned": poisoned, "committed": committed, "dir": d, "full_finite": all(
        bool(torch.isfinite(t).all()) for t in list(before["module"].values()) + list(before["ema"].values()))}


def nonfinite_worker(rank: int, world: int, outdir: str, overrides: List[str], poison: str) -> None:
    """DeepSpeed or FSDP2 Trainer (``parallel.engine`` in ``overrides``) with ``SIMFLOW_TEST_POISON_LOSS=poison``: 3 steps, snapshot (this rank's shards and the
    full topology-free state), the 4th step (poisoned on one rank), snapshot, 2 more steps, flush the metrics; then
    ``fit()`` on to ``train.steps`` with more poisoned steps until ``NonFiniteExit``. Every rank saves its results."""
    os.environ["SIMFLOW_TEST_POISON_LOSS"] = poison
    from simflow.config import load_config
    from simflow.parallel.factory import build_engine
    from simflow.parallel.topology import destroy_topology, init_topology
    from simflow.train.trainer import Trainer

    cfg = load_config(TINY, overrides)
    topo = init_topology(cfg)
    tr = Trainer(cfg, topo, build_engine=build_engine)
    it = iter(tr.loader)
    res: Dict[str, Any] = {}
    for _ in range(3):
        tr.train_step(it)
    res["before_local"] = _local_state(tr)
    res["before_full"] = tr.gen.state_dict()
    res["lr_before"] = tr.gen.optimizer.param_groups[0]["lr"]
    tr.train_step(it)
    res["after_local"] = _local_state(tr)
    res["after_full"] = tr.gen.state_dict()
    res["lr_after"] = tr.gen.optimizer.param_groups[0]["lr"]
    res["steps_after"] = (tr.step, tr.gen.steps, tr.gen._ds.global_steps if hasattr(tr.gen, "_ds") else tr.gen.steps)
    for _ in range(2):
        tr.train_step(it)
    res["moved_local"] = _local_state(tr)
    res["rows"] = tr.flush_metrics()
    tr.check_skips()
    res["skipped_steps"] = tr.skipped_steps
    if hasattr(tr.gen, "_ds"):
        res["padding_save"] = _save_with_poisoned_zero3_padding(tr)
    try:
        tr.fit()
        res["exit"] = None
    except SystemExit as e:  # NonFiniteExit
        res["exit"] = (e.code, getattr(e, "message", ""), tr.step)
    torch.save(res, os.path.join(outdir, f"nonfinite_rank{rank}.pt"))
    destroy_topology(topo)


def bf16_reduce_worker(rank: int, world: int, outdir: str, variants) -> None:
    """ZeRO-3 under DeepSpeed's bf16 ``torch_autocast``, one engine per ``(name, safe_modules)`` in ``variants``, all
    in one process group: with :func:`deepspeed_config` (``safe_modules`` None) or with its
    ``lower_precision_safe_modules`` replaced (the old bf16-reducing setting). Each engine holds its own
    Linear(4, 4, bias=False) (DeepSpeed marks the comm dtype on the parameters, so the engines do not share it);
    loss = sum(W x): dL/dW[i, j] = x[j]; rank 0 feeds x = 1, rank 1 x = 2^-9 (both exact in bf16). The reduced
    (averaged) gradient is (1 + 2^-9) / 2 in fp32, but 0.5 if the sum is rounded to bf16 (its spacing at 1 is 2^-7).
    Saves, per variant, the full reduced gradient and the comm dtypes of the parameters to ``<name>_rank<r>.pt``."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from simflow.config import load_config
    from simflow.parallel.deepspeed_engine import deepspeed_config

    torch.distributed.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    cfg = load_config(TINY, ["train.precision=bf16", "parallel.engine=deepspeed", "train.micro_batch_size=1",
                             "optim.grad_clip=0"])
    for name, safe_modules in variants:
        conf = deepspeed_config(cfg, world, torch.device("cpu"))
        if safe_modules is not None:
            conf["torch_autocast"]["lower_precision_safe_modules"] = list(safe_modules)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4, bias=False)
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=conf, dist_init_required=False)
        x = torch.full((1, 4), 1.0 if rank == 0 else 2.0 ** -9)
        y = engine(x)
        engine.backward(y.float().sum())
        p = next(engine.module.parameters())
        res = {"grad": safe_get_full_grad(p).detach().clone(),
               "comm_dtypes": sorted(str(d) for d in engine.optimizer.ipg_buckets),
               "autocast": engine.torch_autocast_enabled(), "loss_dtype": str(y.dtype)}
        torch.save(res, os.path.join(outdir, f"{name}_rank{rank}.pt"))
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# the FSDP2 engine: DTensor TP on the real flow, sharding, protocol errors (tests/test_fsdp2_dist.py)
def fsdp2_tp_worker(rank: int, world: int, outdir: str, overrides: List[str]) -> None:
    """``world`` = 2 processes at TP=2 (mesh dp=1 x tp=2), FSDP2 engine. (1) The real flow, built dense and
    perturbed identically, then parallelised by :func:`parallelize_simflow` inside an ``FSDP2Engine``: forward,
    parameter gradients and KV-cached guided sampling (``full_params``) against the dense flow. (2) Parameter
    elements per rank of the whole generator on the (1 x 2) mesh and, in the same process group, on a (2 x 1) mesh.
    (3) Engine protocol errors and the frozen-VAE variant. Rank 0 saves ``fsdp2_tp.pt``."""
    from types import SimpleNamespace

    from simflow.config import load_config
    from simflow.models.flow import Guidance, TransformerFlow
    from simflow.parallel.fsdp2_engine import FSDP2Engine
    from simflow.parallel.topology import destroy_topology, init_topology
    from simflow.models.simflow import build_generator

    cfg = load_config(TINY, overrides)
    topo = init_topology(cfg)
    c, h = cfg.model.vae.latent_channels, cfg.model.resolution // 2 ** (len(cfg.model.vae.ch_mult) - 1)

    def flow() -> TransformerFlow:
        torch.manual_seed(123)
        m = TransformerFlow(cfg.model.flow, c, h)
        _perturb(m, 0, 1)
        return m

    dense = flow()
    eng = FSDP2Engine(cfg, flow, "generator", [], topo)
    res: Dict[str, Any] = {"tp_size": topo.tp_size,
                           "placements": {n: str(p.placements) for n, p in eng._params.items()}}
    g = torch.Generator().manual_seed(7)
    z_img = torch.randn(3, c, h, h, generator=g)
    y = torch.tensor([1, 4, cfg.model.flow.num_classes])
    w = torch.randn(3, h * h, c, generator=g)
    outs = {}
    for name, m in (("dense", dense), ("tp", eng.module)):
        z, log_det, _ = m(z_img, y)
        ((z * w).sum() + log_det.sum() * 0.01).backward()
        outs[name] = (z.detach(), log_det.detach())
    grads = {n: p.grad.full_tensor() for n, p in eng._params.items()}
    dn = dict(dense.named_parameters())
    # the same TP model with activation checkpointing (applied between TP and fully_shard): bit-equal gradients
    ac_cfg = load_config(TINY, overrides + ["train.activation_checkpointing=true"])
    ac = FSDP2Engine(ac_cfg, flow, "generator", [], topo)
    z, log_det, _ = ac.module(z_img, y)
    ((z * w).sum() + log_det.sum() * 0.01).backward()
    res["ac_grad_max_diff"] = max((p.grad.full_tensor() - grads[n]).abs().max().item() for n, p in ac._params.items())
    res["fwd_z_max_diff"] = (outs["tp"][0] - outs["dense"][0]).abs().max().item()
    res["fwd_logdet_max_diff"] = (outs["tp"][1] - outs["dense"][1]).abs().max().item()
    res["z_max_abs"] = outs["dense"][0].abs().max().item()
    res["logdet_max_abs"] = outs["dense"][1].abs().max().item()
    res["grad_max_diff"] = max((grads[n] - dn[n].grad).abs().max().item() for n in dn)
    res["grad_max_abs"] = max(dn[n].grad.abs().max().item() for n in dn)
    res["grad_names_equal"] = set(grads) == set(dn)
    noise = torch.randn(2, h * h, c, generator=g)
    yl = torch.tensor([3, 7])

    def tp_inverse(*args):
        with eng.full_params(ema=False) as m:
            return m.inverse(*args, use_cache=True)

    res.update(guided_sampling_diffs(dense, tp_inverse, noise, yl))
    # a fresh engine that samples before its first forward: the registered ``inverse`` makes the root FSDP2's root,
    # so the training forward + backward through the root that follows works and equals the first engine's
    fresh = FSDP2Engine(cfg, flow, "generator", [], topo)
    with torch.no_grad(), fresh.full_params(ema=False) as m:
        b = m.inverse(noise, yl, Guidance(scale=1.5, mode="gaussian"), use_cache=True)
    res["fresh_sample_max_diff"] = (dense.inverse(noise, yl, Guidance(scale=1.5, mode="gaussian"), use_cache=True)
                                    - b).abs().max().item()
    z, log_det, _ = fresh.module(z_img, y)
    ((z * w).sum() + log_det.sum() * 0.01).backward()
    res["fresh_fwd_z_max_diff"] = (z.detach() - outs["tp"][0]).abs().max().item()
    res["fresh_grad_max_diff"] = max((p.grad.full_tensor() - grads[n]).abs().max().item()
                                     for n, p in fresh._params.items())
    # (2) parameters held per rank, whole generator
    gen = FSDP2Engine(cfg, lambda: build_generator(cfg), "generator", ["flow"], topo)
    split = sum(p.numel() for p in gen._params.values() if gen._tp_split(p))
    res["tp"] = {"local": gen.local_numel(), "full": gen.full_numel(), "split": split,
                 "plain": sum(p.numel() for p in build_generator(cfg).parameters())}
    dp_topo = SimpleNamespace(device=topo.device, dp_size=world, tp_size=1, dp_rank=rank, tp_rank=0)
    gen_dp = FSDP2Engine(cfg, lambda: build_generator(cfg), "generator", ["flow"], dp_topo)
    locals_ = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    torch.distributed.all_gather(locals_, torch.tensor([gen_dp.local_numel()]))
    res["dp"] = {"local_all": [int(t) for t in locals_], "full": gen_dp.full_numel()}
    # (3) protocol errors, frozen VAE
    res["errors"] = {}
    try:
        gen.step()
    except RuntimeError as e:
        res["errors"]["step_without_backward"] = str(e)
    sd = gen.state_dict()
    bad = dict(sd, module=dict(sd["module"]))
    bad["module"]["flow.blocks.0.proj_in.weight"] = torch.zeros(3, 3)
    try:
        gen.load_state_dict(bad)
    except ValueError as e:
        res["errors"]["bad_shape"] = str(e)
    frozen_cfg = load_config(TINY, overrides + ["train.freeze_vae=true"])
    fz = FSDP2Engine(frozen_cfg, lambda: build_generator(frozen_cfg), "generator", ["flow"], topo)
    res["frozen_vae_trainable"] = sorted({n.split(".")[0] for n in fz._trainable})
    if rank == 0:
        torch.save(res, os.path.join(outdir, "fsdp2_tp.pt"))
    destroy_topology(topo)


# ----------------------------------------------------------------------------------------------------------------
# train.compile under the FSDP2 engine (tests/test_fsdp2_dist.py)
def fsdp2_compile_worker(rank: int, world: int, outdir: str, overrides: List[str], steps: int) -> None:
    """The tiny Trainer on the FSDP2 engine twice in one process group, eager and with ``train.compile=true``
    (compile applied between TP and ``fully_shard``): ``steps`` logged steps each, then one more micro-batch's
    forward + backward without a step. Records the step metrics, the full updated weights, the full gradients of
    that last backward, how many modules ``apply_compile`` wrapped and dynamo's graph / graph-break counters. Rank 0
    saves ``fsdp2_compile.pt``."""
    from torch._dynamo.utils import counters

    from simflow.config import load_config
    from simflow.parallel.factory import build_engine
    from simflow.parallel.topology import destroy_topology, init_topology
    from simflow.train.trainer import Trainer

    res: Dict[str, Any] = {}
    topo = None
    for name, extra in (("eager", []), ("compiled", ["train.compile=true"])):
        cfg = load_config(TINY, overrides + extra)
        topo = topo or init_topology(cfg)
        torch._dynamo.reset()
        counters.clear()
        tr = Trainer(cfg, topo, build_engine=build_engine)
        it = iter(tr.loader)
        metrics = [tr.train_step_logged(it) for _ in range(steps)]
        weights = tr.gen.full_state_dict(ema=False)
        tr.micro_step(next(it))
        grads = {n: p.grad.full_tensor() for n, p in tr.gen._params.items() if p.grad is not None}
        res[name] = {"metrics": metrics, "weights": weights, "grads": grads,
                     "compiled_layers": sum(bool(getattr(m, "_compiled", False)) for m in tr.gen.module.modules()),
                     "unique_graphs": counters["stats"]["unique_graphs"],
                     "graph_breaks": sum(counters["graph_break"].values())}
    if rank == 0:
        torch.save(res, os.path.join(outdir, "fsdp2_compile.pt"))
    destroy_topology(topo)
