"""DeepSpeed's model-parallel-unit (``mpu``) interface, served from megatron-core ``parallel_state``.

DeepSpeed asks an ``mpu`` object for the old Megatron-LM API (``get_model_parallel_*``, ``get_data_parallel_*``);
megatron-core only offers ``get_tensor_model_parallel_*`` and friends, so ``deepspeed.initialize(mpu=parallel_state)``
fails (``no attribute get_model_parallel_world_size``). This adapter maps one onto the other. With pipeline
parallelism fixed at 1, "model parallel" is exactly "tensor parallel".

DeepSpeed uses it to: partition ZeRO-3 parameters over the data-parallel group only (each TP rank keeps its own
slice of TP-split weights), reduce gradients over the data-parallel group, and count replicated parameters once in
the gradient norm (only on TP rank 0, then summed over the TP group).

It deliberately has no ``initialize_sequence_parallel`` attribute: DeepSpeed treats an ``mpu`` with that method as
an Ulysses sequence-parallel unit.
"""

from __future__ import annotations

from typing import List

from megatron.core import parallel_state as ps


class MegatronMPU:
    """Adapter object; all methods read megatron-core's current ``parallel_state`` (initialise it first)."""

    # model parallel == tensor parallel (no pipeline parallelism)
    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> List[int]:
        import torch.distributed as dist

        return dist.get_process_group_ranks(ps.get_data_parallel_group())

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_pipe_parallel_world_size(self) -> int:
        return 1

    def get_pipe_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_slice_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_slice_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_slice_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def __repr__(self) -> str:
        return (
            f"MegatronMPU(tp={self.get_tensor_model_parallel_world_size()}, "
            f"dp={self.get_data_parallel_world_size()})"
        )


__all__ = ["MegatronMPU"]
