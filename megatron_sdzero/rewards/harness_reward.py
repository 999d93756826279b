"""The code reward for references with a harness (``data.harness``): the response's last code block
is wrapped in the harness and the wrapped program is graded by the sandboxed stdin/stdout tests."""

from __future__ import annotations

from typing import Any

from megatron_sdzero.data.harness import harnessed_program, is_harness_reference
from megatron_sdzero.rewards.base import RewardResult
from megatron_sdzero.rewards.code_reward import CodeReward, extract_last_code_block


class HarnessedCodeReward(CodeReward):
    """CodeReward that also grades function-call problems (LiveCodeBench functional, HumanEval)."""

    def _grade_all(self, responses: list[str], answers: list[Any]) -> list[RewardResult]:
        rewritten, tests = [], []
        for response, answer in zip(responses, answers, strict=True):
            if not is_harness_reference(answer):
                rewritten.append(response)
                tests.append(answer)
                continue
            block = extract_last_code_block(response, self.config.untagged_language)
            if block is None or block.language != "python":
                rewritten.append(response)  # graded as it is: no python block to call into
            else:
                rewritten.append(f"```python\n{harnessed_program(block.code, answer)}\n```")
            tests.append(answer["tests"])
        return super()._grade_all(rewritten, tests)
