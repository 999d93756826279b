"""Public entry points: the distillation loss and the masked cross-entropy on vocab-parallel logits.

Reduction (the same for both losses)
------------------------------------
A token is valid when its loss-mask entry is nonzero and its weight is nonzero. With
``reduction="mean"`` the loss of one call (one micro-batch on one data-parallel rank) is

    loss = sum_{valid tokens t of this micro-batch} weight_t * value_t / N_global

where ``N_global`` (``num_valid_tokens_global``) is the number of valid tokens of the whole global
batch: all micro-batches of the step, all data-parallel (and context-parallel) ranks. Summing these
losses over micro-batches and ranks gives exactly the token-level mean of the global batch, and the
gradients add up the same way, however the batch is split. Count ``N_global`` before the first
micro-batch with :func:`count_valid_tokens` (all-reduce over the data-parallel group, with context
parallelism over Megatron's data-parallel-with-context-parallel group); every pipeline stage can do
it since it only needs the loss masks. Without it, the divisor is this call's own valid-token count
(a per-micro-batch mean, which weighs micro-batches equally instead of tokens).

Megatron's schedule and DDP then rescale what the loss function returns; two exact recipes:
- ``config.calculate_per_token_loss = True`` (preferred): call with ``reduction="sum"`` and return
  ``(loss, metrics.num_valid_tokens, logs)`` from the loss function. Megatron applies no 1/DP and
  no 1/num_microbatches and divides the gradients by the global token count in
  ``finalize_model_grads``.
- otherwise, returning ``(loss, logs)``: Megatron divides by num_microbatches and multiplies by the
  context-parallel size, and DDP averages over the data-parallel-with-context-parallel group;
  multiply our ``reduction="mean"`` loss by :func:`megatron_loss_scale` (num_microbatches x
  data-parallel size) before returning it.
Tensor-parallel ranks hold the same tokens and compute the same loss value; only the gradient is
split over the vocabulary.

Gradient timing (full vocabulary): the gradient w.r.t. the student logits is computed during the
forward call (when grad mode is on and the student requires grad), right after the statistics, and
kept until backward; the backward returns it as is when the upstream gradient is exactly 1 and
rescales it in place otherwise (on the GPU a kernel makes that check, so the backward never waits
for the GPU). So the student and teacher logits are not
needed after the call, and the memory held is one gradient-sized tensor. Top-k modes compute a
[tokens, k(+1)] bucket gradient in the forward and scatter it in the backward.

In-place gradient (``grad_in_place=True``, full vocabulary only): the gradient is written into the
student logits themselves during the forward call, so no gradient-sized buffer is allocated (peak:
student + teacher). The caller must not read the logits afterwards (they hold the gradient; the
backward hands that same storage on). It is safe with autograd when nothing else needs the logits'
values: e.g. logits produced by a matmul / linear layer (whose backward keeps its inputs, not its
output), or a leaf. It is refused at the call when the op that produced the logits saved them for
its backward (e.g. tanh soft-capping), or when the teacher shares their memory; any other autograd
node that saved the logits (another loss on them, say) makes the backward fail with PyTorch's
"modified by an inplace operation" error, since the call bumps the logits' version counter. Without
grad mode or when the logits do not require grad, no gradient is computed and the logits are left
alone; logits whose rows are not contiguous get a separate gradient buffer.

With TP = 1 on an H100/H200 the fused pass is the one-pass cluster kernel when it applies
(``SDZERO_KL_ONEPASS=auto|1|0``, see ``_cluster_kernel.py``), else the Triton fused kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megatron_sdzero.losses._torch_kernels import GradSpec
from megatron_sdzero.losses.config import Backend, DistillLossConfig
from megatron_sdzero.losses.full_vocab import FullVocabLoss, PassSettings, select_kernels
from megatron_sdzero.losses.parallel import ProcessGroup, all_reduce_sum_, default_tp_group, make_vocab_shard
from megatron_sdzero.losses.topk import TopKDivergence

Reduction = Literal["mean", "sum"]


@dataclass(frozen=True)
class LossMetrics:
    """Detached numbers for logging, for this call (one micro-batch on this rank).

    token_values: per-token divergence (or cross-entropy), unweighted, 0 where not valid; float32,
        shaped like the loss mask.
    weighted_sum: sum of weight * value over valid tokens.
    num_valid_tokens: valid tokens in this call (int64).
    """

    token_values: torch.Tensor
    weighted_sum: torch.Tensor
    num_valid_tokens: torch.Tensor


def token_weights(loss_mask: torch.Tensor, sample_weights: torch.Tensor | None) -> torch.Tensor:
    """float32 weight per token: (loss_mask != 0) * sample_weights broadcast to the mask's shape.

    ``sample_weights`` holds one weight per sample, shaped to broadcast against the mask: [b, 1] for
    a [b, s] mask, [1, b] for Megatron's [s, b] layout. A weight of 0 switches a sample off.
    """
    weights = (loss_mask != 0).to(torch.float32)
    if sample_weights is not None:
        weights = weights * sample_weights.to(device=weights.device, dtype=torch.float32)
    if weights.shape != loss_mask.shape:
        raise ValueError(
            f"sample_weights {tuple(sample_weights.shape)} changed the mask shape {tuple(loss_mask.shape)}"
        )
    return weights


def count_valid_tokens(
    loss_mask: torch.Tensor, sample_weights: torch.Tensor | None = None, *, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Valid tokens (nonzero mask and weight), summed over ``group`` when given (int64 tensor).

    Pass the loss masks of every micro-batch of the step (stacked, or call once each and add) and the
    data-parallel group (Megatron's data-parallel group with context parallel when CP > 1) to get
    ``num_valid_tokens_global``.
    """
    count = (token_weights(loss_mask, sample_weights) != 0).sum().to(torch.int64)
    return all_reduce_sum_(count, group) if group is not None else count


