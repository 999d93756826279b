"""Triton kernels for the teacher-top-k modes (the GPU path of ``topk.py``).

One program per token row finds this shard's top-k columns of the teacher in two streaming passes,
with no sort over the vocabulary:

1. threshold: the running maximum of every position of a column block, folded into at least 4 k
   disjoint strided column groups; the k-th largest group maximum ``tau`` has at least k valid
   columns at or above it, and in practice not many more (about 1.15 k on 151936 columns, whatever
   the order of the logits);
2. collect: the columns with teacher >= tau are appended to a per-row scratch list of sort keys
   (value descending, then column ascending); with the tail bucket the same pass also accumulates
   the teacher's and the student's online log-sum-exp over every other valid column, read directly
   (never as "all minus top-k", which cancels);
3. the top k of the scratch list (a bitonic top-k of at most a few hundred keys) are the row's
   columns; with the tail, the collected columns that did not make it are added to both tails.

A row with more candidates than the scratch list holds (massive ties at tau) finds the exact k-th
largest sort key by bisection (a counting pass per step, at most 64, only on such rows) and collects
again with it: exactly k candidates. So every row is exact in the kernel, with no flag for the host
to check. Inactive rows are launched too and read nothing (no host-side list of active rows).
The tail-bucket gradient (every column's share of the tail bucket's gradient, in proportion to its
student probability) is one more streaming kernel.
Rows are re-aligned to 16 bytes as in ``_triton_kernels.py``; offsets are 64-bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megatron_sdzero.losses._torch_kernels import NEG_BIG
from megatron_sdzero.losses._triton_kernels import _block_ranges, _row_layout
from megatron_sdzero.losses.parallel import VocabShard

# Launch settings (columns per block, warps, software-pipelining stages). Not yet swept on a GPU:
# 1024-column blocks keep the selection kernel near 104 registers (two 8-warp programs per SM;
# 2048 needs 223, one program per SM); the tail-gradient kernel is shaped like the full-vocabulary
# gradient pass and takes that pass's tuned settings.
BLOCK_COLUMNS = int(os.environ.get("SDZERO_TOPK_BLOCK", "1024"))
GRAD_BLOCK_COLUMNS = int(os.environ.get("SDZERO_TOPK_GRAD_BLOCK", "2048"))
NUM_WARPS = int(os.environ.get("SDZERO_TOPK_WARPS", "8"))
NUM_STAGES = int(os.environ.get("SDZERO_TOPK_STAGES", "4"))
# Column groups of the threshold pass: with 4 k of them (at least 256) the threshold lets through
# about 1.05-1.15 k candidates for k = 64 to 256 on 151936 columns (simulated: normal, Zipf-like,
# sorted logits).
MIN_LANE_GROUPS = 256
# Scratch keys per row (at least the padded k): 512 holds about 7x the usual candidate count for
# k = 64 and 1.7x for k = 256.
MIN_CANDIDATES = int(os.environ.get("SDZERO_TOPK_CANDIDATES", "512"))
# Larger k (per shard) take the PyTorch path: lane groups, scratch list and the in-register top-k
# are sized for k up to 256.
MAX_TOP_K = 256

_COLUMN_BITS = tl.constexpr(2**31 - 1)
_LOW_BITS = tl.constexpr(2**32 - 1)
_NO_KEY = tl.constexpr(-(2**63) + 1)  # below every key of a non-NaN value
TAIL_WIDTH = 4  # teacher max, teacher sum of exp((x - max) / T), the same for the student (max: raw)


@triton.jit
def _load_raw(ptr, offs, cols, n_valid, MASKED: tl.constexpr):
    """float32 logits, unscaled; -inf outside columns [0, n_valid) when MASKED."""
    if MASKED:
        x = tl.load(ptr + offs, mask=(cols >= 0) & (cols < n_valid), other=-float("inf"))
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _sort_key(x, cols):
    """int64 keys whose descending order is (value descending, column ascending)."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats order backwards as ints
    return (ordered.to(tl.int64) << 32) | (cols ^ _COLUMN_BITS).to(tl.int64)  # 2**31 - 1 - column


@triton.jit
def _key_column(key):
    return ((key & _LOW_BITS) ^ _COLUMN_BITS).to(tl.int32)


@triton.jit
def _online_lse(x, running_max, sums, inv_temp):
    """One block of an online log-sum-exp of x / T: scalar running maximum of x (finite, logit
    units), per-lane sums of exp((x - max) / T)."""
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    return new_max, sums * tl.exp((running_max - new_max) * inv_temp) + tl.exp((x - new_max) * inv_temp)


