"""``parallelize_simflow``: DTensor tensor parallelism + FSDP2 applied to a *built*, plain SimFlow module (torchtitan's
``parallelize_llama`` role), for :class:`~simflow.parallel.fsdp2_engine.FSDP2Engine`.

The model is built with the dense linear factory (no megatron hints are used); everything below happens afterwards,
from outside the model code, in a fixed order:

1. **Tensor parallelism** over the ``"tp"`` dimension of a 2-D ``(dp, tp)`` device mesh, per flow
   :class:`~simflow.models.flow.TransformerLayer` (Megatron-LM's split, arXiv 1909.08053 §3):
   ``attn.qkv`` and ``mlp.up`` column-parallel (``ColwiseParallel``: weight ``Shard(0)``, output = this rank's
   features), ``attn.out`` and ``mlp.down`` row-parallel (``RowwiseParallel``: weight ``Shard(1)``, the partial
   outputs are summed over TP, bias replicated). The fused QKV weight is **head-interleaved** (rows ``[q_h, k_h,
   v_h]`` per head h, :func:`simflow.models.flow.fuse_qkv`), so a contiguous ``Shard(0)`` split of its ``3 D`` rows
   hands each TP rank ``heads / tp`` whole heads with their q, k and v; the attention module infers its local head
   count from the local output width. Everything else (adaLN, embeddings, heads, the VAE, the discriminator) stays
   replicated over TP. Parameter names and full shapes do not change.
2. **Activation checkpointing / torch.compile** (``train.activation_checkpointing`` / ``train.compile``), the
   appliers of :mod:`simflow.parallel.parallelize`, in place.
3. **FSDP2** (``fully_shard``) over the ``"dp"`` dimension: one group per flow transformer layer, per VAE stage
   (each encoder down level, the encoder and decoder middles, each decoder up level), then the root (the rest:
   embeddings, heads, VAE in/out convolutions). Parameters become DTensors sharded ``Shard(0)`` over DP (on top of
   the TP placement for TP-split weights). Every group reshards after forward, the root included, so that the
   parameters a frozen module (:meth:`FSDP2Engine.frozen`) sees are re-created, with their ``requires_grad``, at
   every gather. Mixed precision: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` on CUDA under bf16
   (fp32 sharded master weights, bf16 gathers and compute, fp32 gradient reduction); fp32 throughout otherwise.
4. **Sampling entry points**: the root's :data:`SAMPLING_METHODS` (``SimFlowModel.sample``,
   ``TransformerFlow.inverse``) are registered with ``register_fsdp_forward_method``, so they run the root's FSDP2
   pre/post-forward hooks as ``forward`` does. Sampling calls each layer once per token, outside the root's
   ``forward``; without this, the first layer to run would make itself an FSDP2 root (FSDP2 takes the first module
   to run forward as the root) and a later training forward through the real root would fail.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from simflow.config import SimFlowConfig
from simflow.parallel.parallelize import parallelize

# module-path suffix inside a TransformerLayer -> its TP style (Megatron column / row split)
TP_PLAN = {
    "attn.qkv": ColwiseParallel,
    "attn.out": RowwiseParallel,
    "mlp.up": ColwiseParallel,
    "mlp.down": RowwiseParallel,
}

# methods of the root module that run its sub-modules outside ``forward`` (module docstring, item 4)
SAMPLING_METHODS = ("sample", "inverse")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> int:
    """Apply :data:`TP_PLAN` to every flow ``TransformerLayer`` in ``model`` over the 1-D ``tp_mesh``.

    Returns the number of layers parallelised. Raises ValueError (naming the layer) when a layer's head count or MLP
    width does not divide by the TP size.
    """
    from simflow.models.flow import TransformerLayer

    tp = tp_mesh.size()
    n = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, TransformerLayer):
            continue
        heads = layer.attn.qkv.out_features // (3 * layer.attn.head_dim)
        if heads % tp or layer.mlp.up.out_features % tp:
            raise ValueError(f"{name}: {heads} attention heads / MLP width {layer.mlp.up.out_features} cannot be "
                             f"split over tensor-parallel size {tp} (parallel.tp_size)")
        parallelize_module(layer, tp_mesh, {k: style() for k, style in TP_PLAN.items()})
        n += 1
    return n


def fsdp_units(model: nn.Module) -> List[nn.Module]:
    """The sub-modules that get their own FSDP2 group, bottom-up (the root is not included): every flow
    ``TransformerLayer`` and every VAE stage (encoder ``down[i]`` and ``mid``, decoder ``mid`` and ``up[i]``)."""
    from simflow.models.flow import TransformerLayer
    from simflow.models.vae import VAE

    units: List[nn.Module] = []
    for m in model.modules():
        if isinstance(m, TransformerLayer):
            units.append(m)
        elif isinstance(m, VAE):
            units += [*m.encoder.down, m.encoder.mid, m.decoder.mid, *m.decoder.up]
    return units


def mixed_precision(bf16: bool, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters with fp32 gradient reduction on CUDA under bf16; no casting (fp32) otherwise (on CPU the
    trainer's autocast alone decides the compute dtype, as with the other engines).

    ``cast_forward_inputs=False``: FSDP2 would otherwise cast every floating input of every group's forward to bf16,
    i.e. the posterior noise at the root (the latent ``z = mu + 0.5 eps`` is formed in fp32) and the flow's residual
    stream at each transformer layer; the trainer's autocast already runs the GEMMs in bf16 and keeps those in fp32,
    as under the other engines."""
    if bf16 and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def parallelize_simflow(model: nn.Module, mesh: DeviceMesh, cfg: SimFlowConfig, bf16: bool = False) -> nn.Module:
    """TP, then activation checkpointing / compile, then FSDP2, then the sampling entry points (module docstring), in
    place; returns ``model``.

    Args:
        model: the built plain module (generator or discriminator), already on ``mesh``'s device.
        mesh: 2-D device mesh with dimension names ``("dp", "tp")``.
        cfg: the config (``train.activation_checkpointing``, ``train.compile``).
        bf16: the run computes in bf16 (selects :func:`mixed_precision` on CUDA).
    """
    if mesh.mesh_dim_names != ("dp", "tp"):
        raise ValueError(f"parallelize_simflow needs a ('dp', 'tp') device mesh, got {mesh.mesh_dim_names}")
    if mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    parallelize(model, cfg.train)
    mp = mixed_precision(bf16, torch.device(mesh.device_type))
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh["dp"], mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh["dp"], mp_policy=mp, reshard_after_forward=True)
    for name in SAMPLING_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def fsdp_modules(model: nn.Module) -> List[FSDPModule]:
    """Every FSDP2 module in ``model`` (root first)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


__all__ = ["SAMPLING_METHODS", "TP_PLAN", "apply_tensor_parallel", "fsdp_modules", "fsdp_units", "mixed_precision",
           "parallelize_simflow"]
