"""The global numbers of one on-policy step: sums over data-parallel replicas, maxima over ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_sdzero.distill.batch import DistillBatch


def device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def sequence_lengths(index: torch.Tensor | None, mask: torch.Tensor) -> list[int]:
    """Each row's sequence length without padding (up to the token after its last aligned position)."""
    if index is None:
        return []
    used = mask.sum(1)
    last = index.gather(1, (used - 1).clamp(min=0)[:, None])[:, 0] + 2
    return torch.where(used > 0, last, torch.ones_like(last)).tolist()


def global_lengths(index: torch.Tensor | None, mask: torch.Tensor) -> list[int]:
    gathered: list[Any] = [None] * dist.get_world_size(dp_group())
    dist.all_gather_object(gathered, sequence_lengths(index, mask), group=dp_group())
    return [n for part in gathered for n in part]


def global_max(**values: float) -> dict[str, float]:
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return dict(zip(values, tensor.tolist(), strict=True))


def global_sum(values: dict[str, float]) -> dict[str, float]:
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device())
    dist.all_reduce(tensor, group=dp_group())
    return dict(zip(values, tensor.tolist(), strict=True))


def batch_sums(batch: DistillBatch, extra: dict[str, float]) -> dict[str, float]:
    """Sums over the replicas' batches (placeholder rows of an empty replica have no response)."""
    real = batch.response_lengths > 0
    lengths = batch.response_lengths.float()
    values = {
        "samples": float(real.sum()),
        "reward": float((batch.rewards * real).sum()),
        "response_tokens": float(lengths.sum()),
        "truncated": float((batch.truncated & real).sum()),
        "zero_weight": float(((batch.sample_weights == 0) & real).sum()),
        "trained": float(((batch.sample_weights != 0) & real).sum()),
        "student_tokens": float(sum(sequence_lengths(batch.student_index, batch.loss_mask))),
        "teacher_tokens": float(sum(sequence_lengths(batch.teacher_index, batch.loss_mask))),
        **extra,
    }
    sums = global_sum(values)
    sums["response_max"] = global_max(response_max=float(lengths.max()))["response_max"]
    return sums
