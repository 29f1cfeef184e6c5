"""Multi-process workers of the sharded-checkpoint tests (not collected by pytest: no ``test_`` prefix); started
with :func:`parallel_workers.spawn`."""

from __future__ import annotations

import os
from typing import Any, Dict, List

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from parallel_workers import TINY


class LargestTensor(TorchDispatchMode):
    """Records the largest floating-point tensor (elements) that any aten op *allocates* while active (this thread
    only): outputs whose storage is not one of the inputs' storages (views, ``set_`` and in-place ops allocate
    nothing); for a DTensor, its local shard. Training state is fp32; the uint8 buffers of object collectives
    (DCP's plan exchange) are not state."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = set()
        for x in pytree.tree_leaves((args, kwargs or {})):
            if isinstance(x, torch.Tensor):
                seen.add(_storage_ptr(_local(x)))
            elif isinstance(x, (torch.UntypedStorage, torch.TypedStorage)):
                seen.add(x.data_ptr())
        for t in pytree.tree_leaves(out):
            t = _local(t)
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > self.numel
                    and _storage_ptr(t) not in seen):
                self.numel, self.op = t.numel(), str(func)
        return out


def _local(t):
    """A DTensor's local shard (what an op on it allocates on this rank; the mode sees the DTensor-level op only),
    anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _storage_ptr(t: torch.Tensor):
    """The tensor's storage address, or ``id(t)`` for tensors without a readable storage (DTensor's functional
    collectives hand out wrappers whose storage is not a real one until waited on)."""
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return id(t)


def shard_memory_worker(rank: int, world: int, outdir: str, overrides: List[str]) -> None:
    """DeepSpeed ZeRO-3 or FSDP2 (``parallel.engine`` in ``overrides``) at DP=``world`` with a BatchNorm
    discriminator: 2 steps, then a blocking save and a load watched by :class:`LargestTensor`; a step after the save
    and a load back (round trip); then a NaN planted in rank 1's EMA partition and another save (must not commit).
    Rank 0 writes ``result.pt``."""
    from simflow.config import load_config
    from simflow.parallel.factory import build_engine
    from simflow.parallel.topology import init_topology
    from simflow.train.trainer import Trainer

    cfg = load_config(TINY, overrides)
    topo = init_topology(cfg)
    tr = Trainer(cfg, topo, build_engine=build_engine)
    it = iter(tr.loader)
    for _ in range(2):
        tr.train_step(it)
    gen = tr.gen
    # every parameter the save writes: generator and discriminator (the largest may be either's)
    params = {**{f"generator.{n}": p for n, p in gen._params.items()},
              **{f"discriminator.{n}": p for n, p in tr.disc._params.items()}}
    fsdp2 = cfg.parallel.engine == "fsdp2"
    if fsdp2:  # the rank's FSDP2 shard (Shard(0) rows) of each parameter
        res: Dict[str, Any] = {"full_numel": {n: p.numel() for n, p in params.items()},
                               "part_numel": {n: p.to_local().numel() for n, p in params.items()},
                               "rows": {n: p.shape[0] for n, p in params.items()}}
    else:
        res = {"full_numel": {n: int(p.ds_numel) for n, p in params.items()},
               "part_numel": {n: int(p.ds_tensor.ds_numel) for n, p in params.items()}}
    disc_module = tr.disc.module if fsdp2 else tr.disc.inner
    bufs = [{k: b.clone() for k, b in disc_module.named_buffers()}]
    gathered: List[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, bufs[0])
    res["disc_buffers_per_rank"] = gathered
    before = {**gen.full_state_dict(ema=False), **{f"ema.{k}": v for k, v in gen.full_state_dict(ema=True).items()}}
    with LargestTensor() as mode:
        gen.state_dict()  # the topology-free full states (all-gathers): what the detector must catch
        tr.disc.state_dict()
    res["gathered_largest"] = (mode.numel, mode.op)
    with LargestTensor() as mode:
        tr.save(block=True)
    res["save_largest"] = (mode.numel, mode.op)
    tr.train_step(it)  # weights move on
    with LargestTensor() as mode:
        got = tr.checkpointer.load_latest(lambda manifest, d: None)
    res["load_largest"] = (mode.numel, mode.op)
    res["loaded"], res["read"] = got[0], got[2]["read"]
    after = {**gen.full_state_dict(ema=False), **{f"ema.{k}": v for k, v in gen.full_state_dict(ema=True).items()}}
    res["roundtrip_equal"] = set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    tr.step = 3
    if rank == 1:
        name = next(iter(gen.ema))
        (gen.ema[name].to_local() if fsdp2 else gen.ema[name])[0] = float("nan")
        res["nan_in"] = name
    tr.save(block=True)
    if rank == 0:
        torch.save(res, os.path.join(outdir, "result.pt"))
