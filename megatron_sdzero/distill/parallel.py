"""Who does what across ranks in the distillation loop.

Each data-parallel replica of the model (one model-parallel group: its TP x PP ranks) owns one
rollout engine, on its first rank (TP rank 0 of pipeline stage 0, the lowest global rank of the
group). That rank samples and grades its replica's share of the prompts and hands the results to
the other ranks of its group; every rank of a group must see the same batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def mp_group():
    from megatron.core import parallel_state

    return parallel_state.get_model_parallel_group()


def is_engine_rank() -> bool:
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_pipeline_model_parallel_rank() == 0
    )


def dp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def is_writer_rank() -> bool:
    """The one rank of the job that writes shared files (the engine rank of replica 0)."""
    return is_engine_rank() and dp_rank_and_size()[0] == 0


def broadcast_in_mp_group(obj: Any) -> Any:
    """``obj`` from the group's engine rank to every rank of its model-parallel group."""
    group = mp_group()
    if dist.get_world_size(group) == 1:
        return obj
    payload = [obj]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group, device=_device())
    return payload[0]


def all_reduce_max(value: float) -> float:
    tensor = torch.tensor(value, dtype=torch.float64, device=_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
