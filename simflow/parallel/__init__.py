"""Parallel training: topology (process groups), the engine interface and engines, tensor-parallel layers.

Modules: :mod:`~simflow.parallel.engine` (interface, ``LocalEngine``), :mod:`~simflow.parallel.topology`
(torchrun/srun environment, process groups; megatron-core ``parallel_state`` for DeepSpeed with TP > 1 only),
:mod:`~simflow.parallel.mpu` (DeepSpeed's mpu over the TP/DP groups), :mod:`~simflow.parallel.tensor_parallel` (the TP linear-layer factory),
:mod:`~simflow.parallel.deepspeed_engine` (ZeRO-3 engine), :mod:`~simflow.parallel.fsdp2_engine` (FSDP2 + DTensor TP
engine) with :mod:`~simflow.parallel.fsdp2_parallelize` (its TP plan and ``fully_shard`` units),
:mod:`~simflow.parallel.factory` (``build_engine``).
Heavy dependencies (DeepSpeed, megatron-core) are imported by those modules only, not here.
"""

import warnings

# Known, harmless notices that would otherwise repeat on every rank (and, for the second, on every step):
# megatron-core runs without Apex / Transformer Engine by design (apex is not on PyPI and TE needs CUDA; megatron-core's
# local layers cover what we use), and DeepSpeed 0.19.8 calls the torch collectives that torch 2.14 marks as
# deprecated aliases.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
warnings.filterwarnings(
    "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning,
)
