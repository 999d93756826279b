"""Vocab-parallel losses: student/teacher divergences (Phase 2) and masked cross-entropy (SFT).

Every function takes this rank's [..., vocab/TP] logit shard and the tensor-parallel group and never
gathers the vocabulary; see ``api.py`` for the reduction rules and ``full_vocab.py`` / ``topk.py``
for the math.
"""

from megatron_sdzero.losses.api import (
    LossMetrics,
    count_valid_tokens,
    distill_loss,
    masked_cross_entropy,
    megatron_loss_scale,
    token_weights,
)
from megatron_sdzero.losses.config import DistillLossConfig

__all__ = [
    "DistillLossConfig",
    "LossMetrics",
    "count_valid_tokens",
    "distill_loss",
    "masked_cross_entropy",
    "megatron_loss_scale",
    "token_weights",
]
