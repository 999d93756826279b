"""Checkpoint selection on a validation set that is not a reported benchmark.

Picking checkpoints by a number that is also reported (the paper's in-loop AIME 2024) leaks the
test set into the result. A trainer names its validation set with :class:`ValidationConfig` and
the reported benchmarks it must stay apart from; :func:`load_validation` refuses a validation set
that shares a problem (by normalised statement) with any of them, and :meth:`ValidationSet.score`
gives the selection metric of the engine's current weights::

    validation = load_validation(config.eval.validation)          # once, at start-up
    score, report = validation.score(engine, grader, fmt, prompt, token_limit=max_model_len)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_sdzero.config import ConfigError
from megatron_sdzero.data.formatting import ChatFormat, PromptConfig
from megatron_sdzero.data.problems import Problem, ProblemSource, drop_overlap, load_problems
from megatron_sdzero.eval.evaluate import EvalOptions, EvalReport, evaluate
from megatron_sdzero.eval.suite import BenchmarkConfig
from megatron_sdzero.rollout.base import RolloutEngine, SamplingParams


@dataclass
class ValidationConfig:
    benchmark: BenchmarkConfig  # the validation set, e.g. held-out OpenR1-Math or held-out gym seeds
    metric: str | None = None  # the score that ranks checkpoints: None = avg@k; or "pass@j" (j in pass_at)
    reported: list[ProblemSource] = field(default_factory=list)  # benchmarks it must not overlap
    options: EvalOptions = field(default_factory=EvalOptions)  # k, pass_at, batch, seed (benchmark overrides)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, top_p=1.0))

    def __post_init__(self) -> None:
        options = self.benchmark.options(self.options)
        allowed = [f"avg@{options.k}", *(f"pass@{j}" for j in options.pass_at)]
        if self.metric is not None and self.metric not in allowed:
            raise ConfigError(f"validation.metric: {self.metric!r} is not one of {allowed}")


@dataclass
class ValidationSet:
    name: str
    problems: list[Problem]
    options: EvalOptions
    sampling: SamplingParams
    metric: str

    def score(
        self, engine: RolloutEngine, grader: Any, fmt: ChatFormat, prompt: PromptConfig | None = None,
        token_limit: int | None = None,
    ) -> tuple[float, EvalReport]:  # fmt: skip
        """The selection metric of the engine's current weights, and the full report."""
        report = evaluate(
            self.problems, engine, grader, fmt, self.sampling, self.options, prompt, token_limit
        )
        return report.scores[self.metric], report


def load_validation(config: ValidationConfig) -> ValidationSet:
    """The validation problems; a ConfigError if any of them is also in a reported benchmark."""
    benchmark = config.benchmark
    problems, report = load_problems(benchmark.problems)
    if not problems:
        raise ConfigError(f"validation: {report.source} holds no valid problems")
    for source in config.reported:
        reported, reported_report = load_problems(source)
        check_disjoint(benchmark.name, problems, reported_report.source, reported)
    options = benchmark.options(config.options)
    metric = config.metric or f"avg@{options.k}"
    return ValidationSet(
        benchmark.name, problems, options, benchmark.sampling_params(config.sampling), metric
    )


def check_disjoint(
    name: str, problems: Sequence[Problem], reported_name: str, reported: Sequence[Problem]
) -> None:
    """A ConfigError when validation ``problems`` share a (normalised) statement with ``reported``."""
    shared = len(problems) - len(drop_overlap(problems, reported))
    if shared:
        raise ConfigError(
            f"validation: {shared} of the {len(problems)} problems of {name!r} are also in the reported "
            f"benchmark {reported_name}; choose a disjoint validation set"
        )
