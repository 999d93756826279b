"""One optimizer step through Megatron's pipeline schedules, with the non-finite-step policy.

The loss contract (Megatron's per-token loss, ``calculate_per_token_loss=True``): the loss
function that ``forward_step_func`` returns gives ``(loss_sum, num_tokens, logs)`` where

- ``loss_sum`` is the *sum* of the per-token loss over this micro-batch's valid tokens (the
  tensor that is backpropagated; ``masked_cross_entropy(..., reduction="sum")`` gives it),
- ``num_tokens`` is the number of valid tokens (an int tensor),
- ``logs`` maps names to 2-element float tensors ``[sum, count]`` (see :func:`loss_log`); it must
  hold ``"loss"``.

Megatron all-reduces the token counts and divides the gradients by the global count in
``finalize_model_grads``, so the step follows the gradient of the token-level mean over the whole
global batch, however it is split into micro-batches and data-parallel ranks. ``train_step``
reports each log as sum / count over the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_sdzero.training.config import NanPolicy


class NonFiniteStepError(RuntimeError):
    """A step produced a non-finite loss or gradient norm and the policy says stop."""


@dataclass
class StepResult:
    loss: float  # token-level mean over the global batch (NaN/inf if the step was bad)
    num_tokens: int  # valid (loss) tokens in the global batch
    grad_norm: float  # global L2 norm before clipping
    skipped: bool  # no update was applied (non-finite loss or gradient)
    lr: float  # learning rate used for this step
    logs: dict[str, float] = field(default_factory=dict)  # every logged quantity: sum / count


def loss_log(value_sum: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """A ``[sum, count]`` entry for the ``logs`` dict a loss function returns."""
    value_sum = value_sum.detach().float().reshape(1)
    count = torch.as_tensor(count, device=value_sum.device).float().reshape(1)
    return torch.cat([value_sum, count])


def _reduce_logs(losses: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sum the [sum, count] entries over micro-batches and data-parallel ranks (last stage only)."""
    from megatron.core import parallel_state

    if not losses:
        return {}
    totals = {key: torch.stack([entry[key] for entry in losses]).sum(0) for key in losses[0]}
    stacked = torch.stack([totals[key] for key in sorted(totals)])
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(stacked, group=group)
    return {key: stacked[i] for i, key in enumerate(sorted(totals))}


def _last_stage_values(logs: dict[str, torch.Tensor], device: torch.device) -> tuple[dict[str, float], int]:
    """Every rank gets the global logs and the token count, broadcast from the last pipeline stage."""
    from megatron.core import parallel_state

    payload = [{k: (float(v[0]), float(v[1])) for k, v in logs.items()}]
    group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(
            payload, src=last, group=group, device=device if device.type == "cuda" else None
        )
    values = {k: (s / c if c > 0 else float("nan")) for k, (s, c) in payload[0].items()}
    tokens = int(payload[0].get("loss", (0.0, 0.0))[1])
    return values, tokens


def _all_ranks_agree_finite(value: float, device: torch.device) -> bool:
    flag = torch.tensor(0.0 if math.isfinite(value) else 1.0, device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def _apply_update(optimizer, grad_norm: float, clip_grad: float) -> None:
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if clip_grad > 0.0:
        params = optimizer.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=clip_grad, total_norm=grad_norm)
    optimizer.step_with_ready_grads()


def current_lr(optimizer) -> float:
    for group in optimizer.param_groups:
        lr = group["lr"]
        return float(lr.item() if isinstance(lr, torch.Tensor) else lr)
    return float("nan")


def train_step(
    forward_step_func: Callable,
    data_iterator: Iterator | list[Iterator],
    model: list[Any],
    optimizer: Any,
    scheduler: Any,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    nan_policy: NanPolicy = "skip",
    clip_grad: float | None = None,
) -> StepResult:
    """Forward/backward over ``num_microbatches`` micro-batches, then one optimizer step.

    ``forward_step_func(data_iterator, model_chunk) -> (output, loss_func)`` as Megatron's
    schedules expect; ``loss_func(output) -> (loss_sum, num_tokens, logs)`` (module docstring).
    With interleaved pipelining pass one data iterator per model chunk.

    A non-finite loss or gradient norm (on any rank) applies no update and does not advance the
    LR schedule; ``nan_policy="stop"`` raises :class:`NonFiniteStepError` instead. The caller
    counts skipped steps (the data of a skipped step is consumed, as in Megatron-LM).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model[0].parameters()).device
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    lr = current_lr(optimizer)

    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    logs, num_tokens = _last_stage_values(_reduce_logs(losses), device)
    loss = logs.get("loss", float("nan"))

    found_inf = optimizer.prepare_grads()  # copies grads to fp32 main grads (unscales under fp16)
    grad_norm = float(optimizer.get_grad_norm()) if not found_inf else float("nan")
    finite = not found_inf and math.isfinite(grad_norm) and _all_ranks_agree_finite(loss, device)
    if not finite:
        if nan_policy == "stop":
            raise NonFiniteStepError(
                f"non-finite step: loss={loss}, grad norm={grad_norm}; no update was applied and "
                "no checkpoint was written (train.nan_policy=skip skips such steps instead)"
            )
        return StepResult(loss, num_tokens, grad_norm, skipped=True, lr=lr, logs=logs)

    clip = optimizer.config.clip_grad if clip_grad is None else clip_grad
    _apply_update(optimizer, grad_norm, clip)
    scheduler.step(increment=1)
    return StepResult(loss, num_tokens, grad_norm, skipped=False, lr=lr, logs=logs)
