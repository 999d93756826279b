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
        results: list[RewardResult | None] = [None] * len(responses)
        graded, programs, tests = [], [], []
        for k, (response, answer) in enumerate(zip(responses, answers, strict=True)):
            if not is_harness_reference(answer):
                graded.append(k)
                programs.append(response)
                tests.append(answer)
                continue
            block = extract_last_code_block(response, self.config.untagged_language)
            if block is None:
                results[k] = RewardResult(0.0, "no_code_block", "", 0.0)
            elif block.language != "python":  # the harness calls into Python code
                results[k] = RewardResult(0.0, "unsupported_language", block.code, 0.0, block.language)
            else:
                graded.append(k)
                programs.append(f"```python\n{harnessed_program(block.code, answer)}\n```")
                tests.append(answer["tests"])
        for k, result in zip(graded, super()._grade_all(programs, tests), strict=True):
            results[k] = result
        return results  # type: ignore[return-value]
