"""SDFT (Shenfeld et al. 2026): the teacher is the model shown a demonstration in context.

    student = chat(x) + y            teacher = chat(template(x, y*)) + y      loss on y

with the same token-level divergence as SD-Zero. The teacher is the frozen starting model
(``teacher.sync: none``) or an EMA of the student (``teacher.sync: ema``). Every problem must
carry a reference solution y* (``Problem.solution``: OpenR1-Math's solution column; generated
problems write their worked steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_sdzero.algorithms.base import BatchContext, TokenSink
from megatron_sdzero.algorithms.config import SDFTConfig
from megatron_sdzero.config import ConfigError
from megatron_sdzero.data.formatting import build_messages
from megatron_sdzero.data.problems import Problem
from megatron_sdzero.distill.batch import DistillBatch, RolloutSample, assemble, conditioned_row
from megatron_sdzero.distill.step import LossFn, kl_loss
from megatron_sdzero.losses import DistillLossConfig


def require_solutions(problems: list[Problem], where: str) -> None:
    missing = [p for p in problems if not p.solution]
    if missing:
        raise ConfigError(
            f"algorithm sdft needs a reference solution for every problem, but {len(missing)} of "
            f"{len(problems)} problems in {where} have none (first: {missing[0].id}); use a source with a "
            "solution column (OpenR1-Math's 'solution') or generated problems"
        )


def teacher_prompt(problem: Problem, config: SDFTConfig, context: BatchContext) -> list[int]:
    text = config.template.format(problem=problem.text, solution=problem.solution)
    return context.fmt.prompt_ids(build_messages(text, problem.mode, context.prompt))


@dataclass
class SDFT:
    context: BatchContext
    loss: DistillLossConfig
    config: SDFTConfig = field(default_factory=SDFTConfig)
    name: str = "sdft"
    loss_name: str = "kl"
    uses_frozen_model: bool = True

    def build_batch(self, samples: list[RolloutSample], prompts: list[Problem]) -> DistillBatch:
        ctx = self.context
        teachers = {s.group: teacher_prompt(prompts[s.group], self.config, ctx) for s in samples}
        rows = [conditioned_row(s, teachers[s.group], ctx.config) for s in samples]
        return assemble(rows, samples, ctx.config, ctx.pad_id)

    def loss_fn(self, token_sink: TokenSink | None = None) -> LossFn:
        return kl_loss(self.loss, self.context.valid_vocab_size, token_sink)

    def batch_metrics(self, batch: DistillBatch) -> dict[str, float]:
        return {}
