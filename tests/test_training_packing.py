"""Packed rows give each sample exactly what it gets alone: logits and summed loss (fp32, CPU).

A row holds three samples back to back plus padding; the block-diagonal causal mask keeps them
apart. Without it (plain causal attention over the row) the second and third samples' logits change,
so the comparison can fail. The unit tests check the row layout itself.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sdzero.runtime.launch import run_on_ranks
from megatron_sdzero.training.packing import (
    block_causal_mask,
    collate,
    cu_seqlens,
    first_fit,
    model_inputs,
    schedule_shape,
)

SAMPLES = [
    (list(range(10, 30)), [0] * 8 + [1] * 12),
    (list(range(40, 53)), [0] * 5 + [1] * 8),
    (list(range(60, 77)), [0] * 3 + [1] * 14),
]


def test_collate_shifts_restarts_positions_and_pads() -> None:
    batch = collate([SAMPLES], seq_length=56, pad_id=0)
    assert batch.sample_lengths == [[19, 12, 16]] and batch.packed and batch.num_real_tokens == 47
    assert batch.tokens[0, :19].tolist() == list(range(10, 29))
    assert batch.labels[0, :19].tolist() == list(range(11, 30))
    assert batch.loss_mask[0, :19].tolist() == [0.0] * 7 + [1.0] * 12
    assert batch.tokens[0, 19:31].tolist() == list(range(40, 52))
    assert batch.position_ids[0, 19:22].tolist() == [0, 1, 2] and batch.position_ids[0, 31] == 0
    assert batch.segment_ids[0].tolist() == [0] * 19 + [1] * 12 + [2] * 16 + [3] * 9
    assert batch.loss_mask[0, 47:].sum() == 0 and batch.tokens[0, 47:].eq(0).all()
    assert cu_seqlens(batch).tolist() == [0, 19, 31, 47, 56]
    with pytest.raises(ValueError, match="does not fit"):
        collate([SAMPLES], seq_length=40)


def test_block_causal_mask() -> None:
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))[0, 0]
    allowed = ~mask
    assert allowed.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, False, True, False, False],
        [False, False, True, True, False],
        [False, False, True, True, True],
    ]


def test_first_fit_keeps_rows_within_capacity() -> None:
    lengths = [5, 9, 3, 7, 2, 6, 4]
    rows = first_fit(lengths, list(range(7)), capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == [[0, 2, 4], [1], [3], [5, 6]]
    with pytest.raises(ValueError, match="more than a row"):
        first_fit([11], [0], capacity=10)


def test_thd_flattens_the_micro_batch() -> None:
    pytest.importorskip("megatron.core")
    batch = collate([SAMPLES[:2], SAMPLES[2:]], seq_length=32)
    inputs = model_inputs(batch, "thd", torch.device("cpu"))
    assert inputs.tokens.shape == (1, 64) and inputs.attention_mask is None
    params = inputs.packed_seq_params
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 19, 31, 32, 48, 64]
    assert params.max_seqlen_q == 19
    assert schedule_shape("thd", 2, 32) == (64, 1) and schedule_shape("mask", 2, 32) == (32, 2)


def _packed_vs_alone(mcore: str) -> dict:
    from pathlib import Path

    from megatron_sdzero.conversion.megatron_io import ModelMeta
    from megatron_sdzero.losses import masked_cross_entropy
    from megatron_sdzero.models.builder import ModelConfig
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel
    from megatron_sdzero.training import checkpoint
    from megatron_sdzero.training.forward import run_model
    from megatron_sdzero.training.setup import build_frozen

    init_model_parallel(ParallelConfig())
    arch = ModelMeta.read(Path(mcore)).arch
    (model,) = build_frozen(arch, ModelConfig(params_dtype="float32", transformer_impl="local"))
    checkpoint.finetune_from(mcore, [model])

    def loss_and_logits(batch, attention):
        with torch.no_grad():
            logits, inputs = run_model(model, batch, attention)
            loss, _ = masked_cross_entropy(
                logits.clone(),
                inputs.labels,
                inputs.loss_mask,
                valid_vocab_size=arch.vocab_size,
                reduction="sum",
            )
        return loss.item(), logits[..., : arch.vocab_size]

    packed = collate([SAMPLES], seq_length=56)
    packed_loss, packed_logits = loss_and_logits(packed, "mask")
    with torch.no_grad():  # the same row with plain causal attention: samples see their predecessors
        leaky_logits = model(packed.tokens, packed.position_ids, None)[..., : arch.vocab_size]
    alone_loss, diffs, leaks, offset = 0.0, [], [], 0
    for sample in SAMPLES:
        n = len(sample[0]) - 1
        loss, logits = loss_and_logits(collate([[sample]], seq_length=n), "causal")
        alone_loss += loss
        diffs.append((packed_logits[0, offset : offset + n] - logits[0]).abs().max().item())
        leaks.append((leaky_logits[0, offset : offset + n] - logits[0]).abs().max().item())
        offset += n
    return {"packed_loss": packed_loss, "alone_loss": alone_loss, "diffs": diffs, "leaks": leaks}


def test_packed_logits_and_loss_equal_each_sample_alone(tiny_hf_models, tmp_path_factory) -> None:
    from test_training_parallel import training_setup

    mcore = training_setup(tiny_hf_models, tmp_path_factory)["mcore"]
    (result,) = run_on_ranks(_packed_vs_alone, 1, mcore, timeout_s=300)
    assert max(result["diffs"]) < 2e-5, result["diffs"]
    assert result["packed_loss"] == pytest.approx(result["alone_loss"], rel=1e-6)
    # Without the mask the later samples see the earlier ones: the check has teeth.
    assert result["leaks"][0] < 2e-5 and min(result["leaks"][1:]) > 1e-2, result["leaks"]
