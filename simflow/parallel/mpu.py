"""DeepSpeed's model-parallel-unit (``mpu``) interface over the topology's process groups.

DeepSpeed asks an ``mpu`` object for the old Megatron-LM API (``get_model_parallel_*``, ``get_data_parallel_*``);
megatron-core only offers ``get_tensor_model_parallel_*`` and friends, so ``deepspeed.initialize(mpu=parallel_state)``
fails (``no attribute get_model_parallel_world_size``). This adapter answers it from two explicit groups: the
tensor-parallel group (megatron-core's at TP > 1, this rank alone at TP = 1) and the data-parallel group
(megatron-core's, or the world). With pipeline parallelism fixed at 1, "model parallel" is exactly "tensor
parallel", and the pipeline group is this rank alone.

DeepSpeed uses it to: partition ZeRO-3 parameters over the data-parallel group only (each TP rank keeps its own
slice of TP-split weights), reduce gradients over the data-parallel group, and count replicated parameters once in
the gradient norm (only on TP rank 0, then summed over the TP group). An mpu is passed at TP = 1 too: without one,
DeepSpeed falls back to a clone of the world group that it caches until its own ``destroy_process_group`` (torch's,
which :func:`~simflow.parallel.topology.destroy_topology` calls, leaves it), so it is stale once a process starts a
second process group (two trainers in one process, e.g. the tests).

It deliberately has no ``initialize_sequence_parallel`` attribute: DeepSpeed treats an ``mpu`` with that method as
an Ulysses sequence-parallel unit.
"""

from __future__ import annotations

from typing import List

import torch.distributed as dist


class DeepSpeedMPU:
    """Adapter object over ``tp_group`` and ``dp_group`` (``torch.distributed`` process groups; see the module
    docstring); ``pp_group`` is the one-rank pipeline group (default: ``tp_group``, which is that at TP = 1)."""

    def __init__(self, tp_group, dp_group, pp_group=None):
        self.tp_group, self.dp_group = tp_group, dp_group
        self.pp_group = tp_group if pp_group is None else pp_group

    @classmethod
    def from_megatron(cls) -> "DeepSpeedMPU":
        """The groups of megatron-core's current ``parallel_state`` (initialise it first)."""
        from megatron.core import parallel_state as ps

        return cls(ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group(),
                   ps.get_pipeline_model_parallel_group())

    # model parallel == tensor parallel (no pipeline parallelism)
    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.tp_group)

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self.tp_group, 0)

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank
    get_slice_parallel_rank = get_model_parallel_rank
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.dp_group)

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> List[int]:
        return dist.get_process_group_ranks(self.dp_group)

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self):
        return self.pp_group

    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group

    def __repr__(self) -> str:
        return (f"DeepSpeedMPU(tp={self.get_tensor_model_parallel_world_size()}, "
                f"dp={self.get_data_parallel_world_size()})")


__all__ = ["DeepSpeedMPU"]
