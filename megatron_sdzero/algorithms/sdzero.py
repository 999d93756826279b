"""SD-Zero Phase 2: the frozen SRT reviser reads x + body(y) + P_r + y; token-level KL on the second y."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sdzero.algorithms.base import BatchContext, TokenSink
from megatron_sdzero.data.formatting import ControlPhrases
from megatron_sdzero.data.problems import Problem
from megatron_sdzero.distill.batch import DistillBatch, RolloutSample, build_batch
from megatron_sdzero.distill.step import LossFn, kl_loss
from megatron_sdzero.losses import DistillLossConfig


@dataclass
class SDZero:
    context: BatchContext
    phrases: ControlPhrases
    loss: DistillLossConfig
    name: str = "sdzero"
    loss_name: str = "kl"
    uses_frozen_model: bool = True

    def build_batch(self, samples: list[RolloutSample], prompts: list[Problem]) -> DistillBatch:
        ctx = self.context
        return build_batch(samples, ctx.fmt, self.phrases, ctx.config, ctx.pad_id)

    def loss_fn(self, token_sink: TokenSink | None = None) -> LossFn:
        return kl_loss(self.loss, self.context.valid_vocab_size, token_sink)

    def batch_metrics(self, batch: DistillBatch) -> dict[str, float]:
        return {}
