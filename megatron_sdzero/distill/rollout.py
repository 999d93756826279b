"""Which prompts an on-policy step takes, and which replica samples them.

Step s (1-based) takes the prompts at positions (s - 1) * P ... s * P - 1 of an endless sequence of
seeded shuffles of the problem set (one shuffle per epoch), so the data position is a function of
the step and a resumed run draws exactly the prompts an uninterrupted one would. The step's
prompts are dealt to the data-parallel replicas (replica r takes every dp-th prompt); each
replica's engine rank samples ``sampling.n`` responses per prompt, with seeds drawn from
(schedule seed, step, problem id), and grades them (``algorithms.onpolicy.generate``).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

from megatron_sdzero.data.problems import Problem


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
