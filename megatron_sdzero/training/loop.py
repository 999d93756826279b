"""Supervised training as a :class:`~megatron_sdzero.training.trainer.TrainModule`: the case with no
rollouts. A ``BatchSource`` hands it each iteration's micro-batches and the numbers the log line
needs, and ``save(iteration, loop_state)`` writes a checkpoint; the cycle is the trainer's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from megatron_sdzero.training.config import TrainConfig
from megatron_sdzero.training.logging import StepLogger
from megatron_sdzero.training.setup import Trainable
from megatron_sdzero.training.signals import ExitRequest
from megatron_sdzero.training.step import StepResult, train_step
from megatron_sdzero.training.trainer import LoopResult, Schedule, StepOutcome, Trainer

__all__ = ["BatchSource", "BatchStats", "LoopResult", "StepShape", "SupervisedModule", "run_training"]


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


SaveFn = Callable[[int, dict[str, Any]], None]


class SupervisedModule:
    """One optimizer step per global batch of a fixed dataset plan; no evaluation, no budget."""

    def __init__(
        self,
        trainable: Trainable,
        forward_step: Callable,
        batches: BatchSource,
        shape: StepShape,
        train: TrainConfig,
        save: SaveFn,
    ) -> None:
        self.trainable, self.forward_step, self.batches = trainable, forward_step, batches
        self.shape, self.train, self._save = shape, train, save

    def run_step(self, step: int) -> StepOutcome:
        iteration = step - 1  # the plan counts iterations from 0
        result = timed_train_step(
            self.trainable, self.forward_step, self.batches.micro_batches(iteration), self.shape, self.train
        )
        stats = self.batches.stats(iteration)
        return StepOutcome(result, stats.tokens, stats.sample_lengths, self.batches.consumed_samples(step))

    def evaluate(self, step: int) -> dict[str, float]:
        return {}

    def save(self, step: int, state: dict[str, Any]) -> None:
        self._save(step, state)

    def budget_left(self, step: int) -> str | None:
        return None


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
    module = SupervisedModule(trainable, forward_step, batches, shape, train, save)
    trainer = Trainer(
        module, Schedule(trainable.train_iters, save_interval=save_interval), train, logger, exit_request
    )
    return trainer.fit(start_iteration, skipped_total=loop_state.get("skipped_total", 0))


def timed_train_step(
    trainable: Trainable,
    forward_step: Callable,
    micro_batches: list[Any],
    shape: StepShape,
    train: TrainConfig,
) -> StepResult:
    import torch

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
    return step
