"""DeepSpeed ZeRO-3 engine (+ megatron-core tensor parallelism) behind the trainer's :class:`Engine` interface.

What it does, in the order a run sees it:

1. **Config in code** (:func:`deepspeed_config`): ZeRO stage 3 with micro-batch, gradient accumulation, global
   batch (micro x accumulation x DP) and gradient clipping taken from the SimFlow config; fp32 parameters; on CUDA
   (``train.precision=auto``) or with ``train.precision=bf16`` DeepSpeed's ``torch_autocast`` runs the forward in
   bf16 with fp32 master weights (the same numerics as the local engine's ``torch.autocast``; DeepSpeed would
   otherwise *disable* an outer autocast inside its forward). Gradients are reduced in **fp32** (see
   :func:`deepspeed_config`). No parameter persistence: every parameter is sharded.
2. **Construction under** ``deepspeed.zero.Init`` over the data-parallel group: each module's parameters are
   partitioned as soon as its ``__init__`` returns, so the XL model never exists whole on one rank. Tensor-parallel
   layers come from :class:`~simflow.parallel.tensor_parallel.TensorParallelLinearFactory` when ``tp_size > 1``.
3. ``deepspeed.initialize`` with a ``torch.optim.AdamW`` **client optimizer** (DeepSpeed's FusedAdam would JIT-build
   a CUDA/CPU op; torch's ``fused=True`` on the flat ZeRO-3 partitions rounds differently from the local engine's
   per-parameter fused kernel, enough to break the 1e-5 local-vs-sharded loss test, so it stays foreach) and the
   :class:`~simflow.parallel.mpu.DeepSpeedMPU` adapter, so ZeRO-3 shards over DP only and the gradient norm counts
   TP-replicated parameters once. At TP > 1 the adapter serves megatron-core's groups; at TP = 1 the topology's
   own (DP = the world), and megatron-core is never imported (about 2 s of CPU per process).
4. **Sharded EMA**: for each tracked parameter the EMA is an fp32 copy of *this rank's* ZeRO-3 partition of the
   fp32 master weight, updated in place (``ema <- d ema + (1 - d) theta``; method §8); nothing is gathered per step.
5. **Topology-free state**: :meth:`state_dict` gathers, parameter by parameter, the full fp32 weights, the AdamW
   moments and the EMA (merged over DP partitions *and* TP slices) into the same layout as
   :class:`~simflow.parallel.engine.LocalEngine` (``module`` / ``optimizer`` in ``torch.optim.AdamW.state_dict()``
   form / ``ema`` / ``steps``). :meth:`load_state_dict` scatters such a state into any (TP, DP) layout, so a
   checkpoint written by either engine at any topology loads into the other.

How the trainer calls it (the two-engine GAN step, method §5.4)::

    out = gen.module(x, y, eps)                   # DeepSpeed forward (ZeRO-3 gathers, autocast)
    with disc.frozen():                           # D params: requires_grad off; disc.module = the bare module
        loss_g = generator_loss(..., disc.module) # D(x_hat) builds a graph through D's activations only
    gen.backward(loss_g)                          # grads reach G only; D's ZeRO state is untouched
    loss_d = hinge(disc.module(x), disc.module(x_hat.detach()))  # DeepSpeed forward of D
    disc.backward(loss_d)
    ... (grad_accumulation micro-batches) ...
    gen.step(); disc.step(); gen.ema_update()

``full_params``, ``full_state_dict``, ``state_dict`` and ``load_state_dict`` are **collective**: every rank must call
them (only the main rank writes files). Sampling with TP needs all TP ranks anyway.

Rules for model code under ZeRO-3 (the tests build the real SimFlow model this way):

* a parameter is materialised only inside the ``forward`` of the module that owns it. Modules that own
  parameters but define no ``forward`` (a flow block whose ``pos_emb``/``sos`` its parent reads) are handled: their
  parameters are registered as external parameters of the nearest ancestor that has a ``forward``
  (:func:`register_orphan_parameters`). A parameter read outside every forward during training (e.g. an adaptive GAN
  weight from ``autograd.grad`` w.r.t. the decoder's last layer) is an empty tensor: not supported;
* a parent may re-initialise a child's parameters only through ``torch.nn.init`` (handled by
  :func:`init_on_gathered_params`, which keeps the RNG stream identical to a plain build);
* parameters with ``requires_grad`` off at build time (``train.freeze_vae``) are partitioned but not optimised.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from simflow.config import SimFlowConfig, global_batch_size
from simflow.parallel.engine import (ADAM_KEYS, NONFINITE_GRAD_NORM, NONFINITE_LOSS, BufferGuard, Engine,
                                     ema_decay_at, lr_at, optimizer_settings, requires_grad_off,
                                     sharded_load_targets, tp_partition_dim)
from simflow.parallel.mpu import DeepSpeedMPU



def uses_bf16(cfg: SimFlowConfig, device: torch.device) -> bool:
    """bf16 autocast on CUDA with ``train.precision=auto``, or anywhere with ``bf16`` (the trainer's rule)."""
    p = cfg.train.precision
    return p == "bf16" or (p == "auto" and device.type == "cuda")


def deepspeed_config(cfg: SimFlowConfig, dp_size: int, device: torch.device) -> Dict[str, object]:
    """The DeepSpeed JSON config derived from the SimFlow config (never written by hand).

    ``train_batch_size = micro_batch_size x grad_accumulation x dp_size`` (DeepSpeed re-checks it against the
    mpu's DP size); ``gradient_clipping = optim.grad_clip``; ZeRO stage 3 with ``stage3_param_persistence_threshold
    = 0`` (every parameter is partitioned: simpler state handling, and the sharding is exactly 1/DP).

    Reduction dtype: in DeepSpeed 0.19.8 ZeRO-3 under ``torch_autocast`` ignores ``communication_data_type`` for
    the parameters of the ``lower_precision_safe_modules`` classes: it tags them with ``comm_dtype = bf16``
    (``deepspeed/runtime/torch_autocast.py`` ``init_autocast_params``), and that tag sets both the dtype their
    gradients are reduce-scattered in (``base_optimizer.get_param_comm_dtype``) and the dtype their weights are
    all-gathered in (``partition_parameters.get_allgather_dtype``). The list is therefore left **empty**: every
    gradient is reduced in fp32 (``communication_data_type: fp32`` for the rest), at the cost of fp32 instead of
    bf16 weight all-gathers. The forward numerics do not change: autocast still runs Linear/Conv in bf16 (it
    rounds the gathered fp32 weight to bf16 exactly as a bf16 gather would).
    """
    t = cfg.train
    bf16 = uses_bf16(cfg, device)
    cuda = device.type == "cuda"
    conf: Dict[str, object] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accumulation,
        "train_batch_size": global_batch_size(cfg, dp_size),
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "communication_data_type": "fp32",
        "zero_optimization": {
            "stage": 3,
            "contiguous_gradients": True,
            "overlap_comm": cuda,
            "reduce_scatter": True,
            "reduce_bucket_size": int(5e7),
            "stage3_prefetch_bucket_size": int(5e7) if cuda else 0,
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
            "stage3_gather_16bit_weights_on_model_save": False,
            # keep torch.nn.functional.linear as it is (DeepSpeed would monkey-patch it process-wide)
            "memory_efficient_linear": False,
        },
    }
    if bf16:
        conf["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],  # no bf16 comm_dtype tags: fp32 gradient reduction (docstring)
        }
    return conf


