"""Teacher-top-k divergences on vocab-parallel shards.

The k ids are the teacher's most likely ones over the whole vocabulary: every rank takes its local
top-k (at most its shard width), the candidates are all-gathered over the tensor-parallel group and
every rank picks the same global top-k from them. The student's logits at those ids are gathered
from their owners (all-reduce MAX of [tokens, k]). Ids whose teacher logit is -inf are never among
the k (see ``_global_top_k``): a row with fewer finite teacher logits keeps fewer buckets.

Two ways to form distributions over "buckets" from the k ids:
- renormalised (the reference code): k buckets, both softmaxes taken over the k ids only;
- with tail (``top_k_tail``): k + 1 buckets, the last one holding all the mass outside the top-k,
  computed directly as a log-sum-exp over the other ids (not as 1 - sum, which cancels).

Logits stay in their own units until the buckets are formed: top-k values, gathered student
logits and the tails' maxima are raw, and 1/T multiplies only differences from a per-row reference
(the tails are [max, log sum exp((x - max)/T)]), so |x| ~ 1e4 loses no precision at T != 1.

With bucket logits u_b = log sum_{i in b} exp(s_i), s = x/T, any divergence f of the bucket distributions
has d f / d s_i = exp(s_i - u_b(i)) * d f / d u_b(i): a top-k id's gradient is its bucket gradient,
and every id in the tail shares the tail bucket's gradient in proportion to its student probability.

Backends: when the full-vocabulary passes run on Triton (CUDA tensors, or backend="triton"), the
local top-k, both local tails and the tail gradient come from ``_triton_topk.py`` (ties at the cut go
to the lowest id, as with CUDA's torch.topk); the candidates that the global pick leaves out join the
tails here. That path waits for the GPU nowhere (no host sync). k above 256 per shard takes the
chunked PyTorch code, which is also the CPU path.
"""

from __future__ import annotations

from types import ModuleType

import torch

import megatron_sdzero.losses._torch_kernels as _torch_kernels
from megatron_sdzero.losses._torch_kernels import (
    NEG_BIG,
    GradSpec,
    _load_rows,
    _log_mixture,
    _row_chunks,
    _scaled_shift,
    _shift_by_max,
    _weighted_sum,
    infinite_reverse,
)
from megatron_sdzero.losses.full_vocab import PassSettings, row_coefficients
from megatron_sdzero.losses.parallel import (
    VocabShard,
    all_gather_last_dim,
    all_reduce_max_,
    all_reduce_sum_,
    group_rank,
)

# Id of a top-k slot without a real candidate (see _global_top_k): below every shard's range.
NO_ID = -1


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
    grad = _mix(w, reverse_grad, p - q)
    if w < 1.0:  # the tail holds student mass and no teacher mass: value +inf, gradient 0
        grad = torch.where(infinite_reverse(reverse)[:, None], 0.0, grad)
    return _mix(w, reverse, forward), grad


def _candidate_widths(k: int, shard: VocabShard) -> tuple[int, int]:
    """(candidates per rank, the same on every rank for the all-gather; valid ones on this rank)."""
    if k > shard.valid_vocab_size:
        raise ValueError(f"top_k={k} exceeds the {shard.valid_vocab_size} valid vocabulary ids")
    width = min(k, shard.size)
    return width, min(width, shard.valid_columns)


def _empty_candidates(n_rows: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, width] candidate slots before any is filled: teacher logit -inf, id ``NO_ID``. A rank
    whose shard holds fewer valid ids than the common width leaves the last ones empty."""
    values = torch.full((n_rows, width), float("-inf"), dtype=torch.float32, device=device)
    return values, torch.full((n_rows, width), NO_ID, dtype=torch.int64, device=device)


def _global_top_k(
    values: torch.Tensor, ids: torch.Tensor, k: int, shard: VocabShard
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's candidates gathered, the k largest kept: (ids, values, positions picked, which
    picks are real).

    A pick whose teacher logit is -inf is no candidate: with fewer finite teacher logits than k the
    cut falls among -inf ties, which may be an empty slot or an id the teacher rules out, chosen by
    tie-breaking. Such picks get id ``NO_ID``, which no rank owns: they gather no student logit
    (their bucket is empty on both sides), get no gradient and, with the tail, every id outside the
    real picks stays in the tail. So the top-k is the teacher's min(k, finite) best ids on every TP
    size."""
    all_values = all_gather_last_dim(values, shard.group)
    all_ids = all_gather_last_dim(ids, shard.group)
    top_values, picked = all_values.topk(k, dim=-1)
    real = top_values > float("-inf")
    return torch.where(real, all_ids.gather(1, picked), NO_ID), top_values, picked, real


