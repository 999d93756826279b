"""Chunked PyTorch implementation of the per-row passes over a vocab shard (the CPU path).

Each function mirrors one Triton kernel in ``_triton_kernels.py`` with the same math: it walks the
active rows in chunks of ``chunk_tokens``, upcasts one chunk at a time to float32 and reduces it to a
few numbers per row. Nothing of size [tokens, vocab/TP] in float32 is ever held beyond one chunk.

Row tables (float32, one row per token):
- local stats, width 6: student max, student sum-exp (relative to that max), teacher max, teacher
  sum-exp, reverse cross term, forward cross term (see ``full_vocab.py`` for their meaning);
- global table, width ``TABLE_WIDTH``: student max, log of student sum-exp, teacher max, log of
  teacher sum-exp, and one kind-specific scalar (the reverse KL, or E = KL(student || M) for JSD).

Maxima are kept in logit units (max x, not max x/T) and the temperature scales only differences:
(x - max) / T. Scaling first would round every x/T to float32, an error of |x| * 2**-24 per logit
that no later subtraction removes (1e-3 at |x| ~ 1e4); x - max is exact for nearby values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_sdzero.losses.parallel import VocabShard

# Finite stand-in for "-inf" as a running maximum: keeps (max_old - max_new) finite, so rows or
# shards whose logits are all -inf produce zeros instead of NaNs.
NEG_BIG = -1.0e38
LOCAL_STATS_WIDTH = 6
TABLE_WIDTH = 8


@dataclass(frozen=True)
class GradSpec:
    """Which per-token gradient to form: ``kl`` (reverse/forward/mixed), ``jsd`` or ``ce``."""

    kind: str
    forward_weight: float = 0.0
    jsd_beta: float = 0.5


Rows = torch.Tensor | slice


def _row_chunks(selected: torch.Tensor, chunk_tokens: int) -> Iterator[Rows]:
    """Chunks of the rows where ``selected`` is nonzero: slices when every row is selected (views, no
    gather), index tensors otherwise."""
    if bool(selected.all()):
        for begin in range(0, selected.numel(), chunk_tokens):
            yield slice(begin, min(begin + chunk_tokens, selected.numel()))
        return
    rows = selected.nonzero().squeeze(1)
    for begin in range(0, rows.numel(), chunk_tokens):
        yield rows[begin : begin + chunk_tokens]


def _load_rows(logits: torch.Tensor, rows: Rows, shard: VocabShard) -> torch.Tensor:
    """float32 copy of the given rows (unscaled), padding columns set to -inf."""
    chunk = logits[rows].to(torch.float32, copy=isinstance(rows, slice))
    chunk[:, shard.valid_columns :] = float("-inf")
    return chunk


def _scaled_shift(chunk: torch.Tensor, reference: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """In place: chunk = (chunk - reference[row]) / T."""
    chunk.sub_(reference[:, None])
    return chunk.mul_(inv_temp) if inv_temp != 1.0 else chunk


def _shift_by_max(chunk: torch.Tensor, inv_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: chunk = (chunk - row max) / T, the max clamped to NEG_BIG. Returns (shifted chunk,
    row max in logit units)."""
    row_max = chunk.amax(dim=-1).clamp_(min=NEG_BIG)
    return _scaled_shift(chunk, row_max, inv_temp), row_max


def _weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum(weights * values) per row, where a zero weight contributes zero even if values is +-inf."""
    return torch.where(weights > 0, weights * values, 0.0).sum(dim=-1)


def local_softmax_stats(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    active: torch.Tensor,
    shard: VocabShard,
    inv_temp: float,
    need_reverse: bool,
    need_forward: bool,
    chunk_tokens: int,
) -> torch.Tensor:
    """Per-row softmax statistics of this shard, [tokens, LOCAL_STATS_WIDTH]; inactive rows neutral."""
    out = torch.zeros(student.shape[0], LOCAL_STATS_WIDTH, dtype=torch.float32, device=student.device)
    out[:, 0] = NEG_BIG
    out[:, 2] = NEG_BIG
    for rows in _row_chunks(active, chunk_tokens):
        ds, max_s = _shift_by_max(_load_rows(student, rows, shard), inv_temp)
        e_s = ds.exp()
        stats = [max_s, e_s.sum(dim=-1)]
        if teacher is not None:
            dt, max_t = _shift_by_max(_load_rows(teacher, rows, shard), inv_temp)
            e_t = dt.exp()
            stats += [max_t, e_t.sum(dim=-1)]
            zeros = torch.zeros_like(max_s)
            stats.append(_weighted_sum(e_s, ds - dt) if need_reverse else zeros)
            stats.append(_weighted_sum(e_t, dt - ds) if need_forward else zeros)
        out[rows, : len(stats)] = torch.stack(stats, dim=1)
    return out


def _log_probs(chunk: torch.Tensor, table_rows: torch.Tensor, max_col: int, inv_temp: float) -> torch.Tensor:
    """In place: log-softmax of chunk / T from the global max and log-sum-exp stored in the table."""
    return _scaled_shift(chunk, table_rows[:, max_col], inv_temp).sub_(table_rows[:, max_col + 1, None])


def _log_mixture(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta * q + (1 - beta) * p)."""
    return torch.logaddexp(lq + math.log(beta), lp + math.log1p(-beta))