def register_orphan_parameters(module: nn.Module) -> List[Tuple[str, str]]:
    """Make parameters of forward-less modules visible to ZeRO-3.

    ZeRO-3 gathers a module's own parameters in that module's forward pre-hook. A module that owns parameters but
    defines no ``forward`` (its parent reads them, e.g. a flow block's ``pos_emb``/``sos``) would see empty
    tensors; its parameters are registered with ``deepspeed.zero.register_external_parameter`` on the nearest
    ancestor that defines ``forward``. Returns ``[(param_name, ancestor_name), ...]`` for logging and tests.
    """
    import deepspeed

    register_external_parameter = deepspeed.zero.register_external_parameter

    named = dict(module.named_modules())
    out: List[Tuple[str, str]] = []
    for name, m in named.items():
        own = list(m.named_parameters(recurse=False))
        if not own or type(m).forward is not nn.Module.forward:
            continue
        parts = name.split(".") if name else []
        anc_name = None
        for k in range(len(parts) - 1, -1, -1):
            cand = ".".join(parts[:k])
            if type(named[cand]).forward is not nn.Module.forward:
                anc_name = cand
                break
        if anc_name is None:
            raise ValueError(f"module {name!r} owns parameters but neither it nor any ancestor defines forward()")
        for pname, p in own:
            register_external_parameter(named[anc_name], p)
            out.append((f"{name}.{pname}" if name else pname, anc_name))
    return out