def megatron_loss_scale(num_microbatches: int, data_parallel_size: int) -> float:
    """Factor for a ``reduction="mean"`` loss returned to Megatron's schedule as ``(loss, logs)``.

    The schedule divides it by num_microbatches (and multiplies by the CP size) and DDP averages the
    gradients over the DP x CP ranks; multiplying by num_microbatches x DP undoes both, so the step
    follows the gradient of the global token-level mean.
    """
    return float(num_microbatches * data_parallel_size)


def _divisor(weights: torch.Tensor, reduction: Reduction, num_valid_tokens_global) -> torch.Tensor:
    """What the weighted sum is divided by (a float32 tensor on the weights' device, at least 1)."""
    if reduction == "sum":
        return torch.ones((), device=weights.device)
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}")
    count = (weights != 0).sum() if num_valid_tokens_global is None else num_valid_tokens_global
    return torch.as_tensor(count, device=weights.device).to(torch.float32).clamp(min=1.0)


def _metrics(values: torch.Tensor, weights: torch.Tensor) -> LossMetrics:
    values = values.detach()
    return LossMetrics(
        token_values=values.reshape(weights.shape),
        weighted_sum=(values * weights.reshape(-1)).sum(),
        num_valid_tokens=(weights != 0).sum().to(torch.int64),
    )


def _check_shapes(logits: torch.Tensor, loss_mask: torch.Tensor, other: torch.Tensor | None = None) -> None:
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., vocab_shard], got shape {tuple(logits.shape)}")
    if other is not None and other.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(other.shape)} differ from student {tuple(logits.shape)}")
    if loss_mask.shape != logits.shape[:-1]:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must match logits[:-1] {tuple(logits.shape[:-1])}"
        )


def _saved_by_producer(logits: torch.Tensor) -> str | None:
    """Name of the autograd node that produced ``logits`` (or their base, for a view) and saved a
    tensor sharing their memory for its backward; None when there is none."""
    storage = logits.untyped_storage().data_ptr()
    bases = [logits] if logits._base is None else [logits, logits._base]
    for node in (base.grad_fn for base in bases):
        if node is None:
            continue
        for name in (attr for attr in dir(node) if attr.startswith("_saved_")):
            try:
                saved = getattr(node, name)
            except RuntimeError:  # freed by an earlier backward
                continue
            tensors = saved if isinstance(saved, tuple | list) else (saved,)
            shared = (
                t.untyped_storage().data_ptr() == storage for t in tensors if isinstance(t, torch.Tensor)
            )
            if any(shared):
                return node.name()
    return None


def _check_grad_in_place(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None) -> None:
    if teacher_logits is not None and (
        teacher_logits.untyped_storage().data_ptr() == student_logits.untyped_storage().data_ptr()
    ):
        raise ValueError("grad_in_place: the teacher logits share memory with the student logits")
    producer = _saved_by_producer(student_logits)
    if producer is not None:
        raise ValueError(
            f"grad_in_place: the student logits were saved by {producer} for its backward; overwriting"
            " them with the gradient would corrupt it (call without grad_in_place)"
        )


