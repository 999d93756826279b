"""Teacher-top-k divergences on vocab-parallel shards.

The k ids are the teacher's most likely ones over the whole vocabulary: every rank takes its local
top-k (at most its shard width), the candidates are all-gathered over the tensor-parallel group and
every rank picks the same global top-k from them. The student's logits at those ids are gathered
from their owners (all-reduce MAX of [tokens, k]).

Two ways to form distributions over "buckets" from the k ids:
- renormalised (the reference code): k buckets, both softmaxes taken over the k ids only;
- with tail (``top_k_tail``): k + 1 buckets, the last one holding all the mass outside the top-k,
  computed directly as a log-sum-exp over the other ids (not as 1 - sum, which cancels).

With bucket logits u_b = log sum_{i in b} exp(s_i), any divergence f of the bucket distributions
has d f / d s_i = exp(s_i - u_b(i)) * d f / d u_b(i): a top-k id's gradient is its bucket gradient,
and every id in the tail shares the tail bucket's gradient in proportion to its student probability.
"""

from __future__ import annotations

import torch

from megatron_sdzero.losses._torch_kernels import (
    NEG_BIG,
    GradSpec,
    _load_rows,
    _log_mixture,
    _row_chunks,
    _shift_by_max,
    _weighted_sum,
)
from megatron_sdzero.losses.full_vocab import PassSettings, row_coefficients
from megatron_sdzero.losses.parallel import VocabShard, all_gather_last_dim, all_reduce_max_, all_reduce_sum_


