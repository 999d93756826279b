"""One distillation step: teacher forward (no grad) -> student forward/backward -> KL -> optimizer step.

Per micro-batch the teacher's logits are taken at the aligned positions only (``teacher_index``),
on this rank's vocabulary shard: [b, K, vocab/TP]. The student's logits at ``student_index`` are
compared with them by ``losses.distill_loss`` (vocab-parallel, chunked over tokens, padding ids
excluded), with ``reduction="sum"``: Megatron's per-token loss path divides the gradients by the
global number of valid tokens (see training/step.py), so the update follows the token-level mean
over the whole global batch.

Without pipeline parallelism the teacher runs inside the student's forward step, one micro-batch
at a time, so only one micro-batch of teacher logits ever exists. With pipeline parallelism the
teacher runs its own forward-only pipeline pass over the step's micro-batches first, and the last
stage keeps their aligned logits until the student's loss function consumes them (the loss is
computed on the last stage, which is also where the teacher's logits are).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_sdzero.distill.batch import DistillBatch
from megatron_sdzero.distill.teacher import Teacher
from megatron_sdzero.distill.weights import unwrap
from megatron_sdzero.losses import DistillLossConfig, distill_loss
from megatron_sdzero.training.step import StepResult, loss_log, train_step


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def aligned(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[b, s, v] logits at positions ``index`` [b, K] -> [b, K, v]."""
    return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))


@contextlib.contextmanager
def frozen_forward(teacher: Teacher) -> Iterator[None]:
    """Grad mode on, yet no autograd graph: no teacher parameter requires grad and the inputs are
    token ids. Not ``torch.no_grad()``: TransformerEngine updates FP8 delayed-scaling amax and scales
    when ``fp8_autocast`` exits only in grad mode, so under no_grad an FP8 teacher would run forever
    on its initial scales (see docs/benchmarks.md, FP8 teacher)."""
    if any(p.requires_grad for chunk in unwrap(teacher.chunks) for p in chunk.parameters()):
        raise RuntimeError("the teacher has parameters that require grad; it must be frozen")
    with torch.enable_grad():
        yield


def teacher_logits(teacher: Teacher, batch: DistillBatch) -> torch.Tensor:
    """The teacher's aligned logits of one micro-batch (no pipeline parallelism)."""
    chunk = unwrap(teacher.chunks)[0]
    device = _device(chunk)
    tokens = batch.teacher_tokens.to(device)
    with frozen_forward(teacher):
        logits = chunk(tokens, _positions(tokens), None)
    return aligned(logits, batch.teacher_index.to(device)).detach()


def teacher_pass(teacher: Teacher, micro_batches: list[DistillBatch]) -> list[torch.Tensor | None]:
    """Aligned teacher logits of every micro-batch through a forward-only pipeline pass.

    The last stage gets a [b, K, vocab/TP] tensor per micro-batch; other stages get Nones.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunk = unwrap(teacher.chunks)[0]
    device = _device(chunk)
    collected: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch.teacher_tokens.to(device)
        output = model(tokens, _positions(tokens), None)

        def collect(logits):
            collected.append(aligned(logits.detach(), batch.teacher_index.to(device)))
            return logits.new_zeros(()), {}

        return output, collect

    with frozen_forward(teacher):
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=unwrap(teacher.chunks),
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0].teacher_tokens.shape[1],
            micro_batch_size=micro_batches[0].size,
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return [None] * len(micro_batches)
    return collected


class Stopwatch:
    """Accumulated seconds of the timed blocks (device work included: CUDA is synchronised)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        _synchronize()
        began = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.seconds += time.perf_counter() - began


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


LossFn = Callable[
    [torch.Tensor, "torch.Tensor | None", DistillBatch], tuple[torch.Tensor, torch.Tensor, dict]
]
"""(student logits at ``student_index`` [b, K, vocab/TP], the frozen model's at ``teacher_index`` or
None, the micro-batch on the student's device) -> (loss sum, valid tokens, logs), as step.py wants."""