def jsd_local_sums(
    student: torch.Tensor,
    teacher: torch.Tensor,
    active: torch.Tensor,
    table: torch.Tensor,
    shard: VocabShard,
    inv_temp: float,
    beta: float,
    chunk_tokens: int,
) -> torch.Tensor:
    """Per row over this shard: [sum p (log p - log m), sum q (log q - log m)], m the JSD mixture."""
    out = torch.zeros(student.shape[0], 2, dtype=torch.float32, device=student.device)
    for rows in _row_chunks(active, chunk_tokens):
        table_rows = table[rows]
        lp = _log_probs(_load_rows(student, rows, shard), table_rows, 0, inv_temp)
        lq = _log_probs(_load_rows(teacher, rows, shard), table_rows, 2, inv_temp)
        lm = _log_mixture(lp, lq, beta)
        out[rows, 0] = _weighted_sum(lp.exp(), lp - lm)
        out[rows, 1] = _weighted_sum(lq.exp(), lq - lm)
    return out


def _grad_rows(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    table_rows: torch.Tensor,
    target_cols: torch.Tensor | None,
    rows: Rows,
    shard: VocabShard,
    inv_temp: float,
    spec: GradSpec,
) -> torch.Tensor:
    """d(per-token value)/d(scaled student logits) for the given rows, float32."""
    lp = _log_probs(_load_rows(student, rows, shard), table_rows, 0, inv_temp)
    p = lp.exp()
    if spec.kind == "ce":
        grad = p
        owned = target_cols >= 0
        grad[owned.nonzero().squeeze(1), target_cols[owned]] -= 1.0
        return grad
    lq = _log_probs(_load_rows(teacher, rows, shard), table_rows, 2, inv_temp)
    kind_scalar = table_rows[:, 4, None]
    if spec.kind == "jsd":
        log_ratio = lp - _log_mixture(lp, lq, spec.jsd_beta)
        return (1.0 - spec.jsd_beta) * torch.where(p > 0, p * (log_ratio - kind_scalar), 0.0)
    w = spec.forward_weight
    grad = torch.zeros_like(p)
    if w < 1.0:
        grad += (1.0 - w) * torch.where(p > 0, p * (lp - lq - kind_scalar), 0.0)
    if w > 0.0:
        grad += w * (p - lq.exp())
    if w < 1.0:
        grad.masked_fill_(infinite_reverse(kind_scalar), 0.0)
    return grad


def infinite_reverse(reverse: torch.Tensor) -> torch.Tensor:
    """Where the reverse KL is +inf: the student has mass where the teacher has none. It is +inf for
    every finite student logits there, so the loss is constant around them and its gradient is 0
    (for the mixed KL too); see docs/benchmarks.md, "Teacher logits of -inf"."""
    return reverse == float("inf")


def divergence_grad(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    table: torch.Tensor,
    coef: torch.Tensor,
    target_cols: torch.Tensor | None,
    shard: VocabShard,
    inv_temp: float,
    spec: GradSpec,
    chunk_tokens: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. the student shard: coef[row] * d value[row] / d student[row, :].

    ``coef`` already holds the upstream gradient times 1/temperature; rows with coef == 0 are
    written as zeros without reading their logits. ``out`` may be the student itself: each chunk of
    rows is copied to float32 before its gradient is written back.
    """
    if out is None:
        grad = torch.zeros_like(student)
    else:
        grad = out
        grad[coef == 0] = 0.0
    for rows in _row_chunks(coef != 0, chunk_tokens):
        targets = None if target_cols is None else target_cols[rows]
        rows_grad = _grad_rows(student, teacher, table[rows], targets, rows, shard, inv_temp, spec)
        rows_grad.mul_(coef[rows, None])
        rows_grad[:, shard.valid_columns :] = 0.0
        grad[rows] = rows_grad.to(grad.dtype)
    return grad
