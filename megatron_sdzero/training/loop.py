"""The training loop: step, log, save every N iterations, save and leave on an exit request.

It knows nothing about SFT: a ``BatchSource`` hands it each iteration's micro-batches and the
numbers the log line needs, and ``save(iteration, loop_state)`` writes a checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from megatron_sdzero.training.config import TrainConfig
from megatron_sdzero.training.logging import StepLogger
from megatron_sdzero.training.setup import Trainable
from megatron_sdzero.training.signals import ExitRequest
from megatron_sdzero.training.step import NonFiniteStepError, StepResult, train_step


@dataclass
class BatchStats:
    """What the log line needs about one global batch."""

    samples: int
    tokens: int  # real (non-padding) input tokens
    sample_lengths: list[int]


class BatchSource(Protocol):
    def micro_batches(self, iteration: int) -> list[Any]: ...  # this rank's micro-batches

    def stats(self, iteration: int) -> BatchStats: ...

    def consumed_samples(self, iteration: int) -> int: ...


@dataclass
class StepShape:
    num_microbatches: int
    seq_length: int
    micro_batch_size: int


@dataclass
class LoopResult:
    iteration: int  # iterations done
    finished: bool  # reached train_iters
    exit_reason: str | None = None
    results: list[StepResult] = field(default_factory=list)
    skipped_total: int = 0


SaveFn = Callable[[int, dict[str, Any]], None]


def run_training(
    trainable: Trainable,
    *,
    forward_step: Callable,
    batches: BatchSource,
    shape: StepShape,
    train: TrainConfig,
    start_iteration: int,
    loop_state: dict[str, Any],
    save: SaveFn,
    save_interval: int | None,
    logger: StepLogger,
    exit_request: ExitRequest,
) -> LoopResult:
    """Train from ``start_iteration`` to ``trainable.train_iters``; always ends with a checkpoint."""
    result = LoopResult(
        iteration=start_iteration, finished=False, skipped_total=loop_state.get("skipped_total", 0)
    )
    consecutive_skips, saved_at = 0, start_iteration
    for iteration in range(start_iteration, trainable.train_iters):
        step, seconds = _timed_step(trainable, forward_step, batches.micro_batches(iteration), shape, train)
        done = iteration + 1
        consecutive_skips = consecutive_skips + 1 if step.skipped else 0
        result.skipped_total += int(step.skipped)
        result.iteration = done
        result.results.append(step)
        stats = batches.stats(iteration)
        logger.log(
            done,
            step,
            seconds=seconds,
            tokens=stats.tokens,
            sample_lengths=stats.sample_lengths,
            consumed_samples=batches.consumed_samples(done),
            skipped_total=result.skipped_total,
        )
        if step.skipped:
            logger.message(
                f"iteration {done}: non-finite loss {step.loss} / grad norm {step.grad_norm}; skipped"
            )
        if consecutive_skips >= train.max_consecutive_skips:
            raise NonFiniteStepError(
                f"{consecutive_skips} consecutive non-finite steps up to iteration {done}; stopping "
                f"(the last checkpoint, iteration {saved_at}, is intact)"
            )
        state = {"skipped_total": result.skipped_total}
        if save_interval and done % save_interval == 0 and done < trainable.train_iters:
            save(done, state)
            saved_at = done
        reason = exit_request.should_exit()
        if reason:
            if saved_at != done:
                save(done, state)
            logger.message(f"exit requested ({reason}) after iteration {done}: checkpoint saved, leaving")
            result.exit_reason = reason
            return result
    if saved_at != trainable.train_iters:  # (a run resumed at its last iteration has that checkpoint)
        save(trainable.train_iters, {"skipped_total": result.skipped_total})
    result.finished = True
    return result


def _timed_step(trainable: Trainable, forward_step, micro_batches, shape: StepShape, train: TrainConfig):
    import torch

    start = time.perf_counter()
    # Interleaved pipelining reads the micro-batches once per model chunk.
    data = (
        iter(micro_batches) if len(trainable.model) == 1 else [iter(micro_batches) for _ in trainable.model]
    )
    step = train_step(
        forward_step,
        data,
        trainable.model,
        trainable.optimizer,
        trainable.scheduler,
        num_microbatches=shape.num_microbatches,
        seq_length=shape.seq_length,
        micro_batch_size=shape.micro_batch_size,
        nan_policy=train.nan_policy,
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return step, time.perf_counter() - start
