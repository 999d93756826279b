"""The on-policy half of a step: which prompts, sampled by whom, graded how.

Step s (1-based) takes the prompts at positions (s - 1) * P ... s * P - 1 of an endless sequence of
seeded shuffles of the problem set (one shuffle per epoch), so the data position is a function of
the step and a resumed run draws exactly the prompts an uninterrupted one would. The step's
prompts are dealt to the data-parallel replicas (replica r takes every dp-th prompt); each
replica's engine rank samples ``sampling.n`` responses per prompt, with seeds drawn from
(schedule seed, step, problem id), grades them, and hands the graded samples to its
model-parallel group.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from megatron_sdzero.data.formatting import ChatFormat, PromptConfig, build_messages
from megatron_sdzero.data.problems import Problem
from megatron_sdzero.distill.batch import RolloutSample
from megatron_sdzero.rollout.base import SamplingParams, mix_seed


@dataclass
class RolloutBatch:
    samples: list[RolloutSample]
    generation_s: float
    grading_s: float


@functools.lru_cache(maxsize=4)
def _epoch_order(num: int, seed: int, epoch: int, shuffle: bool) -> tuple[int, ...]:
    order = list(range(num))
    if shuffle:
        random.Random(f"distill-order:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def step_prompts(
    problems: Sequence[Problem], step: int, per_step: int, seed: int, shuffle: bool
) -> list[Problem]:
    """The prompts of step ``step`` (1-based), over all data-parallel replicas."""
    first = (step - 1) * per_step
    picked = []
    for position in range(first, first + per_step):
        epoch, index = divmod(position, len(problems))
        picked.append(problems[_epoch_order(len(problems), seed, epoch, shuffle)[index]])
    return picked


def total_steps(num_problems: int, per_step: int, train_iters: int, epochs: int | None) -> int:
    if epochs is None:
        return train_iters
    return min(train_iters, max(1, epochs * num_problems // per_step))


def replica_share(prompts: list[Problem], dp_rank: int, dp_size: int) -> list[Problem]:
    if len(prompts) % dp_size:
        raise ValueError(
            f"{len(prompts)} prompts per step do not split over {dp_size} data-parallel replicas"
        )
    return prompts[dp_rank::dp_size]


def sample_and_grade(
    engine: Any,
    grader: Any,
    fmt: ChatFormat,
    problems: list[Problem],
    sampling: SamplingParams,
    *,
    step: int,
    seed: int,
    prompt: PromptConfig,
    student_max_tokens: int,
) -> RolloutBatch:
    """Sample ``sampling.n`` responses per problem with the engine and grade them (engine rank)."""
    prompts = [fmt.prompt_ids(build_messages(p.text, p.mode, prompt)) for p in problems]
    stop_ids = tuple(sorted(set(sampling.stop_token_ids) | fmt.stop_ids))
    params = [
        replace(
            sampling,
            seed=mix_seed("distill", seed, step, problem.id),
            stop_token_ids=stop_ids,
            max_tokens=max(1, min(sampling.max_tokens, student_max_tokens - len(ids))),
            logprobs=False,
        )
        for problem, ids in zip(problems, prompts, strict=True)
    ]
    began = time.perf_counter()
    outputs = engine.generate(prompts, params)
    generation_s = time.perf_counter() - began
    completions = [(i, c) for i, group in enumerate(outputs) for c in group]
    graded = grader.grade_batch(
        [c.text for _, c in completions], [problems[i].reference for i, _ in completions]
    )
    samples = [
        RolloutSample(prompts[i], list(c.token_ids), score, c.finish_reason, problems[i].id)
        for (i, c), score in zip(completions, graded.scores, strict=True)
    ]
    return RolloutBatch(samples, generation_s, graded.seconds)
