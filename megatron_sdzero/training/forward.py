"""The SFT forward step: micro-batch -> GPTModel -> masked, vocab-parallel cross-entropy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from megatron_sdzero.losses import masked_cross_entropy
from megatron_sdzero.training.packing import AttentionFormat, MicroBatch, model_inputs
from megatron_sdzero.training.step import loss_log


def run_model(model: Any, batch: MicroBatch, attention: AttentionFormat):
    """Logits [b, s, vocab/TP] (last stage) or hidden states, and the inputs used."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, attention, device)
    output = model(
        inputs.tokens,
        inputs.position_ids,
        inputs.attention_mask,
        packed_seq_params=inputs.packed_seq_params,
    )
    return output, inputs


def make_sft_forward_step(attention: AttentionFormat, valid_vocab_size: int) -> Callable:
    """``forward_step_func`` for ``train_step``: completion-only token-level cross-entropy.

    The loss is the sum over the micro-batch's target tokens (``reduction="sum"``); Megatron's
    per-token loss path divides by the global target-token count (see step.py).
    """

    def forward_step(data_iterator: Iterator[MicroBatch], model: Any):
        output, inputs = run_model(model, next(data_iterator), attention)

        def loss_func(logits):
            loss, metrics = masked_cross_entropy(
                logits, inputs.labels, inputs.loss_mask, valid_vocab_size=valid_vocab_size, reduction="sum"
            )
            tokens = metrics.num_valid_tokens
            return loss, tokens.int(), {"loss": loss_log(loss, tokens)}

        return output, loss_func

    return forward_step
