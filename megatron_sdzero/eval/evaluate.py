"""Sample k answers per problem with a rollout engine, grade them, score the benchmark.

Used by ``sdzero eval`` and by the distillation loop's in-loop validation. Each problem's samples
are seeded from (seed, problem id), so two evaluations of the same weights draw the same samples
and two evaluations of different weights differ by the weights, not by the dice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from megatron_sdzero.data.formatting import ChatFormat, PromptConfig, build_messages
from megatron_sdzero.data.problems import Problem
from megatron_sdzero.eval.metrics import benchmark_scores
from megatron_sdzero.rollout.base import RolloutEngine, SamplingParams, mix_seed
from megatron_sdzero.rollout.sampling import SampledGroup, SampleRequest, sample_and_grade


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
    outcomes: list[int] = field(default_factory=list)  # 1/0 per sample, in sample order ([] if skipped)


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
    token_limit: int | None = None,
    on_batch: Callable[[list[ProblemResult]], None] | None = None,
) -> EvalReport:
    """avg@k and pass@k of the engine's current weights on ``problems``.

    ``token_limit``: prompt + response tokens (the engine's max_model_len); a problem whose prompt
    leaves no room scores 0 on all k samples. ``on_batch``: called with each batch's results as soon
    as they are graded (``sdzero eval`` appends them to its resume log).
    """
    if not problems:
        raise ValueError("evaluate: no problems")
    results: list[ProblemResult] = []
    tokens, generation_s, grading_s = 0, 0.0, 0.0
    params = replace(sampling, n=options.k, logprobs=False)
    for start in range(0, len(problems), options.batch_size):
        batch = problems[start : start + options.batch_size]
        requests = [
            SampleRequest(
                fmt.prompt_ids(build_messages(p.text, p.mode, prompt)), p.reference,
                mix_seed("eval", options.seed, p.id), p.id,
            )
            for p in batch
        ]  # fmt: skip
        sampled = sample_and_grade(engine, grader, fmt, requests, params, token_limit=token_limit)
        generation_s += sampled.generation_s
        grading_s += sampled.grading_s
        tokens += sampled.tokens_generated
        finished = [_problem_result(g, options.k) for g in sampled.groups]
        results.extend(finished)
        if on_batch is not None:
            on_batch(finished)
    scores = benchmark_scores([r.correct for r in results], options.k, options.pass_at)
    return EvalReport(scores, results, tokens, generation_s, grading_s)


def _problem_result(group: SampledGroup, k: int) -> ProblemResult:
    samples = group.samples or []
    return ProblemResult(
        id=group.request.problem_id,
        samples=len(samples) if group.samples is not None else k,
        correct=sum(s.correct for s in samples),
        mean_tokens=sum(len(s.completion.token_ids) for s in samples) / max(1, len(samples)),
        cut_off=sum(s.completion.finish_reason == "length" for s in samples),
        outcomes=[int(s.correct) for s in samples],
    )
