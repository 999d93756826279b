"""GRPO (DeepSeekMath, Shao et al. 2024): group-relative advantages and a PPO-clip surrogate.

Each prompt's ``sampling.n`` responses form its group; advantage_i = (r_i - mean) / (std + eps)
within the group (``grpo.scale_by_std: false``: Dr. GRPO, no division). The loss is
:func:`megatron_sdzero.losses.policy.grpo_loss` on the vocab-parallel log-probs of the sampled
tokens at the sampling temperature; with ``grpo.loss.kl_coef > 0`` a frozen reference model (the
starting checkpoint) reads the same sequence and adds the k3 KL. One optimizer step per rollout
batch, so the sampling policy is the current one (ratio 1, the clip inactive, the gradient the
policy gradient). Groups whose rewards are all equal carry no gradient and are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sdzero.algorithms.base import BatchContext, TokenSink
from megatron_sdzero.algorithms.config import GRPOConfig
from megatron_sdzero.data.problems import Problem
from megatron_sdzero.distill.batch import DistillBatch, RolloutSample, assemble, conditioned_row
from megatron_sdzero.distill.step import LossFn
from megatron_sdzero.losses.policy import group_advantages, grpo_loss, token_logprobs
from megatron_sdzero.training.step import loss_log


@dataclass
class GRPO:
    context: BatchContext
    config: GRPOConfig
    name: str = "grpo"
    loss_name: str = "pg_loss"
    last_groups: tuple[int, int] = (0, 0)  # (groups, groups with all-equal rewards) of the last batch

    @property
    def uses_frozen_model(self) -> bool:
        return self.config.loss.kl_coef > 0

    def build_batch(self, samples: list[RolloutSample], prompts: list[Problem]) -> DistillBatch:
        ctx = self.context
        rows = [
            conditioned_row(s, s.prompt_ids if self.uses_frozen_model else None, ctx.config) for s in samples
        ]
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        groups = torch.tensor([s.group for s in samples], dtype=torch.long)
        advantages, flat = group_advantages(rewards, groups, scale_by_std=self.config.scale_by_std)
        self.last_groups = (len(set(groups.tolist())), flat)
        return assemble(
            rows, samples, ctx.config, ctx.pad_id, with_teacher=self.uses_frozen_model, advantages=advantages
        )

    def batch_metrics(self, batch: DistillBatch) -> dict[str, float]:
        groups, flat = self.last_groups
        return {"groups": float(groups), "zero_advantage_groups": float(flat)}

    def loss_fn(self, token_sink: TokenSink | None = None) -> LossFn:
        loss_config, vocab = self.config.loss, self.context.valid_vocab_size

        def loss_func(student: torch.Tensor, reference: torch.Tensor | None, batch: DistillBatch):
            mask = batch.loss_mask & (batch.sample_weights[:, None] != 0)
            logprobs = token_logprobs(
                student, batch.targets, temperature=loss_config.temperature, valid_vocab_size=vocab
            )
            ref = None
            if reference is not None:
                with torch.no_grad():
                    ref = token_logprobs(
                        reference, batch.targets, temperature=loss_config.temperature, valid_vocab_size=vocab
                    )
            loss, metrics = grpo_loss(logprobs, mask, batch.advantages, loss_config, ref_logprobs=ref)
            if token_sink is not None:
                token_sink(batch, (-logprobs.detach() * mask).float())
            tokens = metrics.num_tokens
            logs = {
                "loss": loss_log(loss, metrics.count),
                "clip_fraction": loss_log(metrics.clipped_tokens, tokens),
                "ratio_mean": loss_log(metrics.ratio_sum, tokens),
                "ref_kl": loss_log(metrics.kl_sum, tokens),
            }
            return loss, metrics.count.int(), logs

        return loss_func