@triton.jit
def _lane_max_step(t_row, i, lead, n_read, lane_max, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offs = i * BLOCK + tl.arange(0, BLOCK)
    return tl.maximum(lane_max, _load_raw(t_row, offs, offs - lead, n_read, MASKED))


@triton.jit
def _threshold(
    t_row, lead, n_read, n_blocks, k,
    STAGES: tl.constexpr, LANES: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Pass 1: the k-th largest maximum of LANES disjoint column groups (-inf with fewer groups
    holding a valid column): at least k valid columns lie at or above it."""
    head_end, body_begin, body_end, tail_begin = _block_ranges(lead, n_read, n_blocks, BLOCK)
    lane_max = tl.full((BLOCK,), -float("inf"), tl.float32)
    for i in range(0, head_end):
        lane_max = _lane_max_step(t_row, i, lead, n_read, lane_max, True, BLOCK)
    for i in tl.range(body_begin, body_end, num_stages=STAGES):
        lane_max = _lane_max_step(t_row, i, lead, n_read, lane_max, False, BLOCK)
    for i in range(tail_begin, n_blocks):
        lane_max = _lane_max_step(t_row, i, lead, n_read, lane_max, True, BLOCK)
    # Group g holds the positions g, g + LANES, ...: strided, so neighbouring large logits spread out.
    group_max = tl.max(tl.reshape(lane_max, (BLOCK // LANES, LANES)), axis=0)
    top = tl.topk(group_max, KP)
    return tl.max(tl.where(tl.arange(0, KP) == k - 1, top, -float("inf")), axis=0)


@triton.jit
def _count_at_or_above(t_row, lead, n_read, n_blocks, floor, BLOCK: tl.constexpr):
    """Valid columns whose sort key is >= floor (one masked pass over the row)."""
    count = tl.zeros((), tl.int32)
    for i in range(0, n_blocks):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        cols = offs - lead
        t = _load_raw(t_row, offs, cols, n_read, True)
        above = (_sort_key(t, cols) >= floor) & (cols >= 0) & (cols < n_read)
        count += tl.sum(above.to(tl.int32), axis=0)
    return count


@triton.jit
def _kth_key(t_row, lead, n_read, n_blocks, k, BLOCK: tl.constexpr):
    """The k-th largest sort key of the row's valid columns (k <= their number), by bisection over
    the int64 range (at most 64 counting passes). Keys are unique (they hold the column), so exactly
    k valid columns have a key at or above the result; ties in value go to the lowest columns."""
    lo = tl.full((), _NO_KEY, tl.int64)  # every valid column's key is at or above it
    hi = tl.full((), 2**63 - 1, tl.int64)
    while lo < hi:
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2) without overflow
        if _count_at_or_above(t_row, lead, n_read, n_blocks, mid, BLOCK) >= k:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _collect_step(
    t_row, s_row, keys_row, i, lead, n_read, inv_temp, bound, count, max_t, sum_t, max_s, sum_s,
    WITH_TAIL: tl.constexpr, EXACT: tl.constexpr, MASKED: tl.constexpr, CAP: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Pass 2, one block: append the candidates' keys (teacher >= the threshold ``bound``, or with
    EXACT, sort key >= the key ``bound``); with the tail, the other columns' sums."""
    offs = i * BLOCK + tl.arange(0, BLOCK)
    cols = offs - lead
    t = _load_raw(t_row, offs, cols, n_read, MASKED)
    if EXACT:
        picked = _sort_key(t, cols) >= bound
    else:
        picked = t >= bound
    if MASKED:
        picked = picked & (cols >= 0) & (cols < n_read)
    n_picked = tl.sum(picked.to(tl.int32), axis=0)
    if n_picked > 0:
        slot = count + tl.cumsum(picked.to(tl.int32), axis=0) - 1
        tl.store(keys_row + slot, _sort_key(t, cols), mask=picked & (slot < CAP))
    if WITH_TAIL:
        s = _load_raw(s_row, offs, cols, n_read, MASKED)
        max_t, sum_t = _online_lse(tl.where(picked, -float("inf"), t), max_t, sum_t, inv_temp)
        max_s, sum_s = _online_lse(tl.where(picked, -float("inf"), s), max_s, sum_s, inv_temp)
    return count + n_picked, max_t, sum_t, max_s, sum_s


@triton.jit
def _add_leftovers(x, running_max, sums, inv_temp):
    """Total sum of exp((x - max) / T) relative to the new maximum, after adding the values x
    (-inf: none)."""
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    old_part = tl.sum(sums, axis=0) * tl.exp((running_max - new_max) * inv_temp)
    return new_max, old_part + tl.sum(tl.exp((x - new_max) * inv_temp), axis=0)


@triton.jit
def _pick_top(
    t_row, s_row, keys_row, ids_row, tail_row, lead, count, k, inv_temp, max_t, sum_t, max_s, sum_s,
    WITH_TAIL: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr,
):  # fmt: skip
    """Pass 3: the k best candidates' columns; with the tail, the others join both tails."""
    slots = tl.arange(0, CAP)
    keys = tl.load(keys_row + slots, mask=slots < count, other=_NO_KEY)
    top = tl.topk(keys, KP)
    ranks = tl.arange(0, KP)
    tl.store(ids_row + ranks, tl.where(ranks < count, _key_column(top), 0))
    if WITH_TAIL:
        kth = tl.max(tl.where(ranks == k - 1, top, _NO_KEY), axis=0)
        rest = (slots < count) & (keys < kth)
        cols = lead + _key_column(keys)
        t = tl.load(t_row + cols, mask=rest, other=-float("inf")).to(tl.float32)
        s = tl.load(s_row + cols, mask=rest, other=-float("inf")).to(tl.float32)
        max_t, total_t = _add_leftovers(t, max_t, sum_t, inv_temp)
        max_s, total_s = _add_leftovers(s, max_s, sum_s, inv_temp)
        tl.store(tail_row + 0, max_t)
        tl.store(tail_row + 1, total_t)
        tl.store(tail_row + 2, max_s)
        tl.store(tail_row + 3, total_s)


@triton.jit
def _collect_pass(
    t_row, s_row, keys_row, lead, n_read, n_blocks, inv_temp, bound,
    WITH_TAIL: tl.constexpr, EXACT: tl.constexpr, NEG: tl.constexpr, CAP: tl.constexpr,
    STAGES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Pass 2 over the row: the candidates' keys (see ``_collect_step`` for ``bound``) and, with
    the tail, the online log-sum-exps of the other columns."""
    head_end, body_begin, body_end, tail_begin = _block_ranges(lead, n_read, n_blocks, BLOCK)
    count = tl.zeros((), tl.int32)
    max_t = tl.full((), NEG, tl.float32)
    max_s = tl.full((), NEG, tl.float32)
    sum_t = tl.zeros((BLOCK,), tl.float32)
    sum_s = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, head_end):
        count, max_t, sum_t, max_s, sum_s = _collect_step(
            t_row, s_row, keys_row, i, lead, n_read, inv_temp, bound, count, max_t, sum_t, max_s, sum_s,
            WITH_TAIL, EXACT, True, CAP, BLOCK,
        )  # fmt: skip
    for i in tl.range(body_begin, body_end, num_stages=STAGES):
        count, max_t, sum_t, max_s, sum_s = _collect_step(
            t_row, s_row, keys_row, i, lead, n_read, inv_temp, bound, count, max_t, sum_t, max_s, sum_s,
            WITH_TAIL, EXACT, False, CAP, BLOCK,
        )  # fmt: skip
    for i in range(tail_begin, n_blocks):
        count, max_t, sum_t, max_s, sum_s = _collect_step(
            t_row, s_row, keys_row, i, lead, n_read, inv_temp, bound, count, max_t, sum_t, max_s, sum_s,
            WITH_TAIL, EXACT, True, CAP, BLOCK,
        )  # fmt: skip
    return count, max_t, sum_t, max_s, sum_s


@triton.jit
def _top_k_kernel(
    t_ptr, s_ptr, active_ptr, keys_ptr, ids_ptr, tail_ptr,
    row_stride, n_valid_cols, k, inv_temp,
    WITH_TAIL: tl.constexpr, USE_THRESHOLD: tl.constexpr, KP: tl.constexpr, LANES: tl.constexpr,
    CAP: tl.constexpr, TAIL_W: tl.constexpr, NEG: tl.constexpr, ALIGN: tl.constexpr, VEC: tl.constexpr,
    STAGES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row; inactive rows read no column (their outputs stay neutral)."""
    row = tl.program_id(0).to(tl.int64)
    n_read = tl.where(tl.load(active_ptr + row) != 0, n_valid_cols, 0)
    base, lead, n_blocks = _row_layout(row, row_stride, n_read, ALIGN, VEC, BLOCK)
    t_row, s_row, keys_row = t_ptr + base, s_ptr + base, keys_ptr + row * CAP
    if USE_THRESHOLD:
        tau = _threshold(t_row, lead, n_read, n_blocks, k, STAGES, LANES, KP, BLOCK)
    else:
        tau = tl.full((), -float("inf"), tl.float32)
    count, max_t, sum_t, max_s, sum_s = _collect_pass(
        t_row, s_row, keys_row, lead, n_read, n_blocks, inv_temp, tau, WITH_TAIL, False, NEG, CAP, STAGES,
        BLOCK,
    )  # fmt: skip
    if count > CAP:  # massive ties at tau: collect exactly the k largest keys instead
        tl.debug_barrier()
        kth = _kth_key(t_row, lead, n_read, n_blocks, k, BLOCK)
        count, max_t, sum_t, max_s, sum_s = _collect_pass(
            t_row, s_row, keys_row, lead, n_read, n_blocks, inv_temp, kth, WITH_TAIL, True, NEG, CAP, STAGES,
            BLOCK,
        )  # fmt: skip
    tl.debug_barrier()  # the scratch keys were stored by other threads of this program
    _pick_top(
        t_row, s_row, keys_row, ids_ptr + row * KP, tail_ptr + row * TAIL_W, lead, count, k, inv_temp,
        max_t, sum_t, max_s, sum_s, WITH_TAIL, KP, CAP,
    )  # fmt: skip


@triton.jit
def _tail_grad_step(
    s_row, g_row, i, lead, n_read, n_cols, inv_temp, tail_max, tail_log, coef,
    MASKED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = i * BLOCK + tl.arange(0, BLOCK)
    cols = offs - lead
    s = _load_raw(s_row, offs, cols, n_read, MASKED)
    grad = tl.exp((s - tail_max) * inv_temp - tail_log) * coef
    if MASKED:
        grad = tl.where((cols >= 0) & (cols < n_read), grad, 0.0)
        tl.store(g_row + offs, grad.to(g_row.dtype.element_ty), mask=(cols >= 0) & (cols < n_cols))
    else:
        tl.store(g_row + offs, grad.to(g_row.dtype.element_ty))


@triton.jit
def _tail_grad_kernel(
    s_ptr, g_ptr, tail_ptr, coef_ptr, row_stride, n_cols, n_valid_cols, inv_temp,
    ALIGN: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """grad[c] = coef * exp(s_c / T - log tail mass) on valid columns, 0 elsewhere and where coef = 0;
    the tail is [max, log sum exp((s - max) / T)]."""
    row = tl.program_id(0).to(tl.int64)
    coef = tl.load(coef_ptr + row)
    n_read = tl.where(coef != 0, n_valid_cols, 0)
    base, lead, n_blocks = _row_layout(row, row_stride, n_cols, ALIGN, VEC, BLOCK)
    head_end, body_begin, body_end, tail_begin = _block_ranges(lead, n_read, n_blocks, BLOCK)
    tail_max, tail_log = tl.load(tail_ptr + row * 2), tl.load(tail_ptr + row * 2 + 1)
    s_row, g_row = s_ptr + base, g_ptr + base
    for i in range(0, head_end):
        _tail_grad_step(
            s_row, g_row, i, lead, n_read, n_cols, inv_temp, tail_max, tail_log, coef, True, BLOCK
        )
    for i in tl.range(body_begin, body_end, num_stages=STAGES):
        _tail_grad_step(
            s_row, g_row, i, lead, n_read, n_cols, inv_temp, tail_max, tail_log, coef, False, BLOCK
        )
    for i in range(tail_begin, n_blocks):
        _tail_grad_step(
            s_row, g_row, i, lead, n_read, n_cols, inv_temp, tail_max, tail_log, coef, True, BLOCK
        )


def _layout(*tensors: torch.Tensor) -> dict:
    """Shared row stride and whether rows may be re-aligned to 16 bytes (same dtype and 16-byte
    aligned base pointers): then the unmasked loops read and write 16-byte vectors."""
    if any(tensor.stride(-1) != 1 for tensor in tensors) or len({t.stride(0) for t in tensors}) != 1:
        raise ValueError("the Triton top-k path needs logits with contiguous rows of one stride")
    align = all(t.dtype == tensors[0].dtype and t.data_ptr() % 16 == 0 for t in tensors)
    return {"row_stride": tensors[0].stride(0), "ALIGN": align, "VEC": 16 // tensors[0].element_size()}


def _contiguous_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its rows are packed (Megatron's logits), else a packed copy."""
    if tensor.stride(-1) == 1 and tensor.stride(0) == tensor.shape[1]:
        return tensor
    return tensor.contiguous()


def _block_for(n_cols: int, block_columns: int) -> int:
    return min(block_columns, triton.next_power_of_2(max(n_cols, 16)))


def _scratch_keys(padded_k: int) -> int:
    return max(MIN_CANDIDATES, padded_k)


@dataclass(frozen=True)
class LocalTopK:
    """This shard's top-k of the teacher per row, as ``local_top_k`` found it.

    columns: [rows, k] int64 local columns (0 on inactive rows), in no particular order.
    tail: [rows, TAIL_WIDTH] float32 over the shard's other valid columns, logits divided by the
        temperature: teacher max, teacher sum of exp(t - max), student max, student sum; None
        without the tail bucket.
    """

    columns: torch.Tensor
    tail: torch.Tensor | None


def neutral_tails(n_rows: int, device: torch.device) -> torch.Tensor:
    """[rows, TAIL_WIDTH] tails of no column: maxima NEG_BIG, sums 0 (filled on the device: a
    tensor built from a Python list would be a blocking copy)."""
    tail = torch.zeros(n_rows, TAIL_WIDTH, dtype=torch.float32, device=device)
    tail[:, 0::2] = NEG_BIG
    return tail


def _launch_top_k(
    teacher: torch.Tensor,
    student: torch.Tensor | None,
    active: torch.Tensor,
    outputs: tuple[torch.Tensor, torch.Tensor],
    k: int,
    shard: VocabShard,
    inv_temp: float,
) -> None:
    """One program per row, writing (columns, tail) in place."""
    columns, tail = outputs
    kp = columns.shape[1]
    cap, block = _scratch_keys(kp), _block_for(shard.size, BLOCK_COLUMNS)
    lanes = min(max(MIN_LANE_GROUPS, 4 * kp), block)
    n_rows = teacher.shape[0]
    keys = torch.empty(n_rows, cap, dtype=torch.int64, device=teacher.device)
    pair = (teacher,) if student is None else (teacher, student)
    _top_k_kernel[(n_rows,)](
        teacher, pair[-1], active.to(torch.int8), keys, columns, tail, n_valid_cols=shard.valid_columns,
        k=k, inv_temp=inv_temp, WITH_TAIL=student is not None, USE_THRESHOLD=lanes >= kp, KP=kp,
        LANES=lanes, CAP=cap, TAIL_W=TAIL_WIDTH, NEG=NEG_BIG, STAGES=NUM_STAGES, BLOCK=block,
        num_warps=NUM_WARPS, **_layout(*pair),
    )  # fmt: skip


def local_top_k(
    teacher: torch.Tensor,
    student: torch.Tensor | None,
    active: torch.Tensor,
    k: int,
    shard: VocabShard,
    inv_temp: float,
) -> LocalTopK:
    """Top-k valid columns of this teacher shard per active row (ties: lowest column first); with
    ``student``, also both tails over the other valid columns. Needs 1 <= k <= MAX_TOP_K."""
    if not 1 <= k <= min(MAX_TOP_K, shard.valid_columns):
        raise ValueError(f"local top-k of {k} columns out of range for {shard.valid_columns} valid columns")
    teacher = _contiguous_rows(teacher)
    student = None if student is None else _contiguous_rows(student)
    n_rows, device = teacher.shape[0], teacher.device
    columns = torch.zeros(n_rows, triton.next_power_of_2(k), dtype=torch.int32, device=device)
    tail = neutral_tails(n_rows, device)
    if n_rows > 0:
        _launch_top_k(teacher, student, active, (columns, tail), k, shard, inv_temp)
    return LocalTopK(columns=columns[:, :k].to(torch.int64), tail=None if student is None else tail)


def tail_grad(
    student: torch.Tensor, tail: torch.Tensor, tail_coef: torch.Tensor, shard: VocabShard, inv_temp: float
) -> torch.Tensor:
    """Gradient w.r.t. the student shard from the tail bucket alone (student dtype):
    tail_coef[row] * exp(s_c / T - log tail mass) on valid columns, with tail = [max, log sum
    exp((s - max) / T)] per row.
    Top-k columns get a value too; the caller overwrites them."""
    student = _contiguous_rows(student)
    n_rows, n_cols = student.shape
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n_rows > 0:
        _tail_grad_kernel[(n_rows,)](
            student, grad, tail.contiguous(), tail_coef.to(torch.float32).contiguous(), n_cols=n_cols,
            n_valid_cols=shard.valid_columns, inv_temp=inv_temp, STAGES=NUM_STAGES,
            BLOCK=_block_for(n_cols, GRAD_BLOCK_COLUMNS),
            num_warps=NUM_WARPS, **_layout(student, grad),
        )  # fmt: skip
    return grad


__all__ = ["MAX_TOP_K", "TAIL_WIDTH", "LocalTopK", "local_top_k", "neutral_tails", "tail_grad"]
