"""Sample and grade: the one place that turns prompts into graded completions.

Phase 1 collection, every on-policy algorithm and evaluation call :func:`sample_and_grade`::

    requests = [SampleRequest(prompt_ids, problem.reference, seed, problem.id), ...]
    batch = sample_and_grade(engine, grader, fmt, requests, sampling, token_limit=8192)
    batch.groups[i].samples[j].completion / .result / .correct

One rule caps the response length: a request's ``max_tokens`` is ``sampling.max_tokens`` cut to
the room its prompt leaves under ``token_limit`` (prompt + response). A prompt that leaves no room
is not sampled at all: its group has ``samples=None`` and is counted in ``batch.skipped``.

Stop tokens: the chat format's end-of-turn ids are always added to ``sampling.stop_token_ids``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from megatron_sdzero.rollout.base import Completion, RolloutEngine, SamplingParams


class Grader(Protocol):
    """What sampling needs of a reward (megatron_sdzero.rewards.Reward has it)."""

    def grade_batch(self, responses: Sequence[str], answers: Sequence[Any]) -> Any: ...


@dataclass
class SampleRequest:
    prompt_ids: list[int]
    reference: Any  # what the grader compares against (problem.reference)
    seed: int
    problem_id: str = ""


@dataclass
class GradedSample:
    completion: Completion
    result: Any  # rewards.RewardResult: .score, .reason, .extracted

    @property
    def score(self) -> float:
        return self.result.score

    @property
    def correct(self) -> bool:
        return self.result.score > 0.5


@dataclass
class SampledGroup:
    request: SampleRequest
    samples: list[GradedSample] | None  # None: the prompt leaves no room under the token limit


@dataclass
class SampleBatch:
    groups: list[SampledGroup]
    generation_s: float
    grading_s: float

    @property
    def skipped(self) -> int:
        return sum(group.samples is None for group in self.groups)

    @property
    def samples(self) -> list[GradedSample]:
        return [s for group in self.groups for s in group.samples or ()]

    @property
    def tokens_generated(self) -> int:
        return sum(len(s.completion.token_ids) for s in self.samples)


def response_budget(max_tokens: int, prompt_length: int, token_limit: int | None) -> int | None:
    """Tokens a response may take: ``max_tokens`` within the room left under the limit; None if none."""
    room = max_tokens if token_limit is None else min(max_tokens, token_limit - prompt_length)
    return room if room >= 1 else None


def sample_and_grade(
    engine: RolloutEngine,
    grader: Grader,
    fmt: Any,  # data.formatting.ChatFormat (its stop ids)
    requests: Sequence[SampleRequest],
    sampling: SamplingParams,
    *,
    token_limit: int | None = None,
) -> SampleBatch:
    """``sampling.n`` completions per request, every one graded; one engine call, one grading call."""
    stop_ids = tuple(sorted(set(sampling.stop_token_ids) | fmt.stop_ids))
    params: list[SamplingParams | None] = []
    for request in requests:
        budget = response_budget(sampling.max_tokens, len(request.prompt_ids), token_limit)
        params.append(
            None
            if budget is None
            else replace(sampling, seed=request.seed, stop_token_ids=stop_ids, max_tokens=budget)
        )
    live = [k for k, p in enumerate(params) if p is not None]
    began = time.perf_counter()
    outputs = (
        engine.generate([requests[k].prompt_ids for k in live], [params[k] for k in live]) if live else []
    )
    generation_s = time.perf_counter() - began
    flat = [(requests[k], c) for k, completions in zip(live, outputs, strict=True) for c in completions]
    results: list[Any] = []
    grading_s = 0.0
    if flat:
        graded = grader.grade_batch([c.text for _, c in flat], [r.reference for r, _ in flat])
        results, grading_s = list(graded.results), graded.seconds
    groups = [SampledGroup(request, None) for request in requests]
    cursor = 0
    for k, completions in zip(live, outputs, strict=True):
        groups[k].samples = [GradedSample(c, results[cursor + j]) for j, c in enumerate(completions)]
        cursor += len(completions)
    return SampleBatch(groups, generation_s, grading_s)
