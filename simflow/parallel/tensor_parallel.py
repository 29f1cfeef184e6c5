"""Tensor parallelism for the flow transformer through the linear-layer factory seam (``simflow.models.layers``).

:class:`TensorParallelLinearFactory` returns megatron-core layers for the ``parallel`` hints the model gives:

* ``"column"`` -> :class:`ColumnParallelDense` (megatron ``ColumnParallelLinear``, ``gather_output=False``): the
  weight ``(out, in)`` is split on dim 0; the output holds this rank's ``out / tp`` features (q, k, v: this rank's
  heads; MLP up: this rank's hidden units). The input gradient is all-reduced over the TP group in backward.
* ``"row"`` -> :class:`RowParallelDense` (megatron ``RowParallelLinear``, ``input_is_parallel=True``): the weight is
  split on dim 1; partial outputs are all-reduced over the TP group and the (replicated) bias is added once.
* ``"none"`` -> :class:`~simflow.models.layers.DenseLinear` (replicated on every TP rank).

Both TP wrappers return a plain tensor (bias added), like ``nn.Linear``, and accept any number of leading
dimensions (megatron's kernels take 2-D or 3-D inputs; we flatten to 2-D and restore the shape).

Same initial weights whatever the TP size: megatron-core with ``use_cpu_initialization=True`` builds the *full*
fp32 master weight on every rank, applies ``init_method`` to it exactly once and keeps this rank's slice
(``_initialize_affine_weight_cpu``), and zeroes the bias; :class:`~simflow.models.layers.DenseLinear` applies the
same ``init_fn`` to its full weight exactly once. So, given the same seed, every layer consumes the CPU RNG
identically for TP = 1, 2, 4, ... and the concatenated slices equal the TP = 1 weight bit for bit.

Constraints (megatron-core 0.16 on CPU): no sequence parallelism (it needs Apex / Transformer Engine LayerNorm) and no
``gather_output=True`` (both allocate on ``torch.cuda.current_device()``), ``gradient_accumulation_fusion=False``
(a fused CUDA kernel); the TP group comes from megatron-core ``parallel_state``. Which dimension a parameter is
split along is read back by :func:`simflow.parallel.engine.tp_partition_dim`.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from simflow.models.layers import DenseLinear, InitFn, xavier_init


def _flat_call(layer_forward, x: torch.Tensor, out_features: int) -> torch.Tensor:
    lead = x.shape[:-1]
    y, bias = layer_forward(x.reshape(-1, x.shape[-1]))
    if bias is not None:  # only when skip_bias_add=True, which we never set
        y = y + bias
    return y.reshape(*lead, out_features)


class ColumnParallelDense(ColumnParallelLinear):
    """megatron-core ``ColumnParallelLinear`` returning a plain tensor.

    Shapes: ``(..., in_features)`` -> ``(..., out_features / tp)`` (this rank's slice of the output features).
    Parameters: ``weight`` ``(out / tp, in)`` with ``tensor_model_parallel=True, partition_dim=0``; ``bias`` ``(out / tp,)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _flat_call(super().forward, x, self.output_size_per_partition)


class RowParallelDense(RowParallelLinear):
    """megatron-core ``RowParallelLinear`` (``input_is_parallel=True``) returning a plain tensor, bias added.

    Shapes: ``(..., in_features / tp)`` (this rank's slice) -> ``(..., out_features)`` (complete, identical on all
    TP ranks). Parameters: ``weight`` ``(out, in / tp)`` with ``partition_dim=1``; ``bias`` ``(out,)`` replicated.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _flat_call(super().forward, x, self.output_size)


class TensorParallelLinearFactory:
    """Linear-layer factory for tensor parallelism (see module docstring).

    Args:
        tp_group: the tensor-parallel process group (default: megatron-core ``parallel_state``'s).
        params_dtype: parameter dtype (fp32 master weights; mixed precision is autocast's job).

    Attributes:
        tp_size: number of tensor-parallel ranks (1 gives plain dense layers for every hint).
        tp_rank: this rank's index in the TP group.
    """

    def __init__(self, tp_group=None, params_dtype: torch.dtype = torch.float32):
        if tp_group is None:
            if not parallel_state.model_parallel_is_initialized():
                raise RuntimeError(
                    "TensorParallelLinearFactory needs megatron-core parallel_state: call "
                    "simflow.parallel.topology.init_topology first"
                )
            tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_group = tp_group
        self.tp_size = torch.distributed.get_world_size(tp_group)
        self.tp_rank = torch.distributed.get_rank(tp_group)
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            use_cpu_initialization=True,
            perform_initialization=True,
            gradient_accumulation_fusion=False,
            sequence_parallel=False,
            params_dtype=params_dtype,
        )

    def __call__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        parallel: str = "none",
        init_fn: Optional[InitFn] = None,
    ) -> nn.Module:
        if parallel not in ("column", "row", "none"):
            raise ValueError(f"parallel must be 'column', 'row' or 'none', got {parallel!r}")
        init_fn = init_fn or xavier_init
        if parallel == "none" or self.tp_size == 1:
            return DenseLinear(in_features, out_features, bias=bias, init_fn=init_fn)
        if parallel == "column":
            if out_features % self.tp_size:
                raise ValueError(f"column-parallel layer: out_features={out_features} not divisible by TP={self.tp_size}")
            return ColumnParallelDense(
                in_features,
                out_features,
                config=self.config,
                init_method=init_fn,
                bias=bias,
                gather_output=False,
                tp_group=self.tp_group,
            )
        if in_features % self.tp_size:
            raise ValueError(f"row-parallel layer: in_features={in_features} not divisible by TP={self.tp_size}")
        return RowParallelDense(
            in_features,
            out_features,
            config=self.config,
            init_method=init_fn,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.tp_group,
        )


__all__ = ["TensorParallelLinearFactory", "ColumnParallelDense", "RowParallelDense"]
