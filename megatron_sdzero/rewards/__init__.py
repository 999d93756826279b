"""Binary verifiers r(y, a) in {0, 1}: math (math-verify in killable workers), code (sandboxed tests)
and instruct (IFEval's verifiable instructions).

Both are ``Reward`` objects with ``grade_batch(responses, answers) -> GradedBatch`` (per-item
``RewardResult``: score, reason, extracted answer, seconds) and ``score_batch(...) -> list[float]``.
Build one from config with ``build_reward``; close it (or use ``with``) to stop its worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_sdzero.rewards.base import GradedBatch, Reward, RewardResult
from megatron_sdzero.rewards.code_reward import (
    CodeBlock,
    CodeReward,
    CodeRewardConfig,
    TestCase,
    extract_last_code_block,
    outputs_match,
)
from megatron_sdzero.rewards.harness_reward import HarnessedCodeReward
from megatron_sdzero.rewards.ifeval import IFEvalConfig, IFEvalReward
from megatron_sdzero.rewards.math_reward import MathReward, MathRewardConfig, cap_response, wrap_gold
from megatron_sdzero.rewards.sandbox import SandboxConfig, SandboxReport, SandboxUnavailableError


@dataclass
class RewardConfig:
    mode: Literal["math", "code", "instruct"] = "math"
    math: MathRewardConfig = field(default_factory=MathRewardConfig)
    code: CodeRewardConfig = field(default_factory=CodeRewardConfig)
    ifeval: IFEvalConfig = field(default_factory=IFEvalConfig)


def build_reward(config: RewardConfig) -> Reward:
    """The reward for ``config.mode``; starts its worker processes or checks its sandbox right away."""
    if config.mode == "math":
        return MathReward(config.math)
    if config.mode == "code":
        return HarnessedCodeReward(config.code)  # plain stdin/stdout tests grade exactly as CodeReward
    if config.mode == "instruct":
        return IFEvalReward(config.ifeval)
    raise ValueError(f"unknown reward mode {config.mode!r}; expected 'math', 'code' or 'instruct'")


__all__ = [
    "CodeBlock",
    "CodeReward",
    "CodeRewardConfig",
    "GradedBatch",
    "HarnessedCodeReward",
    "IFEvalConfig",
    "IFEvalReward",
    "MathReward",
    "MathRewardConfig",
    "Reward",
    "RewardConfig",
    "RewardResult",
    "SandboxConfig",
    "SandboxReport",
    "SandboxUnavailableError",
    "TestCase",
    "build_reward",
    "cap_response",
    "extract_last_code_block",
    "outputs_match",
    "wrap_gold",
]
