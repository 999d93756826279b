"""The one training cycle every algorithm runs: step, log, evaluate and save on schedule, leave cleanly.

    trainer = Trainer(module, schedule, train, logger, exit_request)
    result = trainer.fit(start_step)

The algorithm is the ``module`` (a :class:`TrainModule`, in the manner of OLMo-core's TrainModule):
``run_step(step)`` makes one optimizer step, however its batch comes about (SFT reads a dataset;
on-policy algorithms sample, grade and build their batch first), ``evaluate`` scores the current
weights, ``save`` writes a checkpoint, ``budget_left`` says whether the sample budget allows the
next step. What is the same for all of them lives here, once:

- non-finite steps: counted, reported, and ``train.max_consecutive_skips`` in a row stop the run
  with the last checkpoint intact;
- the step line / metrics.jsonl / TensorBoard through one :class:`StepLogger`;
- evaluation every ``eval_interval`` steps and after the last one (optionally before the first);
- a checkpoint every ``save_interval`` steps, on an exit request (signal, stop file, time limit:
  see :func:`exit_request_for`) and at the end: a run always ends on a checkpoint it can resume.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from megatron_sdzero.training.config import TrainConfig
from megatron_sdzero.training.step import NonFiniteStepError, StepResult

STOP_FILE_ENV = "SDZERO_STOP_FILE"


@dataclass
class StepOutcome:
    """One optimizer step as the log needs it."""

    result: StepResult
    tokens: int  # real (non-padding) tokens the models read in this global batch
    sample_lengths: list[int]  # sequence lengths, for the FLOP count
    consumed_samples: int  # samples consumed up to and including this step
    metrics: dict[str, float] = field(default_factory=dict)  # extra numbers for the log


class TrainModule(Protocol):
    def run_step(self, step: int) -> StepOutcome: ...  # the 1-based step's optimizer update

    def evaluate(self, step: int) -> dict[str, float]: ...  # {} when there is nothing to evaluate

    def save(self, step: int, state: dict[str, Any]) -> None: ...

    def budget_left(self, step: int) -> str | None: ...  # None, or why step ``step`` may not run


@dataclass
class Schedule:
    total_steps: int
    save_interval: int | None = None
    eval_interval: int | None = None
    eval_at_start: bool = False


@dataclass
class LoopResult:
    iteration: int  # steps done
    finished: bool  # reached the last step (or the budget)
    exit_reason: str | None = None
    results: list[StepResult] = field(default_factory=list)
    skipped_total: int = 0
    last: dict[str, Any] = field(default_factory=dict)  # the last step's logged numbers


@dataclass
class Hooks:
    """Test and tooling callbacks (not configuration)."""

    on_step_start: Callable[[int], None] = lambda step: None


def exit_request_for(train: TrainConfig, run_dir: str | Path | None):
    """Signals, the time limit and the stop file: ``$SDZERO_STOP_FILE`` (what the sbatch scripts
    create) if set, else ``RUN_DIR/STOP``."""
    from megatron_sdzero.training.signals import ExitRequest

    stop_file = os.environ.get(STOP_FILE_ENV) or (Path(run_dir) / "STOP" if run_dir else None)
    return ExitRequest(train.exit_signals, stop_file=stop_file, max_minutes=train.exit_duration_minutes)


def due(step: int, interval: int | None, last: int) -> bool:
    return bool(interval) and (step % interval == 0 or step == last)


class Trainer:
    def __init__(
        self,
        module: TrainModule,
        schedule: Schedule,
        train: TrainConfig,
        logger: Any,  # training.logging.StepLogger
        exit_request: Any,  # training.signals.ExitRequest
        hooks: Hooks | None = None,
    ) -> None:
        self.module, self.schedule, self.train = module, schedule, train
        self.logger, self.exit_request = logger, exit_request
        self.hooks = hooks or Hooks()

    def fit(self, start_step: int, skipped_total: int = 0) -> LoopResult:
        """Steps ``start_step + 1 ... total_steps``; returns having saved the last step done."""
        schedule = self.schedule
        result = LoopResult(iteration=start_step, finished=False, skipped_total=skipped_total)
        if start_step == 0 and schedule.eval_at_start:
            result.last.update(self.module.evaluate(0))
        consecutive_skips, saved_at = 0, start_step
        for step in range(start_step + 1, schedule.total_steps + 1):
            if reason := self.module.budget_left(step):
                self.logger.message(f"stopping before step {step}: {reason}")
                result.exit_reason, result.finished = reason, True
                break
            self.hooks.on_step_start(step)
            began = time.perf_counter()
            outcome = self.module.run_step(step)
            step_result = outcome.result
            result.iteration = step
            result.results.append(step_result)
            result.skipped_total += int(step_result.skipped)
            consecutive_skips = consecutive_skips + 1 if step_result.skipped else 0
            step_result.logs.update(outcome.metrics)
            self._log(step, outcome, time.perf_counter() - began, result.skipped_total)
            result.last = {
                "step": step, "loss": step_result.loss, "grad_norm": step_result.grad_norm, **outcome.metrics,
            }  # fmt: skip
            if consecutive_skips >= self.train.max_consecutive_skips:
                raise NonFiniteStepError(
                    f"{consecutive_skips} consecutive non-finite steps up to step {step}; stopping "
                    f"(the last checkpoint, step {saved_at}, is intact)"
                )
            if due(step, schedule.eval_interval, schedule.total_steps):
                result.last.update(self.module.evaluate(step))
            state = {"skipped_total": result.skipped_total}
            if due(step, schedule.save_interval, schedule.total_steps) and step < schedule.total_steps:
                self.module.save(step, state)
                saved_at = step
            if reason := self.exit_request.should_exit():
                if saved_at != step:
                    self.module.save(step, state)
                    saved_at = step
                self.logger.message(f"exit requested ({reason}) after step {step}: checkpoint saved, leaving")
                result.exit_reason = reason
                return result
        else:
            result.finished = True
        if saved_at != result.iteration:  # (a run resumed at its last step already has that checkpoint)
            self.module.save(result.iteration, {"skipped_total": result.skipped_total})
        return result

    def _log(self, step: int, outcome: StepOutcome, seconds: float, skipped_total: int) -> None:
        result = outcome.result
        self.logger.log(
            step, result, seconds=seconds, tokens=outcome.tokens, sample_lengths=outcome.sample_lengths,
            consumed_samples=outcome.consumed_samples, skipped_total=skipped_total,
        )  # fmt: skip
        if result.skipped:
            self.logger.message(
                f"step {step}: non-finite loss {result.loss} / grad norm {result.grad_norm}; skipped"
            )