def _settings(
    logits: torch.Tensor,
    vocab_start: int | None,
    valid_vocab_size: int | None,
    tp_group: ProcessGroup | None,
    temperature: float,
    chunk_tokens: int,
    backend: Backend,
) -> PassSettings:
    group = tp_group if tp_group is not None else default_tp_group()
    shard = make_vocab_shard(logits.shape[-1], vocab_start, valid_vocab_size, group)
    return PassSettings(
        shard=shard,
        inv_temp=1.0 / temperature,
        chunk_tokens=chunk_tokens,
        kernels=select_kernels(backend, logits.device),
    )


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    config: DistillLossConfig | None = None,
    vocab_start: int | None = None,
    valid_vocab_size: int | None = None,
    sample_weights: torch.Tensor | None = None,
    tp_group: ProcessGroup | None = None,
    num_valid_tokens_global: torch.Tensor | int | None = None,
    reduction: Reduction = "mean",
    grad_in_place: bool = False,
) -> tuple[torch.Tensor, LossMetrics]:
    """Token-level divergence between student and teacher on this rank's vocab shard.

    student_logits, teacher_logits: [..., vocab/TP] shards of the same tokens (Megatron's output
        layer gives [s, b, vocab/TP]); any float dtype, the teacher is detached and never gets a
        gradient. Computation is in float32, a chunk of tokens (or one Triton row) at a time.
    loss_mask: [...] matching the logits' leading dims; nonzero = the token counts.
    vocab_start: global id of this shard's first column (default: Megatron's even split, rank x width).
    valid_vocab_size: the real vocabulary size; ids at or above it (Megatron's padding) are excluded
        from both distributions (default: no padding).
    sample_weights: per-sample weights broadcastable to loss_mask (see :func:`token_weights`).
    tp_group: the tensor-parallel group; default Megatron's when initialised, else a single process.
    num_valid_tokens_global / reduction: see the module docstring.
    grad_in_place: write the gradient into ``student_logits`` during this call (they must not be used
        afterwards); full vocabulary only. See "In-place gradient" in the module docstring.

    Returns (loss, metrics); the loss is a float32 scalar, identical on every tensor-parallel rank.
    """
    config = config or DistillLossConfig()
    _check_shapes(student_logits, loss_mask, teacher_logits)
    if grad_in_place:
        if config.top_k is not None:
            raise ValueError("grad_in_place needs the full-vocabulary loss (top_k=None)")
        _check_grad_in_place(student_logits, teacher_logits)
    settings = _settings(
        student_logits, vocab_start, valid_vocab_size, tp_group,
        config.temperature, config.chunk_tokens, config.backend,
    )  # fmt: skip
    width = student_logits.shape[-1]
    student = student_logits.reshape(-1, width)
    teacher = teacher_logits.detach().reshape(-1, width)
    weights = token_weights(loss_mask, sample_weights)
    spec = GradSpec(
        kind="jsd" if config.kind == "jsd" else "kl",
        forward_weight=config.forward_weight,
        jsd_beta=config.jsd_beta,
    )
    divisor = _divisor(weights, reduction, num_valid_tokens_global)
    if config.top_k is None:
        row_coef = (weights.reshape(-1) / divisor).contiguous()
        needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
        loss, values = FullVocabLoss.apply(
            student, teacher, None, row_coef, spec, settings, needs_grad, grad_in_place
        )
    else:
        active = (weights != 0).reshape(-1)
        values = TopKDivergence.apply(
            student, teacher, active, config.top_k, config.top_k_tail, spec, settings
        )
        loss = (values * weights.reshape(-1)).sum() / divisor
    return loss, _metrics(values, weights)


def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    vocab_start: int | None = None,
    valid_vocab_size: int | None = None,
    sample_weights: torch.Tensor | None = None,
    tp_group: ProcessGroup | None = None,
    num_valid_tokens_global: torch.Tensor | int | None = None,
    reduction: Reduction = "mean",
    chunk_tokens: int = 1024,
    backend: Backend = "auto",
    grad_in_place: bool = False,
) -> tuple[torch.Tensor, LossMetrics]:
    """Masked cross-entropy of vocab-parallel logits (the SFT loss), on the same machinery.

    Per token it equals ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (which
    returns per-token values and overwrites its input); here masked tokens are skipped (their labels
    may be anything, e.g. -100), padding ids are excluded from the softmax, and the reduction
    follows the module docstring. ``labels`` are global vocabulary ids shaped like ``loss_mask``.
    ``grad_in_place``: write the gradient into ``logits`` during this call (they must not be used
    afterwards); see "In-place gradient" in the module docstring.
    """
    _check_shapes(logits, loss_mask)
    if grad_in_place:
        _check_grad_in_place(logits, None)
    if labels.shape != loss_mask.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match loss_mask {tuple(loss_mask.shape)}")
    settings = _settings(logits, vocab_start, valid_vocab_size, tp_group, 1.0, chunk_tokens, backend)
    weights = token_weights(loss_mask, sample_weights)
    row_coef = (weights.reshape(-1) / _divisor(weights, reduction, num_valid_tokens_global)).contiguous()
    flat_labels = labels.reshape(-1).to(device=logits.device, dtype=torch.int64)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, values = FullVocabLoss.apply(
        logits.reshape(-1, logits.shape[-1]),
        None,
        flat_labels,
        row_coef,
        GradSpec(kind="ce"),
        settings,
        needs_grad,
        grad_in_place,
    )
    return loss, _metrics(values, weights)
