"""Fused Triton kernels for the per-row passes over a vocab shard (the GPU path).

Same functions, same row tables and same math as ``_torch_kernels.py``; one program per token row
walks the shard in blocks of columns with an online softmax, so every logit is read once per pass
and nothing but a few float32 numbers per row is written (the gradient pass writes the gradient in
the student's dtype). With TP = 1 both passes run in one kernel (``fused_loss_and_grad``); with
TP > 1 the statistics kernel and the gradient kernel sit on either side of the all-reduces.
Rows that are inactive (masked, zero weight) are not read at all. Rows are re-aligned to 16 bytes
so that the hot loop reads unmasked 16-byte vectors even for widths like 100278; only the first and
last block of a row are masked. Offsets are 64-bit: [32768, 151936] has more than 2**31 elements.

Maxima stay in logit units and 1/T multiplies differences only, as in ``_torch_kernels.py``.

Imported lazily: only CUDA tensors (or TRITON_INTERPRET=1 on the CPU) take this path.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from megatron_sdzero.losses._torch_kernels import LOCAL_STATS_WIDTH, NEG_BIG, TABLE_WIDTH, GradSpec
from megatron_sdzero.losses.parallel import VocabShard

_KIND_CODES = {"kl": 0, "jsd": 1, "ce": 2}
# Launch settings, chosen by the sweep in tools/bench_kl.py on an H100 (see docs/benchmarks.md):
# columns per block, warps per program, software-pipelining stages of the unmasked loop.
BLOCK_COLUMNS = int(os.environ.get("SDZERO_KL_BLOCK", "2048"))
NUM_WARPS = int(os.environ.get("SDZERO_KL_WARPS", "8"))
NUM_STAGES = int(os.environ.get("SDZERO_KL_STAGES", "4"))
# With TP = 1, run both passes in one fused kernel (else: statistics kernel, then gradient kernel).
FUSE_SINGLE_PROCESS = os.environ.get("SDZERO_KL_FUSED", "1") == "1"


@triton.jit
def _row_layout(row, row_stride, n_span, ALIGN: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """Row start rounded down to VEC elements (16 bytes) when ALIGN, the lead before the first
    column, and the number of BLOCK-wide blocks covering lead + n_span columns."""
    row_offset = row * row_stride
    if ALIGN:
        lead = row_offset % VEC
        base = tl.multiple_of(row_offset - lead, VEC)
    else:  # no alignment promise: a misaligned vector load would read the wrong bytes
        lead = row_offset * 0
        base = row_offset
    return base, lead, tl.cdiv(lead + n_span, BLOCK)


@triton.jit
def _block_ranges(lead, n_valid, n_blocks, BLOCK: tl.constexpr):
    """Blocks [0, head_end) and [tail_begin, n_blocks) need masks; [body_begin, body_end) lie inside
    columns [0, n_valid) and are read without one (vectorised, no branch in the hot loop)."""
    body_begin = tl.cdiv(lead, BLOCK)
    body_end = tl.maximum((lead + n_valid) // BLOCK, body_begin)
    head_end = tl.minimum(body_begin, n_blocks)
    tail_begin = tl.maximum(body_end, head_end)
    return head_end, body_begin, body_end, tail_begin


@triton.jit
def _load(ptr, offs, lead, n_valid, MASKED: tl.constexpr):
    """float32 logits, unscaled; -inf outside columns [0, n_valid) when MASKED."""
    if MASKED:
        cols = offs - lead
        x = tl.load(ptr + offs, mask=(cols >= 0) & (cols < n_valid), other=-float("inf"))
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _online_update(
    s, t, max_s, max_t, sum_s, sum_t, cross_rev, cross_fwd, inv_temp,
    HAS_TEACHER: tl.constexpr, NEED_REVERSE: tl.constexpr, NEED_FORWARD: tl.constexpr,
):  # fmt: skip
    """One block of the online softmax of s / T: scalar running maxima (logit units), per-lane
    running sums of exp((s - max) / T)."""
    new_max_s = tl.maximum(max_s, tl.max(s, axis=0))
    scale_s = tl.exp((max_s - new_max_s) * inv_temp)
    ds = (s - new_max_s) * inv_temp
    e_s = tl.exp(ds)
    if HAS_TEACHER:
        new_max_t = tl.maximum(max_t, tl.max(t, axis=0))
        scale_t = tl.exp((max_t - new_max_t) * inv_temp)
        dt = (t - new_max_t) * inv_temp
        e_t = tl.exp(dt)
        # Cross terms are kept relative to the running maxima; moving a maximum shifts them. The
        # shift can be ~1e38 while the sums are 0 (NEG start): scale after the product, not before.
        shift = (max_s - new_max_s) - (max_t - new_max_t)
        if NEED_REVERSE:
            moved = sum_s * shift * inv_temp
            cross_rev = scale_s * (cross_rev + moved) + tl.where(e_s > 0, e_s * (ds - dt), 0.0)
        if NEED_FORWARD:
            moved = sum_t * shift * inv_temp
            cross_fwd = scale_t * (cross_fwd - moved) + tl.where(e_t > 0, e_t * (dt - ds), 0.0)
        sum_t = sum_t * scale_t + e_t
        max_t = new_max_t
    sum_s = sum_s * scale_s + e_s
    return new_max_s, max_t, sum_s, sum_t, cross_rev, cross_fwd


@triton.jit
def _stats_step(
    s_ptr, t_ptr, i, lead, n_read, inv_temp, max_s, max_t, sum_s, sum_t, cross_rev, cross_fwd,
    MASKED: tl.constexpr, HAS_TEACHER: tl.constexpr, NEED_REVERSE: tl.constexpr, NEED_FORWARD: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = i * BLOCK + tl.arange(0, BLOCK)
    s = _load(s_ptr, offs, lead, n_read, MASKED)
    if HAS_TEACHER:
        t = _load(t_ptr, offs, lead, n_read, MASKED)
    else:
        t = s
    return _online_update(
        s, t, max_s, max_t, sum_s, sum_t, cross_rev, cross_fwd, inv_temp,
        HAS_TEACHER, NEED_REVERSE, NEED_FORWARD,
    )  # fmt: skip


@triton.jit
def _stats_pass(
    s_ptr, t_ptr, lead, n_read, inv_temp,
    HAS_TEACHER: tl.constexpr, NEED_REVERSE: tl.constexpr, NEED_FORWARD: tl.constexpr,
    NEG: tl.constexpr, STAGES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """First pass over one row: maxima, sums of exp and cross terms (see full_vocab.py)."""
    n_blocks = tl.cdiv(lead + n_read, BLOCK)
    head_end, body_begin, body_end, tail_begin = _block_ranges(lead, n_read, n_blocks, BLOCK)
    max_s = tl.full((), NEG, tl.float32)
    max_t = tl.full((), NEG, tl.float32)
    sum_s = tl.zeros((BLOCK,), tl.float32)
    sum_t = tl.zeros((BLOCK,), tl.float32)
    cross_rev = tl.zeros((BLOCK,), tl.float32)
    cross_fwd = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, head_end):
        max_s, max_t, sum_s, sum_t, cross_rev, cross_fwd = _stats_step(
            s_ptr, t_ptr, i, lead, n_read, inv_temp, max_s, max_t, sum_s, sum_t, cross_rev, cross_fwd,
            True, HAS_TEACHER, NEED_REVERSE, NEED_FORWARD, BLOCK,
        )  # fmt: skip
    for i in tl.range(body_begin, body_end, num_stages=STAGES):
        max_s, max_t, sum_s, sum_t, cross_rev, cross_fwd = _stats_step(
            s_ptr, t_ptr, i, lead, n_read, inv_temp, max_s, max_t, sum_s, sum_t, cross_rev, cross_fwd,
            False, HAS_TEACHER, NEED_REVERSE, NEED_FORWARD, BLOCK,
        )  # fmt: skip
    for i in range(tail_begin, n_blocks):
        max_s, max_t, sum_s, sum_t, cross_rev, cross_fwd = _stats_step(
            s_ptr, t_ptr, i, lead, n_read, inv_temp, max_s, max_t, sum_s, sum_t, cross_rev, cross_fwd,
            True, HAS_TEACHER, NEED_REVERSE, NEED_FORWARD, BLOCK,
        )  # fmt: skip
    return (
        max_s, tl.sum(sum_s, axis=0), max_t, tl.sum(sum_t, axis=0),
        tl.sum(cross_rev, axis=0), tl.sum(cross_fwd, axis=0),
    )  # fmt: skip


@triton.jit
def _local_stats_kernel(
    s_ptr, t_ptr, active_ptr, out_ptr,
    row_stride, n_valid_cols, inv_temp,
    HAS_TEACHER: tl.constexpr, NEED_REVERSE: tl.constexpr, NEED_FORWARD: tl.constexpr,
    OUT_WIDTH: tl.constexpr, NEG: tl.constexpr, ALIGN: tl.constexpr, VEC: tl.constexpr,
    STAGES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    n_read = tl.where(tl.load(active_ptr + row) != 0, n_valid_cols, 0)
    base, lead, _ = _row_layout(row, row_stride, n_read, ALIGN, VEC, BLOCK)
    max_s, sum_s, max_t, sum_t, cross_rev, cross_fwd = _stats_pass(
        s_ptr + base, t_ptr + base, lead, n_read, inv_temp,
        HAS_TEACHER, NEED_REVERSE, NEED_FORWARD, NEG, STAGES, BLOCK,
    )  # fmt: skip
    out_row = out_ptr + row * OUT_WIDTH
    tl.store(out_row + 0, max_s)
    tl.store(out_row + 1, sum_s)
    tl.store(out_row + 2, max_t)
    tl.store(out_row + 3, sum_t)
    tl.store(out_row + 4, cross_rev)
    tl.store(out_row + 5, cross_fwd)


@triton.jit
def _log_mixture(lp, lq, log_beta, log_one_minus_beta):
    a = lq + log_beta
    b = lp + log_one_minus_beta
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _jsd_step(
    s_ptr, t_ptr, i, lead, n_read, inv_temp, max_s, log_sum_s, max_t, log_sum_t,
    log_beta, log_one_minus_beta, student_term, teacher_term, MASKED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = i * BLOCK + tl.arange(0, BLOCK)
    lp = (_load(s_ptr, offs, lead, n_read, MASKED) - max_s) * inv_temp - log_sum_s
    lq = (_load(t_ptr, offs, lead, n_read, MASKED) - max_t) * inv_temp - log_sum_t
    lm = _log_mixture(lp, lq, log_beta, log_one_minus_beta)
    p = tl.exp(lp)
    q = tl.exp(lq)
    student_term += tl.where(p > 0, p * (lp - lm), 0.0)
    teacher_term += tl.where(q > 0, q * (lq - lm), 0.0)
    return student_term, teacher_term


@triton.jit
def _jsd_sums_kernel(
    s_ptr, t_ptr, active_ptr, table_ptr, out_ptr,
    row_stride, n_valid_cols, inv_temp, log_beta, log_one_minus_beta,
    TABLE_W: tl.constexpr, ALIGN: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    n_read = tl.where(tl.load(active_ptr + row) != 0, n_valid_cols, 0)
    base, lead, n_blocks = _row_layout(row, row_stride, n_read, ALIGN, VEC, BLOCK)
    head_end, body_begin, body_end, tail_begin = _block_ranges(lead, n_read, n_blocks, BLOCK)
    table_row = table_ptr + row * TABLE_W
    stats = (tl.load(table_row + 0), tl.load(table_row + 1), tl.load(table_row + 2), tl.load(table_row + 3))
    student_term = tl.zeros((BLOCK,), tl.float32)
    teacher_term = tl.zeros((BLOCK,), tl.float32)
    s_row, t_row = s_ptr + base, t_ptr + base
    for i in range(0, head_end):
        student_term, teacher_term = _jsd_step(
            s_row, t_row, i, lead, n_read, inv_temp, *stats, log_beta, log_one_minus_beta,
            student_term, teacher_term, True, BLOCK,
        )  # fmt: skip
    for i in tl.range(body_begin, body_end, num_stages=STAGES):
        student_term, teacher_term = _jsd_step(
            s_row, t_row, i, lead, n_read, inv_temp, *stats, log_beta, log_one_minus_beta,
            student_term, teacher_term, False, BLOCK,
        )  # fmt: skip
    for i in range(tail_begin, n_blocks):
        student_term, teacher_term = _jsd_step(
            s_row, t_row, i, lead, n_read, inv_temp, *stats, log_beta, log_one_minus_beta,
            student_term, teacher_term, True, BLOCK,
        )  # fmt: skip
    tl.store(out_ptr + row * 2, tl.sum(student_term, axis=0))
    tl.store(out_ptr + row * 2 + 1, tl.sum(teacher_term, axis=0))


@triton.jit
def _grad_step(
    s_ptr, t_ptr, g_ptr, i, lead, n_read, n_cols, inv_temp, coef, target,
    max_s, log_sum_s, max_t, log_sum_t, kind_scalar, forward_weight, log_beta, log_one_minus_beta,
    MASKED: tl.constexpr, KIND: tl.constexpr, HAS_REVERSE: tl.constexpr, HAS_FORWARD: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Gradient of one block of one row: coef * d value / d s, written in the gradient's dtype."""
    offs = i * BLOCK + tl.arange(0, BLOCK)
    cols = offs - lead
    lp = (_load(s_ptr, offs, lead, n_read, MASKED) - max_s) * inv_temp - log_sum_s
    p = tl.exp(lp)
    if KIND == 2:  # cross-entropy: softmax minus one-hot of the target column
        grad = p - tl.where(cols == target, 1.0, 0.0)
    else:
        lq = (_load(t_ptr, offs, lead, n_read, MASKED) - max_t) * inv_temp - log_sum_t
        if KIND == 1:
            lm = _log_mixture(lp, lq, log_beta, log_one_minus_beta)
            grad = tl.where(p > 0, p * ((lp - lm) - kind_scalar), 0.0) * (1.0 - tl.exp(log_beta))
        else:
            grad = tl.zeros_like(p)
            if HAS_REVERSE:
                grad += (1.0 - forward_weight) * tl.where(p > 0, p * ((lp - lq) - kind_scalar), 0.0)
            if HAS_FORWARD:
                grad += forward_weight * (p - tl.exp(lq))
    if MASKED:
        readable = (cols >= 0) & (cols < n_read)
        grad = tl.where(readable, grad * coef, 0.0)
        tl.store(g_ptr + offs, grad.to(g_ptr.dtype.element_ty), mask=(cols >= 0) & (cols < n_cols))
    else:
        tl.store(g_ptr + offs, (grad * coef).to(g_ptr.dtype.element_ty))


