"""Sequence packing: several SFT samples per row, each attending only to itself.

A sample of n ids gives n - 1 (input, label) pairs. Rows hold whole samples back to back, then
padding (loss mask 0). Attention boundaries reach the model in one of two forms:

- ``thd`` (TransformerEngine, GPU): the micro-batch is flattened to one stream and described by
  ``PackedSeqParams`` (cumulative sequence lengths); TE's varlen attention and RoPE restart at each
  sample boundary.
- ``mask`` (the local spec, CPU): a block-diagonal causal boolean mask [b, 1, s, s] (True = masked)
  for Megatron's DotProductAttention. Its RoPE positions run on across a row; attention scores depend
  only on the difference of positions within a sample, so the result equals the per-sample
  computation up to floating-point rounding (tested).

Rows with a single sample need neither: plain causal attention, padding at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

AttentionFormat = Literal["causal", "thd", "mask"]


def first_fit(
    lengths: Sequence[int], order: Sequence[int], capacity: int, window: int = 64
) -> list[list[int]]:
    """Pack samples (visited in ``order``) into rows of ``capacity`` tokens, first fit.

    Only the ``window`` most recently opened rows are searched, which keeps packing linear in the
    number of samples; rows come out in the order they were opened.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sample {index} has {length} tokens, more than a row ({capacity})")
        start = max(0, len(rows) - window)
        for row in range(start, len(rows)):
            if room[row] >= length:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(capacity - length)
    return rows


@dataclass
class MicroBatch:
    """Model inputs of one micro-batch, [rows, seq] each (CPU tensors until ``to``)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor  # float32, 1 on target tokens
    position_ids: torch.Tensor  # restart at 0 for every sample
    segment_ids: torch.Tensor  # sample index within the row; padding has its own segment
    sample_lengths: list[list[int]]  # per row, the (input) lengths of its samples, in order

    @property
    def packed(self) -> bool:
        return any(len(row) > 1 for row in self.sample_lengths)

    @property
    def num_real_tokens(self) -> int:
        return sum(sum(row) for row in self.sample_lengths)

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(
            tokens=self.tokens.to(device),
            labels=self.labels.to(device),
            loss_mask=self.loss_mask.to(device),
            position_ids=self.position_ids.to(device),
            segment_ids=self.segment_ids.to(device),
            sample_lengths=self.sample_lengths,
        )


def collate(
    rows: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]], seq_length: int, pad_id: int = 0
) -> MicroBatch:
    """Rows of samples ``(input_ids, loss_mask)`` -> a [len(rows), seq_length] micro-batch.

    Each sample is shifted into inputs ids[:-1] and labels ids[1:] (mask[1:]); a row's samples
    must fit into seq_length inputs.
    """
    shape = (len(rows), seq_length)
    tokens = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, pad_id, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.zeros(shape, dtype=torch.long)
    lengths: list[list[int]] = []
    for r, row in enumerate(rows):
        offset, row_lengths = 0, []
        for s, (ids, mask) in enumerate(row):
            n = len(ids) - 1
            if n < 1 or offset + n > seq_length:
                raise ValueError(f"row {r}: sample {s} ({len(ids)} ids) does not fit {seq_length} inputs")
            span = slice(offset, offset + n)
            tokens[r, span] = torch.as_tensor(ids[:-1])
            labels[r, span] = torch.as_tensor(ids[1:])
            loss_mask[r, span] = torch.as_tensor(mask[1:], dtype=torch.float32)
            positions[r, span] = torch.arange(n)
            segments[r, span] = s
            row_lengths.append(n)
            offset += n
        positions[r, offset:] = torch.arange(seq_length - offset)
        segments[r, offset:] = len(row)
        lengths.append(row_lengths)
    return MicroBatch(tokens, labels, loss_mask, positions, segments, lengths)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where query i must not see key j (other sample, or j > i)."""
    seq = segment_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    return ~(same & causal).unsqueeze(1)


def cu_seqlens(batch: MicroBatch) -> torch.Tensor:
    """Cumulative boundaries of every sample (and each row's padding) in the flattened micro-batch."""
    seq = batch.tokens.shape[1]
    bounds = [0]
    for row in batch.sample_lengths:
        for n in row:
            bounds.append(bounds[-1] + n)
        padding = seq - sum(row)
        if padding:
            bounds.append(bounds[-1] + padding)
    return torch.tensor(bounds, dtype=torch.int32)


def thd_packed_seq_params(batch: MicroBatch, device: torch.device):
    """``PackedSeqParams`` for the micro-batch flattened into one [1, rows * seq] stream."""
    from megatron.core.packed_seq_params import PackedSeqParams

    bounds = cu_seqlens(batch).to(device)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=bounds,
        cu_seqlens_kv=bounds,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


@dataclass
class ModelInputs:
    """What GPTModel.forward takes, plus the labels and mask in the same layout as its logits."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    packed_seq_params: object | None
    labels: torch.Tensor
    loss_mask: torch.Tensor


def attention_format(packing: bool, transformer_engine: bool) -> AttentionFormat:
    """One format per run, so every micro-batch has the same shape on the pipeline."""
    if not packing:
        return "causal"
    return "thd" if transformer_engine else "mask"


def schedule_shape(attention: AttentionFormat, micro_batch_size: int, seq_length: int) -> tuple[int, int]:
    """(seq_length, micro_batch_size) as Megatron's schedules see them: THD flattens the rows."""
    if attention == "thd":
        return micro_batch_size * seq_length, 1
    return seq_length, micro_batch_size


def model_inputs(batch: MicroBatch, attention: AttentionFormat, device: torch.device) -> ModelInputs:
    """Inputs for a micro-batch: plain causal, a block-diagonal mask (local spec) or THD (TE)."""
    batch = batch.to(device)
    if attention == "causal":
        if batch.packed:
            raise ValueError("a packed micro-batch needs attention format 'mask' or 'thd'")
        return ModelInputs(batch.tokens, batch.position_ids, None, None, batch.labels, batch.loss_mask)
    if attention == "mask":
        mask = block_causal_mask(batch.segment_ids)
        return ModelInputs(batch.tokens, batch.position_ids, mask, None, batch.labels, batch.loss_mask)
    flat = lambda t: t.reshape(1, -1)
    return ModelInputs(
        flat(batch.tokens),
        flat(batch.position_ids),
        None,
        thd_packed_seq_params(batch, device),
        flat(batch.labels),
        flat(batch.loss_mask),
    )