def _mix(forward_weight: float, reverse: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """(1 - w) reverse + w forward, leaving out a term whose weight is 0 (it may be infinite)."""
    if forward_weight == 0.0:
        return reverse
    if forward_weight == 1.0:
        return forward
    return (1.0 - forward_weight) * reverse + forward_weight * forward


def bucket_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: GradSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence per row between softmax(student_logits) and softmax(teacher_logits), [rows, buckets].

    Returns (values [rows], d values / d student_logits [rows, buckets]), float32.
    """
    lp = torch.log_softmax(student_logits, dim=-1)
    lq = torch.log_softmax(teacher_logits, dim=-1)
    p, q = lp.exp(), lq.exp()
    if spec.kind == "jsd":
        beta = spec.jsd_beta
        lm = _log_mixture(lp, lq, beta)
        student_term = _weighted_sum(p, lp - lm)
        values = beta * _weighted_sum(q, lq - lm) + (1.0 - beta) * student_term
        grad = (1.0 - beta) * torch.where(p > 0, p * (lp - lm - student_term[:, None]), 0.0)
        return values, grad
    reverse = _weighted_sum(p, lp - lq)
    forward = _weighted_sum(q, lq - lp)
    w = spec.forward_weight
    reverse_grad = torch.where(p > 0, p * (lp - lq - reverse[:, None]), 0.0)
    return _mix(w, reverse, forward), _mix(w, reverse_grad, p - q)


def select_teacher_top_k(
    teacher: torch.Tensor, active: torch.Tensor, k: int, settings: PassSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k ids [tokens, k] of the teacher and its scaled logits there; inactive rows get id 0."""
    shard = settings.shard
    if k > shard.valid_vocab_size:
        raise ValueError(f"top_k={k} exceeds the {shard.valid_vocab_size} valid vocabulary ids")
    width = min(k, shard.size)  # candidates per rank: the same on every rank, for the all-gather
    local_k = min(width, shard.valid_columns)
    n_rows = teacher.shape[0]
    values = torch.full((n_rows, width), float("-inf"), dtype=torch.float32, device=teacher.device)
    ids = torch.zeros((n_rows, width), dtype=torch.int64, device=teacher.device)
    for rows in _row_chunks(active, settings.chunk_tokens) if local_k > 0 else ():
        # top-k in the logits' own dtype over the valid columns: no float32 copy of the chunk
        chunk_values, chunk_cols = teacher[rows][:, : shard.valid_columns].topk(local_k, dim=-1)
        values[rows, :local_k] = chunk_values.to(torch.float32) * settings.inv_temp
        ids[rows, :local_k] = chunk_cols + shard.start
    all_values = all_gather_last_dim(values, shard.group)
    all_ids = all_gather_last_dim(ids, shard.group)
    top_values, picked = all_values.topk(k, dim=-1)
    return all_ids.gather(1, picked), top_values


def gather_student_at(student: torch.Tensor, ids: torch.Tensor, settings: PassSettings) -> torch.Tensor:
    """Scaled student logits at global ids [tokens, k], from whichever rank owns each id."""
    shard = settings.shard
    owned = shard.owns(ids) & (ids < shard.valid_vocab_size)
    local_cols = (ids - shard.start).clamp(0, shard.size - 1)
    picked = student.gather(1, local_cols).to(torch.float32) * settings.inv_temp
    return all_reduce_max_(torch.where(owned, picked, float("-inf")), shard.group)


def _owned_columns(ids: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, local column) of the ids this rank owns."""
    owned = shard.owns(ids)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    return rows[owned], (ids - shard.start)[owned]


def _local_tail_stats(
    logits: torch.Tensor, ids: torch.Tensor, active: torch.Tensor, settings: PassSettings
) -> torch.Tensor:
    """Per row over this shard, ids outside the top-k only: [max, sum exp(x - max)]."""
    out = torch.zeros(logits.shape[0], 2, dtype=torch.float32, device=logits.device)
    out[:, 0] = NEG_BIG
    for rows in _row_chunks(active, settings.chunk_tokens):
        chunk = _load_rows(logits, rows, settings.shard, settings.inv_temp)
        chunk_rows, cols = _owned_columns(ids[rows], settings.shard)
        chunk[chunk_rows, cols] = float("-inf")
        shifted, row_max = _shift_by_max(chunk)
        out[rows, 0], out[rows, 1] = row_max, shifted.exp_().sum(dim=-1)
    return out


def tail_log_sum_exp(
    logits: torch.Tensor, ids: torch.Tensor, active: torch.Tensor, settings: PassSettings
) -> torch.Tensor:
    """Global [max, log sum exp(x - max)] per row over all valid ids outside the top-k."""
    local = _local_tail_stats(logits, ids, active, settings)
    global_max = all_reduce_max_(local[:, 0].clone(), settings.shard.group)
    total = all_reduce_sum_(local[:, 1] * (local[:, 0] - global_max).exp(), settings.shard.group)
    return torch.stack([global_max, total.log()], dim=1)


def _bucket_logits(top: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """[tokens, k (+1)] bucket logits, shifted by a per-row constant so that no value is large."""
    if tail is None:
        reference = top.amax(dim=-1, keepdim=True).clamp(min=NEG_BIG)
        return top - reference
    reference = torch.maximum(top.amax(dim=-1), tail[:, 0]).clamp(min=NEG_BIG)[:, None]
    tail_logit = (tail[:, :1] - reference) + tail[:, 1:]
    return torch.cat([top - reference, tail_logit], dim=1)


class TopKDivergence(torch.autograd.Function):
    """Per-token divergence [tokens] over the teacher's top-k ids (optionally plus a tail bucket)."""

    @staticmethod
    def forward(
        ctx, student, teacher, active, k: int, with_tail: bool, spec: GradSpec, settings: PassSettings
    ):  # type: ignore[override]
        ids, teacher_top = select_teacher_top_k(teacher, active, k, settings)
        student_top = gather_student_at(student, ids, settings)
        student_tail = tail_log_sum_exp(student, ids, active, settings) if with_tail else None
        teacher_tail = tail_log_sum_exp(teacher, ids, active, settings) if with_tail else None
        u = _bucket_logits(student_top, student_tail)
        v = _bucket_logits(teacher_top, teacher_tail)
        u[~active], v[~active] = 0.0, 0.0
        values, bucket_grad = bucket_divergence(u, v, spec)
        values = torch.where(active, values, 0.0)
        tail = student_tail if with_tail else torch.empty(0, device=student.device)
        ctx.save_for_backward(student, ids, bucket_grad, tail, active)
        ctx.with_tail, ctx.settings = with_tail, settings
        return values

    @staticmethod
    def backward(ctx, grad_values):  # type: ignore[override]
        student, ids, bucket_grad, tail, active = ctx.saved_tensors
        settings: PassSettings = ctx.settings
        scaled = bucket_grad * row_coefficients(grad_values, active, settings.inv_temp)[:, None]
        grad = torch.zeros_like(student)
        if ctx.with_tail:
            _write_tail_grad(grad, student, tail, scaled[:, -1], settings)
        rows, cols = _owned_columns(ids, settings.shard)
        owned = settings.shard.owns(ids)
        grad[rows, cols] = scaled[:, : ids.shape[1]][owned].to(grad.dtype)
        return grad, None, None, None, None, None, None


def _write_tail_grad(
    grad: torch.Tensor,
    student: torch.Tensor,
    tail: torch.Tensor,
    tail_coef: torch.Tensor,
    settings: PassSettings,
) -> None:
    """grad[i] = exp(s_i - log tail mass) * tail_coef for every id (top-k ids are overwritten later)."""
    for rows in _row_chunks(tail_coef != 0, settings.chunk_tokens):
        chunk = _load_rows(student, rows, settings.shard, settings.inv_temp)
        share = chunk.sub_(tail[rows, 0, None]).sub_(tail[rows, 1, None]).exp_()
        grad[rows] = share.mul_(tail_coef[rows, None]).to(grad.dtype)


__all__ = ["TopKDivergence", "bucket_divergence"]