@triton.jit
def _grad_pass(
    s_ptr, t_ptr, g_ptr, lead, n_read, n_cols, inv_temp, coef, target,
    max_s, log_sum_s, max_t, log_sum_t, kind_scalar, forward_weight, log_beta, log_one_minus_beta,
    KIND: tl.constexpr, HAS_REVERSE: tl.constexpr, HAS_FORWARD: tl.constexpr, STAGES: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Second pass over one row: write every column's gradient (zeros where not readable)."""
    n_blocks = tl.cdiv(lead + n_cols, BLOCK)
    head_end, body_begin, body_end, tail_begin = _block_ranges(lead, n_read, n_blocks, BLOCK)
    for i in range(tail_begin, n_blocks):
        _grad_step(
            s_ptr, t_ptr, g_ptr, i, lead, n_read, n_cols, inv_temp, coef, target, max_s, log_sum_s, max_t,
            log_sum_t, kind_scalar, forward_weight, log_beta, log_one_minus_beta,
            True, KIND, HAS_REVERSE, HAS_FORWARD, BLOCK,
        )  # fmt: skip
    for i in tl.range(body_begin, body_end, num_stages=STAGES):
        _grad_step(
            s_ptr, t_ptr, g_ptr, i, lead, n_read, n_cols, inv_temp, coef, target, max_s, log_sum_s, max_t,
            log_sum_t, kind_scalar, forward_weight, log_beta, log_one_minus_beta,
            False, KIND, HAS_REVERSE, HAS_FORWARD, BLOCK,
        )  # fmt: skip
    for i in range(0, head_end):
        _grad_step(
            s_ptr, t_ptr, g_ptr, i, lead, n_read, n_cols, inv_temp, coef, target, max_s, log_sum_s, max_t,
            log_sum_t, kind_scalar, forward_weight, log_beta, log_one_minus_beta,
            True, KIND, HAS_REVERSE, HAS_FORWARD, BLOCK,
        )  # fmt: skip


@triton.jit
def _grad_columns(n_read, reverse, KIND: tl.constexpr, HAS_REVERSE: tl.constexpr):
    """Columns the gradient pass reads: none (all zeros) where the reverse KL is +inf, whose
    gradient is 0 (``_torch_kernels.infinite_reverse``)."""
    if KIND == 0:
        if HAS_REVERSE:
            n_read = tl.where(reverse == float("inf"), 0, n_read)
    return n_read


@triton.jit
def _grad_kernel(
    s_ptr, t_ptr, g_ptr, table_ptr, coef_ptr, target_ptr,
    row_stride, n_cols, n_valid_cols,
    inv_temp, forward_weight, log_beta, log_one_minus_beta,
    KIND: tl.constexpr, HAS_REVERSE: tl.constexpr, HAS_FORWARD: tl.constexpr,
    TABLE_W: tl.constexpr, ALIGN: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    coef = tl.load(coef_ptr + row)
    base, lead, _ = _row_layout(row, row_stride, n_cols, ALIGN, VEC, BLOCK)
    table_row = table_ptr + row * TABLE_W
    kind_scalar = tl.load(table_row + 4)
    n_read = _grad_columns(tl.where(coef != 0, n_valid_cols, 0), kind_scalar, KIND, HAS_REVERSE)
    _grad_pass(
        s_ptr + base, t_ptr + base, g_ptr + base, lead, n_read, n_cols, inv_temp, coef,
        tl.load(target_ptr + row), tl.load(table_row + 0), tl.load(table_row + 1), tl.load(table_row + 2),
        tl.load(table_row + 3), kind_scalar, forward_weight, log_beta, log_one_minus_beta,
        KIND, HAS_REVERSE, HAS_FORWARD, STAGES, BLOCK,
    )  # fmt: skip


@triton.jit
def _fused_loss_grad_kernel(
    s_ptr, t_ptr, g_ptr, table_ptr, values_ptr, coef_ptr, target_ptr,
    row_stride, n_cols, n_valid_cols, inv_temp, forward_weight,
    KIND: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_REVERSE: tl.constexpr, HAS_FORWARD: tl.constexpr,
    TABLE_W: tl.constexpr, NEG: tl.constexpr, ALIGN: tl.constexpr, VEC: tl.constexpr,
    STAGES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Single process (TP = 1), KL family or cross-entropy: both passes in one program per row."""
    row = tl.program_id(0).to(tl.int64)
    coef = tl.load(coef_ptr + row)
    n_read = tl.where(coef != 0, n_valid_cols, 0)
    base, lead, _ = _row_layout(row, row_stride, n_cols, ALIGN, VEC, BLOCK)
    s_row, t_row = s_ptr + base, t_ptr + base
    max_s, sum_s, max_t, sum_t, cross_rev, cross_fwd = _stats_pass(
        s_row, t_row, lead, n_read, inv_temp, HAS_TEACHER, HAS_REVERSE, HAS_FORWARD, NEG, STAGES, BLOCK
    )
    log_sum_s = tl.log(sum_s)
    log_sum_t = tl.log(sum_t)
    target = tl.load(target_ptr + row)
    if KIND == 2:
        label = tl.load(s_row + lead + tl.maximum(target, 0)).to(tl.float32)
        reverse = log_sum_s - (label - max_s) * inv_temp  # cross-entropy, stored where the reverse KL goes
        value = tl.where(target >= 0, reverse, float("inf"))
    else:
        reverse = cross_rev / sum_s - (log_sum_s - log_sum_t)
        forward = cross_fwd / sum_t + (log_sum_s - log_sum_t)
        if HAS_REVERSE and HAS_FORWARD:
            value = (1.0 - forward_weight) * reverse + forward_weight * forward
        elif HAS_FORWARD:
            value = forward
        else:
            value = reverse
    active = coef != 0
    table_row = table_ptr + row * TABLE_W
    tl.store(table_row + 0, tl.where(active, max_s, 0.0))
    tl.store(table_row + 1, tl.where(active, log_sum_s, 0.0))
    tl.store(table_row + 2, tl.where(active, max_t, 0.0))
    tl.store(table_row + 3, tl.where(active, log_sum_t, 0.0))
    tl.store(table_row + 4, tl.where(active, reverse, 0.0))
    tl.store(values_ptr + row, tl.where(active, value, 0.0))
    _grad_pass(
        s_row, t_row, g_ptr + base, lead, _grad_columns(n_read, reverse, KIND, HAS_REVERSE), n_cols,
        inv_temp, coef, target, max_s, log_sum_s, max_t, log_sum_t, reverse, forward_weight, 0.0, 0.0,
        KIND, HAS_REVERSE, HAS_FORWARD, STAGES, BLOCK,
    )  # fmt: skip


@triton.jit
def _scale_unless_one_kernel(g_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """g *= scale in place, in a grid-stride loop; every program returns at once when scale == 1."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for begin in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            offs = begin + tl.arange(0, BLOCK)
            g = tl.load(g_ptr + offs, mask=offs < n)
            tl.store(g_ptr + offs, (g.to(tl.float32) * scale).to(g_ptr.dtype.element_ty), mask=offs < n)


SCALE_BLOCK = 4096


def scale_unless_one_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale (a one-element tensor on grad's device), skipped on the device when scale is
    exactly 1: no host sync and, for loss.backward(), no pass over the gradient. The grid is a few
    programs per SM, so the skip costs one small launch whatever the gradient's size."""
    if not grad.is_contiguous():
        return grad.mul_(scale.to(torch.float32))
    n = grad.numel()
    if n == 0:
        return grad
    if grad.is_cuda:
        programs = 4 * torch.cuda.get_device_properties(grad.device).multi_processor_count
    else:  # Triton's interpreter
        programs = 4
    grid = (max(1, min(programs, triton.cdiv(n, SCALE_BLOCK))),)
    _scale_unless_one_kernel[grid](grad, scale.reshape(1).to(torch.float32), n, BLOCK=SCALE_BLOCK)
    return grad


def _layout(*tensors: torch.Tensor | None) -> dict:
    """Shared row stride and whether rows may be re-aligned to 16 bytes (same stride and dtype,
    16-byte aligned base pointers): then the kernels read and write with 16-byte vectors."""
    present = [tensor for tensor in tensors if tensor is not None]
    if any(tensor.stride(-1) != 1 for tensor in present):
        raise ValueError("the Triton path needs logits whose last dimension is contiguous")
    strides = {tensor.stride(0) for tensor in present}
    if len(strides) != 1:
        raise ValueError("the Triton path needs student, teacher and gradient with the same row stride")
    element_size = present[0].element_size()
    align = all(t.dtype == present[0].dtype and t.data_ptr() % 16 == 0 for t in present)
    return {"row_stride": strides.pop(), "ALIGN": align, "VEC": 16 // element_size}


def _same_row_stride(student: torch.Tensor, teacher: torch.Tensor | None):
    """Both tensors with contiguous rows, like the gradient we allocate (copies only for the rare
    caller that passes column slices; Megatron's logits are contiguous)."""
    if student.stride(0) != student.shape[1]:
        student = student.contiguous()
    if teacher is not None and teacher.stride(0) != teacher.shape[1]:
        teacher = teacher.contiguous()
    return student, teacher


def _block_for(n_cols: int) -> int:
    return min(BLOCK_COLUMNS, triton.next_power_of_2(max(n_cols, 16)))


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
    del chunk_tokens  # one launch covers every row: the kernel keeps no per-column state
    student, teacher = _same_row_stride(student, teacher)
    n_rows = student.shape[0]
    out = torch.empty(n_rows, LOCAL_STATS_WIDTH, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return out
    teacher_or_student = student if teacher is None else teacher
    _local_stats_kernel[(n_rows,)](
        student, teacher_or_student, active.to(torch.int8), out, n_valid_cols=shard.valid_columns,
        inv_temp=inv_temp, HAS_TEACHER=teacher is not None, NEED_REVERSE=need_reverse,
        NEED_FORWARD=need_forward, OUT_WIDTH=LOCAL_STATS_WIDTH, NEG=NEG_BIG, STAGES=NUM_STAGES,
        BLOCK=_block_for(shard.size),
        num_warps=NUM_WARPS, **_layout(student, teacher),
    )  # fmt: skip
    return out


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
    del chunk_tokens
    student, teacher = _same_row_stride(student, teacher)
    n_rows = student.shape[0]
    out = torch.empty(n_rows, 2, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return out
    _jsd_sums_kernel[(n_rows,)](
        student, teacher, active.to(torch.int8), table.contiguous(), out, n_valid_cols=shard.valid_columns,
        inv_temp=inv_temp, log_beta=math.log(beta), log_one_minus_beta=math.log1p(-beta),
        TABLE_W=TABLE_WIDTH, STAGES=NUM_STAGES, BLOCK=_block_for(shard.size), num_warps=NUM_WARPS,
        **_layout(student, teacher),
    )  # fmt: skip
    return out


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
    """``out`` may be the student itself: each block of a row is read before it is written."""
    del chunk_tokens
    student, teacher = _same_row_stride(student, teacher)
    n_rows, n_cols = student.shape
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if out is None else out
    if n_rows == 0:
        return grad
    teacher_or_student = student if teacher is None else teacher
    targets = coef.new_full((n_rows,), -1, dtype=torch.int64) if target_cols is None else target_cols
    _grad_kernel[(n_rows,)](
        student, teacher_or_student, grad, table.contiguous(), coef.contiguous(), targets,
        n_cols=n_cols, n_valid_cols=shard.valid_columns, inv_temp=inv_temp,
        forward_weight=spec.forward_weight, log_beta=math.log(spec.jsd_beta),
        log_one_minus_beta=math.log1p(-spec.jsd_beta), KIND=_KIND_CODES[spec.kind],
        HAS_REVERSE=spec.forward_weight < 1.0, HAS_FORWARD=spec.forward_weight > 0.0, TABLE_W=TABLE_WIDTH,
        STAGES=NUM_STAGES, BLOCK=_block_for(n_cols), num_warps=NUM_WARPS, **_layout(student, teacher, grad),
    )  # fmt: skip
    return grad


def fused_loss_and_grad(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    coef: torch.Tensor,
    target_cols: torch.Tensor | None,
    shard: VocabShard,
    inv_temp: float,
    spec: GradSpec,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TP = 1 only, KL family or cross-entropy: per-row values and the gradient in one launch.

    ``out`` may be the student itself: a row's program finishes both reads of the row (statistics,
    then each gradient block before its store) before it overwrites that block.
    """
    if shard.tp_size != 1 or spec.kind == "jsd":
        raise ValueError("the fused kernel covers a single process and the KL family / cross-entropy")
    student, teacher = _same_row_stride(student, teacher)
    n_rows, n_cols = student.shape
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if out is None else out
    values = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    table = torch.empty(n_rows, TABLE_WIDTH, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return values, grad
    is_ce = spec.kind == "ce"
    teacher_or_student = student if teacher is None else teacher
    targets = coef.new_full((n_rows,), -1, dtype=torch.int64) if target_cols is None else target_cols
    has_reverse = not is_ce and spec.forward_weight < 1.0
    has_forward = not is_ce and spec.forward_weight > 0.0
    _fused_loss_grad_kernel[(n_rows,)](
        student, teacher_or_student, grad, table, values, coef.contiguous(), targets, n_cols=n_cols,
        n_valid_cols=shard.valid_columns, inv_temp=inv_temp, forward_weight=spec.forward_weight,
        KIND=_KIND_CODES[spec.kind], HAS_TEACHER=not is_ce, HAS_REVERSE=has_reverse, HAS_FORWARD=has_forward,
        TABLE_W=TABLE_WIDTH, NEG=NEG_BIG, STAGES=NUM_STAGES, BLOCK=_block_for(n_cols), num_warps=NUM_WARPS,
        **_layout(student, teacher, grad),
    )  # fmt: skip
    return values, grad
