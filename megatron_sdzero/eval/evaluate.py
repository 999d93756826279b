"""Sample k answers per problem with a rollout engine, grade them, score the benchmark.

Used by ``sdzero eval`` and by the distillation loop's in-loop validation. Each problem's samples
are seeded from (seed, problem id), so two evaluations of the same weights draw the same samples
and two evaluations of different weights differ by the weights, not by the dice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from megatron_sdzero.data.formatting import ChatFormat, PromptConfig, build_messages
from megatron_sdzero.data.problems import Problem
from megatron_sdzero.eval.metrics import benchmark_scores
from megatron_sdzero.rollout.base import RolloutEngine, SamplingParams, mix_seed


@dataclass
class EvalOptions:
    """How a benchmark is sampled and scored."""

    k: int = 8  # samples per problem: avg@k is their mean accuracy
    pass_at: list[int] = field(default_factory=lambda: [1, 8])  # pass@k reported for each (<= k)
    batch_size: int = 64  # problems sampled together
    seed: int = 0

    def __post_init__(self) -> None:
        from megatron_sdzero.config import ConfigError

        if self.k < 1 or self.batch_size < 1:
            raise ConfigError(f"eval.k and eval.batch_size must be >= 1, got {self.k}, {self.batch_size}")
        bad = [k for k in self.pass_at if not 1 <= k <= self.k]
        if bad:
            raise ConfigError(f"eval.pass_at: {bad} not in [1, eval.k={self.k}]")


@dataclass
class ProblemResult:
    id: str
    samples: int
    correct: int
    mean_tokens: float
    cut_off: int  # samples that hit max_tokens before stopping


@dataclass
class EvalReport:
    scores: dict[str, float]  # avg@k, pass@k...
    problems: list[ProblemResult]
    tokens: int
    generation_s: float
    grading_s: float

    @property
    def avg(self) -> float:
        return next(v for name, v in self.scores.items() if name.startswith("avg@"))

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.scores,
            "num_problems": len(self.problems),
            "tokens": self.tokens,
            "generation_s": round(self.generation_s, 3),
            "grading_s": round(self.grading_s, 3),
            "problems": [asdict(p) for p in self.problems],
        }


def evaluate(
    problems: Sequence[Problem],
    engine: RolloutEngine,
    grader: Any,
    fmt: ChatFormat,
    sampling: SamplingParams,
    options: EvalOptions,
    prompt: PromptConfig | None = None,
) -> EvalReport:
    """avg@k and pass@k of the engine's current weights on ``problems``."""
    if not problems:
        raise ValueError("evaluate: no problems")
    results: list[ProblemResult] = []
    tokens, generation_s, grading_s = 0, 0.0, 0.0
    stop_ids = tuple(sorted(set(sampling.stop_token_ids) | fmt.stop_ids))
    for start in range(0, len(problems), options.batch_size):
        batch = problems[start : start + options.batch_size]
        prompts = [fmt.prompt_ids(build_messages(p.text, p.mode, prompt)) for p in batch]
        params = [_params(sampling, options, p, stop_ids) for p in batch]
        began = time.perf_counter()
        outputs = engine.generate(prompts, params)
        generation_s += time.perf_counter() - began
        texts = [c.text for completions in outputs for c in completions]
        answers = [p.reference for p in batch for _ in range(options.k)]
        graded = grader.grade_batch(texts, answers)
        grading_s += graded.seconds
        scores = iter(graded.scores)
        for problem, completions in zip(batch, outputs, strict=True):
            results.append(_problem_result(problem, completions, [next(scores) for _ in completions]))
            tokens += sum(len(c.token_ids) for c in completions)
    scores = benchmark_scores([r.correct for r in results], options.k, options.pass_at)
    return EvalReport(scores, results, tokens, generation_s, grading_s)


def _params(sampling: SamplingParams, options: EvalOptions, problem: Problem, stop_ids) -> SamplingParams:
    seed = mix_seed("eval", options.seed, problem.id)
    return replace(sampling, n=options.k, seed=seed, stop_token_ids=stop_ids, logprobs=False)


def _problem_result(problem: Problem, completions, scores: list[float]) -> ProblemResult:
    return ProblemResult(
        id=problem.id,
        samples=len(completions),
        correct=sum(score > 0.5 for score in scores),
        mean_tokens=sum(len(c.token_ids) for c in completions) / max(1, len(completions)),
        cut_off=sum(c.finish_reason == "length" for c in completions),
    )
