"""One batch of SRT collection: sample y_init, grade, revise, grade, keep the verified revisions.

Sampling is deterministic per problem: the seed of a problem's initial responses is derived from
(collect.seed, problem id) and that of the revisions of its i-th response from (collect.seed,
problem id, i), so a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_sdzero.data.formatting import ChatFormat, ControlPhrases, PromptConfig, build_messages
from megatron_sdzero.data.problems import Problem
from megatron_sdzero.rollout.base import RolloutEngine, SamplingParams, mix_seed
from megatron_sdzero.rollout.sampling import GradedSample, Grader, SampleRequest, sample_and_grade
from megatron_sdzero.srt.store import Counters


@dataclass
class CollectConfig:
    output_dir: Path = Path("outputs/srt")
    target: int = 6000  # stop once this many tuples are kept
    batch_size: int = 64  # problems per batch (one commit per batch)
    num_responses: int = 3  # y_init per problem (reference script: 3; its README: 1)
    num_revisions: int = 3  # y_revised per revised y_init (reference script: 3; its README: 1)
    revise_correct: bool = False  # also revise correct y_init, with the r = 1 phrase
    revise: bool = True  # false: keep the verified-correct initial responses themselves (RFT)
    seed: int = 0
    shuffle: bool = False  # seeded shuffle of the problem order
    shard_index: int = 0
    num_shards: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        from megatron_sdzero.config import ConfigError

        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"collect.shard_index: {self.shard_index} is not in [0, {self.num_shards})")
        for name in ("target", "batch_size", "num_responses", "num_revisions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"collect.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class BatchOutput:
    tuples: list[dict]
    attempts: list[dict]
    counters: Counters


@dataclass
class Request:
    """A prompt to sample; for a revision, also the y_init it revises and the phrase used."""

    problem: Problem
    prompt: list[int]
    seed: int
    init_index: int | None = None
    y_init: GradedSample | None = None
    phrase: str | None = None


@dataclass
class Answered:
    request: Request
    samples: list[GradedSample] | None  # None: the prompt leaves no room under max_model_len


class Collector:
    def __init__(
        self,
        engine: RolloutEngine,
        grader: Grader,
        fmt: ChatFormat,
        phrases: ControlPhrases,
        sampling: SamplingParams,
        collect: CollectConfig,
        prompt: PromptConfig,
        max_model_len: int,
    ) -> None:
        self.engine, self.grader, self.fmt, self.phrases = engine, grader, fmt, phrases
        self.sampling, self.collect, self.prompt = sampling, collect, prompt
        self.max_model_len = max_model_len

    def run_batch(self, problems: Sequence[Problem]) -> BatchOutput:
        counters = Counters(problems=len(problems), batches=1)
        inits = self._answer([self._first_request(p) for p in problems], self.collect.num_responses, counters)
        if not self.collect.revise:
            return self._kept_initial(inits, counters)
        to_revise = [self._revision_request(a.request, i, y) for a in inits for i, y in self._revisable(a)]
        revisions = self._answer(to_revise, self.collect.num_revisions, counters)
        tuples = [
            self._tuple(a.request, j, y)
            for a in revisions
            for j, y in enumerate(a.samples or ())
            if y.correct
        ]
        init_samples = [y for a in inits for y in a.samples or ()]
        revision_samples = [y for a in revisions for y in a.samples or ()]
        counters.init_attempts, counters.init_correct = (
            len(init_samples),
            sum(y.correct for y in init_samples),
        )
        counters.revision_attempts = len(revision_samples)
        counters.revision_correct = sum(y.correct for y in revision_samples)
        counters.tuples_kept = len(tuples)
        attempts = [record for a in inits + revisions for record in _attempt_records(a)]
        return BatchOutput(tuples, attempts, counters)

    def _kept_initial(self, inits: list[Answered], counters: Counters) -> BatchOutput:
        """Generation-only collection (RFT): every verified-correct y_init is a kept record."""
        samples = [(a.request, i, y) for a in inits for i, y in enumerate(a.samples or ())]
        records = [self._response_record(request, i, y) for request, i, y in samples if y.correct]
        counters.init_attempts = len(samples)
        counters.init_correct = counters.tuples_kept = len(records)
        attempts = [record for a in inits for record in _attempt_records(a)]
        return BatchOutput(records, attempts, counters)

    def _problem_fields(self, problem: Problem) -> dict:
        """What every kept record says of its problem."""
        return {
            "problem_id": problem.id,
            "mode": problem.mode,
            "problem": problem.text,
            "answer": problem.answer,
            "messages": build_messages(problem.text, problem.mode, self.prompt),
        }

    def _response_record(self, request: Request, index: int, y: GradedSample) -> dict:
        return {
            **self._problem_fields(request.problem),
            "index": index,
            "y": y.completion.text,
            "y_ids": list(y.completion.token_ids),
            "finish": y.completion.finish_reason,
            "reward": y.result.score,
        }

    def _first_request(self, problem: Problem) -> Request:
        prompt = self.fmt.prompt_ids(build_messages(problem.text, problem.mode, self.prompt))
        return Request(problem, prompt, mix_seed(self.collect.seed, problem.id, "init"))

    def _revisable(self, answered: Answered) -> list[tuple[int, GradedSample]]:
        samples = enumerate(answered.samples or ())
        return [(i, y) for i, y in samples if self.collect.revise_correct or not y.correct]

    def _revision_request(self, first: Request, index: int, y_init: GradedSample) -> Request:
        phrase = self.phrases.for_reward(y_init.result.score)
        prompt = self.fmt.revision_prompt(first.prompt, y_init.completion.token_ids, phrase)
        seed = mix_seed(self.collect.seed, first.problem.id, "revise", index)
        return Request(first.problem, prompt, seed, index, y_init, phrase)

    def _answer(self, requests: list[Request], n: int, counters: Counters) -> list[Answered]:
        """Sample n completions per request and grade them all in one call."""
        sampled = sample_and_grade(
            self.engine, self.grader, self.fmt,
            [SampleRequest(r.prompt, r.problem.reference, r.seed, r.problem.id) for r in requests],
            dataclasses.replace(self.sampling, n=n), token_limit=self.max_model_len,
        )  # fmt: skip
        counters.skipped_prompts += sampled.skipped
        counters.generation_s += sampled.generation_s
        counters.grading_s += sampled.grading_s
        counters.tokens_generated += sampled.tokens_generated
        return [Answered(r, g.samples) for r, g in zip(requests, sampled.groups, strict=True)]

    def _tuple(self, request: Request, revision_index: int, y_rev: GradedSample) -> dict:
        y_init = request.y_init
        return {
            **self._problem_fields(request.problem),
            "init_index": request.init_index,
            "revision_index": revision_index,
            "init_correct": y_init.correct,
            "init_reward": y_init.result.score,
            "phrase": request.phrase,
            "y_init": y_init.completion.text,
            "y_init_ids": list(y_init.completion.token_ids),
            "y_init_finish": y_init.completion.finish_reason,
            "y_revised": y_rev.completion.text,
            "y_revised_ids": list(y_rev.completion.token_ids),
            "y_revised_finish": y_rev.completion.finish_reason,
            "revised_reward": y_rev.result.score,
        }


def _attempt_records(answered: Answered) -> list[dict]:
    """attempts.jsonl lines of one request: one per sample, or one "skipped" line."""
    request = answered.request
    stage = "init" if request.y_init is None else "revision"
    if answered.samples is None:
        skipped = {
            "kind": "skipped",
            "stage": stage,
            "init_index": request.init_index,
            "reason": "prompt_too_long",
        }
        return [{"problem_id": request.problem.id, **skipped}]
    return [_attempt(request, stage, j, y) for j, y in enumerate(answered.samples)]


def _attempt(request: Request, stage: str, j: int, y: GradedSample) -> dict:
    revising = stage == "revision"
    return {
        "problem_id": request.problem.id,
        "kind": stage,
        "init_index": request.init_index if revising else j,
        "revision_index": j if revising else None,
        "phrase": request.phrase,
        "init_reward": request.y_init.result.score if revising else None,
        "reward": y.result.score,
        "reason": getattr(y.result, "reason", ""),
        "extracted": getattr(y.result, "extracted", ""),
        "finish_reason": y.completion.finish_reason,
        "num_tokens": len(y.completion.token_ids),
        "text": y.completion.text,
    }