def kl_loss(
    loss_config: DistillLossConfig, valid_vocab_size: int, token_sink: Callable | None = None
) -> LossFn:
    """The token-level divergence to the frozen teacher (SD-Zero, SDFT); ``token_sink(batch, values)``
    receives each micro-batch's per-token divergence."""

    def loss_func(student: torch.Tensor, target: torch.Tensor | None, batch: DistillBatch):
        loss, metrics = distill_loss(
            student,
            target,
            batch.loss_mask,
            config=loss_config,
            valid_vocab_size=valid_vocab_size,
            sample_weights=batch.sample_weights[:, None],
            reduction="sum",
        )
        if token_sink is not None:
            token_sink(batch, metrics.token_values.detach())
        tokens_valid = metrics.num_valid_tokens
        return loss, tokens_valid.int(), {"loss": loss_log(loss, tokens_valid)}

    return loss_func


def make_forward_step(teacher: Teacher | None, loss_fn: LossFn, teacher_time: Stopwatch) -> Callable:
    """``forward_step_func`` over (micro-batch, precomputed teacher logits or None) pairs."""

    def forward_step(data_iterator: Iterator[tuple[DistillBatch, torch.Tensor | None]], model: Any):
        batch, stashed = next(data_iterator)
        device = _device(model)
        target = stashed
        if teacher is not None and stashed is None and _single_stage():
            with teacher_time.timing():
                target = teacher_logits(teacher, batch)
        tokens = batch.student_tokens.to(device)
        output = model(tokens, _positions(tokens), None)
        on_device = batch.to(device)

        def loss_func(logits: torch.Tensor):
            return loss_fn(aligned(logits, on_device.student_index), target, on_device)

        return output, loss_func

    return forward_step


def make_distill_forward_step(
    teacher: Teacher, loss_config: DistillLossConfig, valid_vocab_size: int, teacher_time: Stopwatch
) -> Callable:
    return make_forward_step(teacher, kl_loss(loss_config, valid_vocab_size), teacher_time)


def _single_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size() == 1


def distill_step(
    student: Any,
    teacher: Teacher,
    batch: DistillBatch,
    loss_config: DistillLossConfig,
    valid_vocab_size: int,
    *,
    micro_batch_size: int,
    pad_to_multiple_of: int = 8,
    nan_policy: str = "skip",
    teacher_time: Stopwatch | None = None,
) -> StepResult:
    """SD-Zero's step: :func:`policy_step` with the KL to the teacher."""
    return policy_step(
        student, teacher, batch, kl_loss(loss_config, valid_vocab_size), micro_batch_size=micro_batch_size,
        pad_to_multiple_of=pad_to_multiple_of, nan_policy=nan_policy, teacher_time=teacher_time,
    )  # fmt: skip


def policy_step(
    student: Any,
    teacher: Teacher | None,
    batch: DistillBatch,
    loss_fn: LossFn,
    *,
    micro_batch_size: int,
    pad_to_multiple_of: int = 8,
    nan_policy: str = "skip",
    teacher_time: Stopwatch | None = None,
) -> StepResult:
    """The frozen model's forward (if any), student forward/backward and one optimizer step.

    ``student``: a ``training.setup.Trainable``. With pipeline parallelism every micro-batch keeps
    the step's padded width (the pipeline's send/receive shapes are fixed) and the local batch
    size must be a multiple of ``micro_batch_size``.
    """
    pipelined = not _single_stage()
    if pipelined and batch.size % micro_batch_size:
        raise ValueError(
            f"with pipeline parallelism the batch of {batch.size} samples must split into "
            f"micro-batches of {micro_batch_size}"
        )
    micro = batch.micro_batches(micro_batch_size, trim_to_multiple=None if pipelined else pad_to_multiple_of)
    teacher_time = teacher_time or Stopwatch()
    with teacher.on_device() if teacher is not None else contextlib.nullcontext():
        stash = [None] * len(micro)
        if pipelined and teacher is not None:
            with teacher_time.timing():
                stash = teacher_pass(teacher, micro)
        return train_step(
            make_forward_step(teacher, loss_fn, teacher_time),
            iter(list(zip(micro, stash, strict=True))),
            student.model,
            student.optimizer,
            student.scheduler,
            num_microbatches=len(micro),
            seq_length=batch.student_tokens.shape[1],
            micro_batch_size=micro_batch_size,
            nan_policy=nan_policy,
        )
