"""Tensor-parallel plumbing for the vocab-parallel losses: the group, the shard's vocab range, and
the few collectives the losses need (all on small per-token tensors, never on the vocab dimension).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


@functools.cache
def _megatron_parallel_state() -> ModuleType | None:
    try:
        from megatron.core import parallel_state
    except ImportError:  # a bare GPU image without megatron-core: single process unless told otherwise
        return None
    return parallel_state


def default_tp_group() -> ProcessGroup | None:
    """Megatron's tensor-parallel group when model parallelism is initialised, else None."""
    parallel_state = _megatron_parallel_state()
    if parallel_state is None:
        return None
    if dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class VocabShard:
    """Which global vocabulary ids this rank's logit columns hold.

    Column j of the shard is global id ``start + j``. Ids at or above ``valid_vocab_size`` are
    Megatron's padding rows: they take part in neither distribution.
    """

    start: int
    size: int
    valid_vocab_size: int
    group: ProcessGroup | None

    @property
    def valid_columns(self) -> int:
        """Number of leading columns of this shard that are real vocabulary ids."""
        return max(0, min(self.size, self.valid_vocab_size - self.start))

    @property
    def tp_size(self) -> int:
        return group_size(self.group)

    def owns(self, global_ids: torch.Tensor) -> torch.Tensor:
        return (global_ids >= self.start) & (global_ids < self.start + self.size)


def make_vocab_shard(
    shard_size: int, vocab_start: int | None, valid_vocab_size: int | None, group: ProcessGroup | None
) -> VocabShard:
    """Fill in Megatron's even vocab split where the caller did not say otherwise."""
    tp_size, rank = group_size(group), group_rank(group)
    start = rank * shard_size if vocab_start is None else vocab_start
    valid = shard_size * tp_size if valid_vocab_size is None else valid_vocab_size
    if valid < 1:
        raise ValueError(f"valid_vocab_size must be positive, got {valid}")
    return VocabShard(start=start, size=shard_size, valid_vocab_size=valid, group=group)


def all_reduce_max_(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's tensor along the last dimension, in rank order."""
    if group_size(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(group_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
