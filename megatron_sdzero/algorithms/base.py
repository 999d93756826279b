"""What an on-policy algorithm supplies to the shared loop: its batch builder and its loss.

Everything else (prompts per step, sampling and grading, the frozen model's forward, Megatron's
schedule, the optimizer, weight refresh, teacher synchronisation, logging, eval, checkpoints and
the budget) is the same for all of them and lives in :mod:`megatron_sdzero.algorithms.onpolicy`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from megatron_sdzero.data.problems import Problem
from megatron_sdzero.distill.batch import DistillBatch, RolloutSample
from megatron_sdzero.distill.step import LossFn

TokenSink = Callable[[DistillBatch, torch.Tensor], None]  # (micro-batch, per-token values [b, K])


class Algorithm(Protocol):
    name: str
    loss_name: str  # how the step's loss is called in the log (kl, pg_loss)
    uses_frozen_model: bool  # a teacher (SD-Zero, SDFT) or reference model (GRPO with a KL term)

    def build_batch(self, samples: list[RolloutSample], prompts: list[Problem]) -> DistillBatch:
        """This replica's graded samples (``sample.group`` indexes ``prompts``) -> model inputs."""
        ...

    def loss_fn(self, token_sink: TokenSink | None = None) -> LossFn: ...

    def batch_metrics(self, batch: DistillBatch) -> dict[str, float]:
        """Sums over this replica's batch that the log adds up over replicas (may be empty)."""
        ...


@dataclass
class BatchContext:
    """What the builders share: the chat format, the batch limits, the padding id, the prompt."""

    fmt: Any  # data.formatting.ChatFormat
    config: Any  # distill.batch.BatchConfig
    pad_id: int
    prompt: Any  # data.formatting.PromptConfig
    valid_vocab_size: int