def select_teacher_top_k(
    teacher: torch.Tensor, active: torch.Tensor, k: int, settings: PassSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k ids [tokens, k] of the teacher and its logits there (float32, unscaled); slots
    without a finite teacher logit (all of an inactive row's) get id ``NO_ID``."""
    shard = settings.shard
    width, local_k = _candidate_widths(k, shard)
    values, ids = _empty_candidates(teacher.shape[0], width, teacher.device)
    for rows in _row_chunks(active, settings.chunk_tokens) if local_k > 0 else ():
        # top-k in the logits' own dtype over the valid columns: no float32 copy of the chunk
        chunk_values, chunk_cols = teacher[rows][:, : shard.valid_columns].topk(local_k, dim=-1)
        values[rows, :local_k] = chunk_values.to(torch.float32)
        ids[rows, :local_k] = chunk_cols + shard.start
    top_ids, top_values, _, _ = _global_top_k(values, ids, k, shard)
    return top_ids, top_values


def gather_student_at(student: torch.Tensor, ids: torch.Tensor, settings: PassSettings) -> torch.Tensor:
    """Student logits (float32, unscaled) at global ids [tokens, k], from whichever rank owns each id."""
    shard = settings.shard
    owned = shard.owns(ids) & (ids < shard.valid_vocab_size)
    local_cols = (ids - shard.start).clamp(0, shard.size - 1)
    picked = student.gather(1, local_cols).to(torch.float32)
    return all_reduce_max_(torch.where(owned, picked, float("-inf")), shard.group)


def _owned_columns(ids: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, local column) of the ids this rank owns."""
    owned = shard.owns(ids)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    return rows[owned], (ids - shard.start)[owned]


def _local_tail_stats(
    logits: torch.Tensor, ids: torch.Tensor, active: torch.Tensor, settings: PassSettings
) -> torch.Tensor:
    """Per row over this shard, ids outside the top-k only: [max x, sum exp((x - max) / T)]."""
    out = torch.zeros(logits.shape[0], 2, dtype=torch.float32, device=logits.device)
    out[:, 0] = NEG_BIG
    for rows in _row_chunks(active, settings.chunk_tokens):
        chunk = _load_rows(logits, rows, settings.shard)
        chunk_rows, cols = _owned_columns(ids[rows], settings.shard)
        chunk[chunk_rows, cols] = float("-inf")
        shifted, row_max = _shift_by_max(chunk, settings.inv_temp)
        out[rows, 0], out[rows, 1] = row_max, shifted.exp_().sum(dim=-1)
    return out


def _global_tail(local: torch.Tensor, settings: PassSettings) -> torch.Tensor:
    """Every rank's [max, sum exp((x - max) / T)] combined into the global [max, log of that sum]."""
    group = settings.shard.group
    global_max = all_reduce_max_(local[:, 0].clone(), group)
    total = all_reduce_sum_(local[:, 1] * ((local[:, 0] - global_max) * settings.inv_temp).exp(), group)
    return torch.stack([global_max, total.log()], dim=1)


def tail_log_sum_exp(
    logits: torch.Tensor, ids: torch.Tensor, active: torch.Tensor, settings: PassSettings
) -> torch.Tensor:
    """Global [max, log sum exp((x - max) / T)] per row over all valid ids outside the top-k."""
    return _global_tail(_local_tail_stats(logits, ids, active, settings), settings)


def _with_terms(stats: torch.Tensor, logits: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """[max, sum exp((x - max) / T)] per row after adding the logits [rows, n] (-inf: none)."""
    if logits.shape[1] == 0:
        return stats
    new_max = torch.maximum(stats[:, 0], logits.amax(dim=-1)).clamp(min=NEG_BIG)
    old_part = stats[:, 1] * ((stats[:, 0] - new_max) * inv_temp).exp()
    new_part = _scaled_shift(logits.clone(), new_max, inv_temp).exp_().sum(dim=-1)
    return torch.stack([new_max, old_part + new_part], dim=1)


def top_k_kernels(settings: PassSettings, k: int) -> ModuleType | None:
    """The Triton top-k kernels when the full-vocabulary passes run on Triton (the same backend
    choice: CUDA tensors, or backend="triton") and k fits them; None for the PyTorch path."""
    if settings.kernels is _torch_kernels:
        return None
    from megatron_sdzero.losses import _triton_topk

    return _triton_topk if min(k, settings.shard.size) <= _triton_topk.MAX_TOP_K else None


def _candidates_at(
    teacher: torch.Tensor, columns: torch.Tensor, active: torch.Tensor, width: int, settings: PassSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's candidates [tokens, width] for the global pick, laid out as on the PyTorch path:
    teacher logits (unscaled) and global ids at ``columns``, then empty slots up to ``width``."""
    n_rows, local_k = columns.shape
    values, ids = _empty_candidates(n_rows, width, teacher.device)
    picked = teacher.gather(1, columns).to(torch.float32)
    values[:, :local_k] = torch.where(active[:, None], picked, float("-inf"))
    ids[:, :local_k] = columns + settings.shard.start
    return values, ids


def _left_out_here(
    picked: torch.Tensor, real: torch.Tensor, width: int, local_k: int, shard: VocabShard
) -> torch.Tensor:
    """[tokens, local_k]: which of this rank's candidates the global pick did not keep (as a real
    pick: a -inf teacher logit is never kept)."""
    kept = torch.zeros(picked.shape[0], width * shard.tp_size, dtype=torch.bool, device=picked.device)
    kept.scatter_(1, picked, real)
    begin = group_rank(shard.group) * width
    return ~kept[:, begin : begin + local_k]


def _select_with_kernels(
    kernels: ModuleType,
    student: torch.Tensor,
    teacher: torch.Tensor,
    active: torch.Tensor,
    k: int,
    with_tail: bool,
    settings: PassSettings,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Triton path of ``_select``: one kernel finds this shard's top-k and, with the tail, both
    tails over the shard's other ids; the local candidates the global pick leaves out join them."""
    shard = settings.shard
    width, local_k = _candidate_widths(k, shard)
    n_rows = teacher.shape[0]
    columns = torch.zeros(n_rows, local_k, dtype=torch.int64, device=teacher.device)
    local_tail = kernels.neutral_tails(n_rows, teacher.device)
    if local_k > 0:
        found = kernels.local_top_k(
            teacher, student if with_tail else None, active, local_k, shard, settings.inv_temp
        )
        columns = found.columns
        local_tail = local_tail if found.tail is None else found.tail
    values, ids = _candidates_at(teacher, columns, active, width, settings)
    top_ids, top_values, picked, real = _global_top_k(values, ids, k, shard)
    if not with_tail:
        return top_ids, top_values, None
    left_out = _left_out_here(picked, real, width, local_k, shard) & active[:, None]
    tails = _tails_with(local_tail, left_out, values[:, :local_k], student, columns, settings)
    return top_ids, top_values, tails


def _tails_with(
    local_tail: torch.Tensor,
    left_out: torch.Tensor,
    teacher_values: torch.Tensor,
    student: torch.Tensor,
    columns: torch.Tensor,
    settings: PassSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (student, teacher) tails: this shard's tails (``local_tail``, [max, sum] of the teacher
    then of the student) plus the local candidates at ``columns`` that the global pick left out."""
    teacher_rest = torch.where(left_out, teacher_values, float("-inf"))
    student_rest = torch.where(left_out, student.gather(1, columns).to(torch.float32), float("-inf"))
    teacher_tail = _global_tail(_with_terms(local_tail[:, :2], teacher_rest, settings.inv_temp), settings)
    student_tail = _global_tail(_with_terms(local_tail[:, 2:], student_rest, settings.inv_temp), settings)
    return student_tail, teacher_tail


def _select(
    kernels: ModuleType | None,
    student: torch.Tensor,
    teacher: torch.Tensor,
    active: torch.Tensor,
    k: int,
    with_tail: bool,
    settings: PassSettings,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Global top-k ids, the teacher's logits there and, with the tail, the (student, teacher)
    tails as [max, log sum exp((x - max) / T)] over every other valid id."""
    if kernels is not None:
        return _select_with_kernels(kernels, student, teacher, active, k, with_tail, settings)
    ids, teacher_top = select_teacher_top_k(teacher, active, k, settings)
    if not with_tail:
        return ids, teacher_top, None
    student_tail = tail_log_sum_exp(student, ids, active, settings)
    return ids, teacher_top, (student_tail, tail_log_sum_exp(teacher, ids, active, settings))


def _bucket_logits(top: torch.Tensor, tail: torch.Tensor | None, inv_temp: float) -> torch.Tensor:
    """[tokens, k (+1)] bucket logits of the scaled logits, shifted by a per-row constant so that no
    value is large: (top - reference) / T, and the tail's (max - reference) / T + log sum."""
    if tail is None:
        reference = top.amax(dim=-1).clamp(min=NEG_BIG)
        return _scaled_shift(top.clone(), reference, inv_temp)
    reference = torch.maximum(top.amax(dim=-1), tail[:, 0]).clamp(min=NEG_BIG)
    tail_logit = (tail[:, 0] - reference) * inv_temp + tail[:, 1]
    return torch.cat([_scaled_shift(top.clone(), reference, inv_temp), tail_logit[:, None]], dim=1)


class TopKDivergence(torch.autograd.Function):
    """Per-token divergence [tokens] over the teacher's top-k ids (optionally plus a tail bucket)."""

    @staticmethod
    def forward(
        ctx, student, teacher, active, k: int, with_tail: bool, spec: GradSpec, settings: PassSettings
    ):  # type: ignore[override]
        kernels = top_k_kernels(settings, k)
        ids, teacher_top, tails = _select(kernels, student, teacher, active, k, with_tail, settings)
        student_tail, teacher_tail = tails if with_tail else (None, None)
        student_top = gather_student_at(student, ids, settings)
        u = _bucket_logits(student_top, student_tail, settings.inv_temp)
        v = _bucket_logits(teacher_top, teacher_tail, settings.inv_temp)
        u.masked_fill_(~active[:, None], 0.0)  # not u[~active] = 0: boolean indexing syncs
        v.masked_fill_(~active[:, None], 0.0)
        values, bucket_grad = bucket_divergence(u, v, spec)
        values = torch.where(active, values, 0.0)
        tail = student_tail if with_tail else torch.empty(0, device=student.device)
        ctx.save_for_backward(student, ids, bucket_grad, tail, active)
        ctx.with_tail, ctx.settings, ctx.kernels = with_tail, settings, kernels
        return values

    @staticmethod
    def backward(ctx, grad_values):  # type: ignore[override]
        student, ids, bucket_grad, tail, active = ctx.saved_tensors
        settings: PassSettings = ctx.settings
        scaled = bucket_grad * row_coefficients(grad_values, active, settings.inv_temp)[:, None]
        if ctx.with_tail:
            grad = _tail_grad(ctx.kernels, student, tail, scaled[:, -1], settings)
        else:
            grad = torch.zeros_like(student)
        _write_top_k_grad(grad, ids, scaled[:, : ids.shape[1]], settings.shard)
        return grad, None, None, None, None, None, None


def _write_top_k_grad(grad: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, shard: VocabShard) -> None:
    """In place: grad[row, id - start] = values[row, slot] for the ids this rank owns, with no host
    sync (boolean indexing would wait for the GPU). One scatter over every slot: a slot of an id
    owned elsewhere (or ``NO_ID``) writes, again, a value that is already there (the row's first
    owned slot's, or else column 0's current one), so duplicate targets carry equal values and the
    result does not depend on the order of the writes."""
    owned = shard.owns(ids)
    cols = (ids - shard.start).clamp(0, shard.size - 1)
    values = values.to(grad.dtype)
    first = owned.to(torch.int32).argmax(dim=1, keepdim=True)  # the first owned slot, 0 when none
    has_owned = owned.any(dim=1, keepdim=True)
    spare_col = torch.where(has_owned, cols.gather(1, first), 0)
    spare_value = torch.where(has_owned, values.gather(1, first), grad[:, :1])
    grad.scatter_(1, torch.where(owned, cols, spare_col), torch.where(owned, values, spare_value))


def _tail_grad(
    kernels: ModuleType | None,
    student: torch.Tensor,
    tail: torch.Tensor,
    tail_coef: torch.Tensor,
    settings: PassSettings,
) -> torch.Tensor:
    """Gradient of the tail bucket alone: every valid id's share of it (top-k ids overwritten later)."""
    if kernels is not None:
        return kernels.tail_grad(student, tail, tail_coef, settings.shard, settings.inv_temp)
    grad = torch.zeros_like(student)
    _write_tail_grad(grad, student, tail, tail_coef, settings)
    return grad


def _write_tail_grad(
    grad: torch.Tensor,
    student: torch.Tensor,
    tail: torch.Tensor,
    tail_coef: torch.Tensor,
    settings: PassSettings,
) -> None:
    """grad[i] = exp(x_i / T - log tail mass) * tail_coef for every id (top-k ids are overwritten
    later); the tail is [max, log sum exp((x - max) / T)]."""
    for rows in _row_chunks(tail_coef != 0, settings.chunk_tokens):
        chunk = _load_rows(student, rows, settings.shard)
        share = _scaled_shift(chunk, tail[rows, 0], settings.inv_temp).sub_(tail[rows, 1, None]).exp_()
        grad[rows] = share.mul_(tail_coef[rows, None]).to(grad.dtype)


__all__ = ["TopKDivergence", "bucket_divergence"]
