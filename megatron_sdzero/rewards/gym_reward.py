"""reasoning-gym references inside the math reward: r = 1[the task's ``score_answer`` gives 1.0].

The math reward sends a reference made by :mod:`megatron_sdzero.data.reasoning_gym` here instead of
to math-verify, so a reasoning-gym source needs no reward mode of its own (``reward.mode: math``).
Scorers run in the grading process: they are plain Python on a short extracted answer (the response
is capped first, like math-verify's input).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from megatron_sdzero.data.reasoning_gym import is_gym_reference, score_gym_answer
from megatron_sdzero.rewards.base import RewardResult

EXTRACTED_CHARS = 200


def grade_gym(response: str, reference: Mapping[str, Any]) -> RewardResult:
    started = time.monotonic()
    try:
        score, extracted, reason = score_gym_answer(response, reference)
    except Exception as error:  # a scorer that chokes on an odd answer scores it 0, like math-verify
        score, extracted, reason = 0.0, "", f"error: {type(error).__name__}"
    return RewardResult(score, reason, extracted[:EXTRACTED_CHARS], time.monotonic() - started)


__all__ = ["grade_gym", "is_gym_reference"]