@contextlib.contextmanager
def init_on_gathered_params() -> Iterator[None]:
    """While building a model under ``deepspeed.zero.Init``, make ``torch.nn.init.*_`` work on children's
    already-partitioned parameters.

    ``zero.Init`` partitions each module's parameters when *its* ``__init__`` returns, so a parent that re-initialises
    a child's weight (e.g. ``nn.init.normal_(self.class_emb.weight, std=0.02)``) would write into an empty tensor:
    the init is silently lost and the RNG stream shifts for everything built afterwards. Inside this context every
    public ``torch.nn.init`` function called on a partitioned parameter gathers it, applies the init (same RNG on
    every rank) and re-partitions it from DP rank 0's values. Direct tensor writes (``p.data.fill_``) are not
    covered: model code should initialise parameters through ``torch.nn.init``.
    """
    import deepspeed
    import torch.nn.init as tinit
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    names = [n for n in dir(tinit) if n.endswith("_") and not n.startswith("_") and callable(getattr(tinit, n))]
    originals = {n: getattr(tinit, n) for n in names}

    def wrap(fn):
        def init_gathered(tensor, *args, **kwargs):
            if hasattr(tensor, "ds_id") and tensor.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                    return fn(tensor, *args, **kwargs)
            return fn(tensor, *args, **kwargs)

        init_gathered.__wrapped__ = fn
        return init_gathered

    for n, fn in originals.items():
        setattr(tinit, n, wrap(fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(tinit, n, fn)


class DeepSpeedEngine(Engine):
    """ZeRO-3 (+TP) engine; see the module docstring for the call protocol.

    Args:
        cfg: the SimFlow config (``train``, ``optim``, ``parallel`` sections are read).
        build_module: ``build_module(linear_factory) -> nn.Module``; called once under ``deepspeed.zero.Init``.
        role: ``"generator"`` or ``"discriminator"`` (selects LR and betas).
        ema_prefixes: sub-module names whose parameters get an EMA (e.g. ``["flow"]``); empty = no EMA.
        topology: the :class:`~simflow.parallel.topology.Topology` from ``init_topology``.

    Attributes:
        module: the callable for forward passes (the DeepSpeed engine; inside :meth:`frozen`, the bare module).
        inner: the bare ``nn.Module`` (partitioned parameters; attribute access is free, parameter reads are not).
        optimizer: the client ``torch.optim.AdamW`` (its param groups hold the flat fp32 partitions after wrapping).
        steps: optimizer steps taken.
    """

    def __init__(
        self,
        cfg: SimFlowConfig,
        build_module: Callable[..., nn.Module],
        role: str,
        ema_prefixes: Sequence[str],
        topology,
    ):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        from simflow.models.layers import DenseLinearFactory
        from simflow.parallel.parallelize import parallelize

        ds_logger.setLevel(logging.WARNING)
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedEngine needs torch.distributed: call simflow.parallel.topology.init_topology")
        self.cfg = cfg
        self.role = role
        self.topo = topology
        self.device = topology.device
        self.grad_accumulation = int(cfg.train.grad_accumulation)
        self._sched = optimizer_settings(cfg, role)
        self.ema_decay = float(cfg.train.ema_decay)
        self.dp_size, self.dp_rank = topology.dp_size, topology.dp_rank
        self.tp_size, self.tp_rank = topology.tp_size, topology.tp_rank
        if self.tp_size > 1:  # megatron-core parallel_state holds the groups (init_topology started it)
            from simflow.parallel.tensor_parallel import TensorParallelLinearFactory

            self.mpu = DeepSpeedMPU.from_megatron()
            factory = TensorParallelLinearFactory(self.mpu.tp_group)
        else:  # ZeRO-3 over the whole world; TP = this rank alone (init_topology's groups, no megatron-core)
            self.mpu = DeepSpeedMPU(topology.tp_group, topology.dp_group)
            factory = DenseLinearFactory()
        self.tp_group, self.dp_group = self.mpu.tp_group, self.mpu.dp_group
        if (self.mpu.get_tensor_model_parallel_world_size(), self.mpu.get_data_parallel_world_size()) != (
                self.tp_size, self.dp_size):
            raise RuntimeError(f"{role} engine: {self.mpu} disagrees with the topology (TP={self.tp_size}, "
                               f"DP={self.dp_size})")
        self.ds_config = deepspeed_config(cfg, self.dp_size, self.device)

        with deepspeed.zero.Init(
            data_parallel_group=self.dp_group,
            config_dict_or_path=self.ds_config,
            mpu=self.mpu,  # DeepSpeed checks train_batch_size against the DP size, not the world size
        ), init_on_gathered_params():  # no dtype argument: DeepSpeed 0.19.8 would pick bf16 on CPU
            module = build_module(factory)
        parallelize(module, cfg.train)  # train.activation_checkpointing (train.compile: local engine only)
        self.orphans = register_orphan_parameters(module)
        # deepspeed.initialize draws from the global RNGs; restore them so that whatever is built next (the
        # discriminator, noise) sees the same random stream as with the local engine.
        rng_cpu = torch.get_rng_state()
        rng_cuda = torch.cuda.get_rng_state() if self.device.type == "cuda" else None

        s = self._sched
        params = [p for p in module.parameters() if p.requires_grad]
        # optimizer-state order = LocalEngine's (trainable parameters in module order)
        self._trainable: Dict[str, int] = {}
        for name, p in module.named_parameters():
            if p.requires_grad:
                self._trainable[name] = len(self._trainable)
        opt = torch.optim.AdamW(
            params, lr=lr_at(0, s["lr"], s["warmup_steps"], s["schedule"], s["total_steps"], s["min_lr"]),
            betas=s["betas"], weight_decay=s["weight_decay"], eps=s["eps"],
        )
        self._ds, _, _, _ = deepspeed.initialize(
            model=module, optimizer=opt, config=self.ds_config, mpu=self.mpu, dist_init_required=False
        )
        torch.set_rng_state(rng_cpu)
        if rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda)
        self.inner: nn.Module = self._ds.module
        self.optimizer = opt
        self.steps = 0
        self._micro = 0
        self._frozen_depth = 0
        self._loss_nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # this rank, this step
        self._applied = torch.ones((), dtype=torch.float32, device=self.device)  # 1.0 if the last step was applied
        self._buffer_guard = BufferGuard(self.inner)  # buffers are replicated, not partitioned, under ZeRO-3
        self._names = {id(p): n for n, p in self.inner.named_parameters()}
        self._params = dict(self.inner.named_parameters())
        self.ema: Dict[str, torch.Tensor] = {}
        for name, p in self._params.items():
            if any(name == pre or name.startswith(pre + ".") for pre in ema_prefixes):
                self.ema[name] = self._local_fp32(p).detach().clone()

    # ------------------------------------------------------------------------------------------------------
    # forward / backward / step
    @property
    def module(self):  # type: ignore[override]
        """The forward callable: the DeepSpeed engine (attribute access falls through to the bare module), or the
        bare module inside :meth:`frozen` (so another engine's backward never enters this engine's hooks)."""
        return self.inner if self._frozen_depth else self._ds

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch loss (scaled by ``1 / grad_accumulation`` inside DeepSpeed); ZeRO-3
        reduce-scatters the gradients into this rank's partition.

        A non-finite loss is recorded (device flag) and multiplied into the backward as a NaN factor (``loss * 1``
        otherwise, which leaves the gradients bit for bit unchanged), so that its gradients are NaN as well: the NaN
        survives the reduce-scatter, every rank's global gradient norm is NaN and DeepSpeed skips the step on every
        rank, even where a non-finite loss term had no finite-breaking gradient of its own."""
        if self._micro >= self.grad_accumulation:
            raise RuntimeError(
                f"{self.role} engine: backward() called {self._micro + 1} times without step(); "
                f"train.grad_accumulation={self.grad_accumulation}"
            )
        bad = ~torch.isfinite(loss.detach())
        self._loss_nonfinite |= bad
        self._ds.backward(loss * torch.where(bad, float("nan"), 1.0).to(loss.dtype))
        self._micro += 1
        if self._micro < self.grad_accumulation:
            self._ds.step()  # not an accumulation boundary: DeepSpeed only advances its micro-step counter

    def step(self) -> Dict[str, object]:
        """Optimizer step at the accumulation boundary: clip at ``optim.grad_clip`` (global norm over DP and TP),
        AdamW with the LR of :func:`lr_at` for this step, zero the gradients. Returns ``grad_norm`` (pre-clip, 0-dim
        fp32 tensor), ``lr`` (float) and ``nonfinite`` (0-dim int64 bitmask, identical on every rank), as
        :class:`~simflow.parallel.engine.Engine` documents.

        Non-finite steps follow the policy of :mod:`simflow.parallel.engine`. DeepSpeed decides the skip itself:
        ZeRO-3 computes the global gradient norm (all-reduced over DP and TP, so equal on every rank), reads it on
        the host (``is_invalid_grad_norm``: DeepSpeed syncs here, internally, on every step) and, when it is inf/NaN,
        zeroes the gradients and returns without calling AdamW: fp32 master weights, moments and AdamW's own
        ``step`` stay unchanged. Its ``global_steps`` still advances, as ``self.steps`` and the LR schedule do
        (attempted steps, like the local engine). ``was_step_applied()`` reports that decision; the loss flag of
        :meth:`backward` (combined with one all-reduce MAX over the world) says whether a loss caused it. The EMA
        update is masked with the same decision."""
        if self._micro != self.grad_accumulation:
            raise RuntimeError(
                f"{self.role} engine: step() after {self._micro} backward() calls; "
                f"train.grad_accumulation={self.grad_accumulation}"
            )
        s = self._sched
        lr = lr_at(self.steps, s["lr"], s["warmup_steps"], s["schedule"], s["total_steps"], s["min_lr"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._ds.step()
        applied = bool(self._ds.was_step_applied())  # host value DeepSpeed already synced for its own decision
        norm = self._ds.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).to(self.device)
        flags = torch.stack([self._loss_nonfinite.to(torch.float32),
                             torch.tensor(0.0 if applied else 1.0, device=self.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank reports the same bits
        bits = (flags[0] * NONFINITE_LOSS + flags[1] * NONFINITE_GRAD_NORM).to(torch.int64)
        self._applied = torch.tensor(1.0 if applied else 0.0, device=self.device)
        self._buffer_guard.settle(torch.tensor(not applied, device=self.device))
        self._loss_nonfinite = torch.zeros_like(self._loss_nonfinite)
        self.steps += 1
        self._micro = 0
        return {"grad_norm": norm, "lr": lr, "nonfinite": bits}

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """No parameter of this engine gets a gradient from graphs built inside the block, and :attr:`module` is the
        bare module (no DeepSpeed output hooks, so the *other* engine's backward does not run this engine's
        prologue or loss scaling). ZeRO-3 still gathers the parameters for the forward and, in that backward, for
        the input gradients; it reduces nothing. Used for D(x_hat) in the generator loss (REPA-E style)."""
        self._frozen_depth += 1
        try:
            with requires_grad_off(self.inner.parameters()):
                yield
        finally:
            self._frozen_depth -= 1

    # ------------------------------------------------------------------------------------------------------
    # EMA
    def _local_fp32(self, p: nn.Parameter) -> torch.Tensor:
        """This rank's partition of the fp32 master weight (flat, length = partition size incl. padding); for a
        parameter that is not trained (``requires_grad`` off at build, e.g. a frozen VAE) its ZeRO-3 partition."""
        from deepspeed.utils import safe_get_local_fp32_param

        if self._frozen_depth:
            raise RuntimeError(f"{self.role} engine: weights/state accessed inside frozen()")
        if self._names[id(p)] not in self._trainable:
            return p.ds_tensor.data.view(-1).float()
        return safe_get_local_fp32_param(p).view(-1)

    @torch.no_grad()
    def ema_update(self) -> None:
        """``ema <- d_n * ema + (1 - d_n) * theta`` on this rank's partitions only (fp32; method §8, EMA 0.9999), d_n
        with the warm-up of :func:`simflow.parallel.engine.ema_decay_at` (n = ``steps - 1``, after :meth:`step`);
        after a skipped step the weight is 0 and the EMA stays as it was (see :meth:`step`)."""
        d = ema_decay_at(max(self.steps - 1, 0), self.ema_decay)
        weight = self._applied * (1.0 - d)
        for name, e in self.ema.items():
            e.lerp_(self._local_fp32(self._params[name]), weight)

    # ------------------------------------------------------------------------------------------------------
    # gather / scatter helpers (collectives over DP and TP)
    def _gather_full(self, p: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        """Full tensor (shape of the TP=1 parameter, fp32, CPU) from this rank's flat ZeRO-3 partition ``local``."""
        part = int(p.ds_tensor.ds_numel)
        buf = torch.zeros(part, dtype=torch.float32, device=self.device)
        buf[: local.numel()] = local.to(self.device, torch.float32)
        if self.dp_size > 1:
            pieces = [torch.empty_like(buf) for _ in range(self.dp_size)]
            dist.all_gather(pieces, buf, group=self.dp_group)
            flat = torch.cat(pieces)
        else:
            flat = buf
        t = flat[: p.ds_numel].view(p.ds_shape)
        dim = tp_partition_dim(p)
        if dim is not None and self.tp_size > 1:
            slices = [torch.empty_like(t) for _ in range(self.tp_size)]
            dist.all_gather(slices, t.contiguous(), group=self.tp_group)
            t = torch.cat(slices, dim=dim)
        return t.detach().cpu().clone()

    def _full_shape(self, p: nn.Parameter) -> List[int]:
        """Shape of ``p`` in the plain (TP=1) model."""
        dim = tp_partition_dim(p)
        want = list(p.ds_shape)
        if dim is not None and self.tp_size > 1:
            want[dim] *= self.tp_size
        return want

    def _check_shape(self, p: nn.Parameter, full: torch.Tensor, name: str) -> None:
        want = self._full_shape(p)
        if list(full.shape) != want:
            raise ValueError(f"{self.role} state: {name!r} has shape {list(full.shape)}, this model needs {want}")

    def _local_from_full(self, p: nn.Parameter, full: torch.Tensor, name: str) -> torch.Tensor:
        """This rank's flat ZeRO-3 partition (fp32, padded with zeros) of a full tensor; checks the shape."""
        self._check_shape(p, full, name)
        dim = tp_partition_dim(p)
        t = full
        if dim is not None and self.tp_size > 1:
            t = t.chunk(self.tp_size, dim=dim)[self.tp_rank]
        flat = t.reshape(-1).to(torch.float32)
        part = int(p.ds_tensor.ds_numel)
        start = self.dp_rank * part
        piece = flat[start : start + part]
        out = torch.zeros(part, dtype=torch.float32)
        out[: piece.numel()] = piece
        return out.to(self.device)

    def _sync_compute_partition(self, p: nn.Parameter) -> None:
        """Copy the fp32 master partition into the parameter's ZeRO-3 partition (the tensor forward gathers)."""
        p.ds_tensor.data.copy_(self._local_fp32(p)[: p.ds_tensor.numel()].view_as(p.ds_tensor).to(p.ds_tensor.dtype))

    def _flat_partitions(self) -> List[torch.Tensor]:
        """The flat fp32 master partitions the client AdamW steps (ZeRO-3 puts each into a param group only for
        the duration of ``optimizer.step()``; its state is keyed by these tensors)."""
        return list(self._ds.optimizer.fp32_partitioned_groups_flat)

    def _adam_state(self) -> Dict:
        """Return the client AdamW's per-flat-group state, creating it (zeros, step 0) if no step was taken yet."""
        for flat in self._flat_partitions():
            st = self.optimizer.state[flat]
            if "exp_avg" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32, device=flat.device)  # fused AdamW: on device
                st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        return self.optimizer.state

    # ------------------------------------------------------------------------------------------------------
    # state
    def _buffers(self) -> Dict[str, torch.Tensor]:
        return {k: b.detach().cpu().clone() for k, b in self.inner.named_buffers() if b is not None}

    def state_dict(self) -> Dict:
        """Topology-free training state, identical on every rank (collective; all tensors fp32 on CPU):

        ``module``: full parameters (TP slices merged) + buffers, keys as in the plain module's ``state_dict``;
        ``optimizer``: ``torch.optim.AdamW.state_dict()`` layout (state indexed by the order of the trainable
        parameters in ``module.parameters()``, full ``exp_avg``/``exp_avg_sq``, scalar ``step``); ``ema``: full EMA tensors;
        ``steps``: optimizer steps. Same layout as :class:`~simflow.parallel.engine.LocalEngine`.
        """
        from deepspeed.utils import safe_get_local_optimizer_state

        have_state = any("exp_avg" in self.optimizer.state.get(f, {}) for f in self._flat_partitions())
        # AdamW's own (bias-correction) step count: behind ``steps`` by the number of skipped steps
        adam_step = max((float(self.optimizer.state[f]["step"]) for f in self._flat_partitions()
                         if "step" in self.optimizer.state.get(f, {})), default=float(self.steps))
        module_sd: Dict[str, torch.Tensor] = {}
        opt_state: Dict[int, Dict[str, torch.Tensor]] = {}
        ema_sd: Dict[str, torch.Tensor] = {}
        for name, p in self._params.items():
            module_sd[name] = self._gather_full(p, self._local_fp32(p))
            i = self._trainable.get(name)
            if have_state and i is not None:
                opt_state[i] = {"step": torch.tensor(adam_step)}
                for k in ADAM_KEYS:
                    opt_state[i][k] = self._gather_full(p, safe_get_local_optimizer_state(p, k).view(-1))
            if name in self.ema:
                ema_sd[name] = self._gather_full(p, self.ema[name])
        module_sd.update(self._buffers())
        g = self.optimizer.param_groups[0]
        group = {k: v for k, v in g.items() if k != "params"}
        group["params"] = list(range(len(self._trainable)))
        return {
            "module": module_sd,
            "optimizer": {"state": opt_state, "param_groups": [group]},
            "ema": ema_sd,
            "steps": self.steps,
        }

    @torch.no_grad()
    def load_state_dict(self, sd: Dict) -> None:
        """Load a state written by :meth:`state_dict` or by ``LocalEngine.state_dict`` at any TP/DP layout.

        Raises:
            KeyError / ValueError: a parameter is missing, unexpected, or has another shape (names the key).
        """
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        msd = sd["module"]
        missing = [n for n in self._params if n not in msd]
        extra = [k for k in msd if k not in self._params and k not in dict(self.inner.named_buffers())
                 and not k.endswith("_extra_state")]
        if missing or extra:
            raise KeyError(f"{self.role} state: missing parameters {missing[:5]}, unexpected keys {extra[:5]}")
        ostate = sd.get("optimizer", {}).get("state", {})
        ema_sd = sd.get("ema", {})
        for k in ema_sd:
            if k not in self.ema:
                raise KeyError(f"{self.role} state: checkpoint has an EMA entry {k!r} that this model does not track")
        for name, p in self._params.items():  # check everything before changing anything
            self._check_shape(p, msd[name], name)
            if name in self.ema:
                if name not in ema_sd:
                    raise KeyError(f"{self.role} state: no EMA entry for {name!r}")
                self._check_shape(p, ema_sd[name], f"ema.{name}")
            i = self._trainable.get(name)
            st = None if i is None else ostate.get(i, ostate.get(str(i)))
            for k in ADAM_KEYS if st is not None else ():
                self._check_shape(p, st[k], f"optimizer.state.{i}.{k} ({name})")
        if ostate:
            self._adam_state()
        for name, p in self._params.items():
            local = self._local_from_full(p, msd[name], name)
            i = self._trainable.get(name)
            if i is None:  # not trained: only the ZeRO-3 partition exists
                p.ds_tensor.data.copy_(local[: p.ds_tensor.numel()].view_as(p.ds_tensor).to(p.ds_tensor.dtype))
            else:
                safe_set_local_fp32_param(p, local)
                self._sync_compute_partition(p)
            st = None if i is None else ostate.get(i, ostate.get(str(i)))
            if st is not None:
                for k in ADAM_KEYS:
                    safe_set_local_optimizer_state(p, self._local_from_full(p, st[k], f"optimizer.{i}.{k}"), k)
            elif i is not None and ostate:  # torch's AdamW has no state for a parameter that never had a gradient
                zeros = torch.zeros(int(p.ds_tensor.ds_numel), dtype=torch.float32, device=self.device)
                for k in ADAM_KEYS:
                    safe_set_local_optimizer_state(p, zeros, k)
            if name in self.ema:
                self.ema[name].copy_(self._local_from_full(p, ema_sd[name], f"ema.{name}"))
        for k, b in self.inner.named_buffers():
            if k in msd and b is not None:
                b.copy_(msd[k].to(b.device, b.dtype))
        self.steps = int(sd["steps"])
        if ostate:  # AdamW's bias-correction step (fewer than ``steps`` when steps were skipped)
            adam_step = max(float(st["step"]) for st in ostate.values() if "step" in st)
            for flat in self._flat_partitions():
                self.optimizer.state[flat]["step"] = torch.tensor(adam_step, dtype=torch.float32, device=flat.device)
        self._ds.global_steps = self.steps
        self._ds.micro_steps = self.steps * self.grad_accumulation
        self._buffer_guard.snapshot()
        self._micro = 0
        s = self._sched
        lr = lr_at(self.steps, s["lr"], s["warmup_steps"], s["schedule"], s["total_steps"], s["min_lr"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    # ------------------------------------------------------------------------------------------------------
    # sharded state (checkpoints): this rank's partitions only, never gathered
    def _shard(self, p: nn.Parameter, flat: torch.Tensor):
        """``flat`` (this rank's ZeRO-3 partition of ``p`` or of its moment/EMA) as chunks of the full tensor."""
        from simflow.checkpoint.sharded import FlatShard, zero3_range

        n_local, part = int(p.ds_numel), int(p.ds_tensor.ds_numel)
        if part != -(-n_local // self.dp_size):
            raise RuntimeError(f"{self.role} engine: {self._names[id(p)]!r} has a ZeRO-3 partition of {part} "
                               f"elements, expected ceil({n_local}/{self.dp_size}); unknown DeepSpeed partitioning")
        start, stop = zero3_range(n_local, self.dp_rank, self.dp_size)
        dim = tp_partition_dim(p) if self.tp_size > 1 else None
        return FlatShard.wrap(flat, self._full_shape(p), dim, self.tp_rank, self.tp_size, start, stop)

    def sharded_state(self) -> Tuple[Dict[str, torch.Tensor], Dict]:
        """CPU copies of this rank's ZeRO-3 partitions of the fp32 weights, both AdamW moments and the EMA, as
        chunks of the full tensors (:class:`~simflow.checkpoint.sharded.FlatShard`); buffers (e.g. BatchNorm
        running statistics, which differ per DP rank) are taken from DP rank 0 / TP rank 0 only, so the saved state
        does not depend on which rank writes what. Extra memory: this rank's share (~1/DP of the state)."""
        from deepspeed.utils import safe_get_local_optimizer_state

        have_state = any("exp_avg" in self.optimizer.state.get(f, {}) for f in self._flat_partitions())
        cpu = torch.device("cpu")
        out: Dict[str, torch.Tensor] = {}
        for name, p in self._params.items():
            out[f"module/{name}"] = self._shard(p, self._local_fp32(p).detach().to(cpu, torch.float32, copy=True))
            if have_state and name in self._trainable:
                for k in ADAM_KEYS:
                    local = safe_get_local_optimizer_state(p, k).view(-1)
                    out[f"optim/{name}/{k}"] = self._shard(p, local.detach().to(cpu, torch.float32, copy=True))
            if name in self.ema:
                out[f"ema/{name}"] = self._shard(p, self.ema[name].detach().to(cpu, torch.float32, copy=True))
        if self.dp_rank == 0 and self.tp_rank == 0:
            out.update({f"module/{k}": b.detach().to(cpu, copy=True) for k, b in self.inner.named_buffers()
                        if b is not None})
        g = self.optimizer.param_groups[0]
        return out, {"steps": self.steps, "optim_step": {n: self.steps for n in self._trainable} if have_state else {},
                     "ema": sorted(self.ema),
                     "param_group": {k: v for k, v in g.items() if isinstance(v, (int, float, str, bool))}}

    def load_targets(self, meta: Dict) -> Dict[str, torch.Tensor]:
        """Zeroed partition-sized buffers (as FlatShards of this rank's chunks at the *current* TP/DP layout) for
        every parameter, its moments (when the checkpoint has them) and its EMA, and full buffers."""
        def zeros(p: nn.Parameter) -> torch.Tensor:
            return self._shard(p, torch.zeros(int(p.ds_tensor.ds_numel), dtype=torch.float32))

        out = sharded_load_targets(self.role, meta, self._params, list(self._trainable), list(self.ema), zeros)
        if self.dp_rank == 0 and self.tp_rank == 0:  # the others receive them by broadcast (apply_loaded)
            out.update({f"module/{k}": torch.zeros_like(b, device="cpu") for k, b in self.inner.named_buffers()
                        if b is not None})
        return out

    @torch.no_grad()
    def apply_loaded(self, tensors: Dict[str, torch.Tensor], meta: Dict) -> None:
        """Copy the loaded partitions into the fp32 master weights, ZeRO-3 partitions, AdamW state and EMA; set the
        step counts and the LR. Parameters without saved moments get zero moments (torch's AdamW has no state for a
        parameter that never had a gradient)."""
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        def local(key: str) -> torch.Tensor:
            return tensors[key].as_subclass(torch.Tensor).to(self.device)

        ostate = meta.get("optim_step", {})
        if ostate:
            self._adam_state()
        for name, p in self._params.items():
            w = local(f"module/{name}")
            i = self._trainable.get(name)
            if i is None:  # not trained: only the ZeRO-3 partition exists
                p.ds_tensor.data.copy_(w[: p.ds_tensor.numel()].view_as(p.ds_tensor).to(p.ds_tensor.dtype))
            else:
                safe_set_local_fp32_param(p, w)
                self._sync_compute_partition(p)
            if name in ostate:
                for k in ADAM_KEYS:
                    safe_set_local_optimizer_state(p, local(f"optim/{name}/{k}"), k)
            elif i is not None and ostate:
                zeros = torch.zeros(int(p.ds_tensor.ds_numel), dtype=torch.float32, device=self.device)
                for k in ADAM_KEYS:
                    safe_set_local_optimizer_state(p, zeros, k)
            if name in self.ema:
                self.ema[name].copy_(local(f"ema/{name}"))
        for k, b in self.inner.named_buffers():
            if b is not None and f"module/{k}" in tensors:
                b.copy_(tensors[f"module/{k}"].to(b.device, b.dtype))
        # buffers were read by DP rank 0 / TP rank 0 only (so no rank reads another rank's file for them at the
        # same layout): send them down its TP group, then down every DP group
        for group, size, first in ((self.tp_group, self.tp_size, self.dp_rank == 0), (self.dp_group, self.dp_size, True)):
            if size > 1 and first:
                for _, b in self.inner.named_buffers():
                    if b is not None:
                        dist.broadcast(b.data, src=dist.get_global_rank(group, 0), group=group)
        self.steps = int(meta["steps"])
        if ostate:
            for flat in self._flat_partitions():
                self.optimizer.state[flat]["step"] = torch.tensor(float(self.steps), dtype=torch.float32)
        self._ds.global_steps = self.steps
        self._ds.micro_steps = self.steps * self.grad_accumulation
        self._micro = 0
        s = self._sched
        lr = lr_at(self.steps, s["lr"], s["warmup_steps"], s["schedule"], s["total_steps"], s["min_lr"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._buffer_guard.snapshot()

    def full_state_dict(self, ema: bool = True) -> Dict[str, torch.Tensor]:
        """Full fp32 weights on CPU, keys of the plain (TP=1) module: parameters (EMA values for tracked ones when
        ``ema``) and floating buffers. Collective: every rank calls it and gets the same dict."""
        out: Dict[str, torch.Tensor] = {}
        for name, p in self._params.items():
            src = self.ema[name] if (ema and name in self.ema) else self._local_fp32(p)
            out[name] = self._gather_full(p, src)
        for k, b in self._buffers().items():
            if b.is_floating_point():
                out[k] = b.float()
        return out

    def full_tensor_specs(self, ema: bool = True) -> List[Tuple[str, List[int], torch.dtype]]:
        """``[(name, full shape, dtype)]`` of what :meth:`iter_full_state` yields, in its order."""
        out = [(name, self._full_shape(p), torch.float32) for name, p in self._params.items()]
        out += [(k, list(b.shape), torch.float32) for k, b in self.inner.named_buffers()
                if b is not None and b.is_floating_point()]
        return out

    def iter_full_state(self, ema: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        """:meth:`full_state_dict`, one tensor at a time (collective per parameter: every rank iterates fully)."""
        for name, p in self._params.items():
            src = self.ema[name] if (ema and name in self.ema) else self._local_fp32(p)
            yield name, self._gather_full(p, src)
        for k, b in self.inner.named_buffers():
            if b is not None and b.is_floating_point():
                yield k, b.detach().float().cpu()

    @contextlib.contextmanager
    def full_params(self, ema: bool = True) -> Iterator[nn.Module]:
        """Run the bare module with all parameters gathered (EMA values for tracked ones when ``ema``); yields the
        module. Collective (every rank enters). Restores the training weights and partitions on exit. Use under
        ``torch.no_grad()`` (sampling, evaluation)."""
        import deepspeed

        GatheredParameters = deepspeed.zero.GatheredParameters

        backup: Dict[str, torch.Tensor] = {}
        if ema:
            for name, e in self.ema.items():
                p = self._params[name]
                backup[name] = p.ds_tensor.data.clone()
                p.ds_tensor.data.copy_(e[: p.ds_tensor.numel()].view_as(p.ds_tensor).to(p.ds_tensor.dtype))
        params = list(self._params.values())
        try:
            with GatheredParameters(params, modifier_rank=None):
                # ZeRO-3's module hooks release a module's parameters after its forward unless they are marked as
                # external; keep everything resident for the whole block (e.g. KV-cached sampling).
                saved = [(p, getattr(p, "is_external_param", False)) for p in params]
                for p in params:
                    p.is_external_param = True
                try:
                    yield self.inner
                finally:
                    for p, flag in saved:
                        p.is_external_param = flag
        finally:
            for name, b in backup.items():
                self._params[name].ds_tensor.data.copy_(b)

    # ------------------------------------------------------------------------------------------------------
    # introspection
    def local_numel(self) -> int:
        """Parameter elements held by this rank (its ZeRO-3 partitions, padding included)."""
        return sum(int(p.ds_tensor.ds_numel) for p in self._params.values())

    def local_optimizer_numel(self) -> int:
        """Optimizer-state elements held by this rank (fp32 master + AdamW moments of its partitions)."""
        n = 0
        for flat in self._flat_partitions():
            n += flat.numel()
            for v in self.optimizer.state.get(flat, {}).values():
                if torch.is_tensor(v) and v.dim() > 0:
                    n += v.numel()
        return n

    def full_numel(self) -> int:
        """Parameter elements of the whole model (all TP slices, unpartitioned)."""
        n = 0
        for p in self._params.values():
            n += int(p.ds_numel) * (self.tp_size if tp_partition_dim(p) is not None else 1)
        return n


__all__ = [
    "DeepSpeedEngine",
    "deepspeed_config",
    "init_on_gathered_params",
    "register_orphan_parameters",
    "uses_bf16",
]
