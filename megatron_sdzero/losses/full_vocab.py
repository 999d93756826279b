"""Full-vocabulary divergences and cross-entropy on vocab-parallel logit shards.

Steps, each small and static (the layout of Megatron-Core's vocab-parallel cross-entropy):

1. local pass: per row and per shard, with x the student and y the teacher logits (padding ids ->
   -inf), a_x = max x, s = (x - a_x)/T, z_s = sum exp(s), the same for y (a_y, t, z_t), and the cross
   terms
       c_rev = sum exp(s) * (s - t),   c_fwd = sum exp(t) * (t - s);
2. all-reduce MAX of (a_x, a_y) over the tensor-parallel group -> global maxima A_x, A_y;
3. rescale every shard's sums to the global maxima (factor exp((a_x - A_x)/T)) and all-reduce SUM
   -> Z_s, Z_t, C_rev, C_fwd;
4. per row: log p = (x - A_x)/T - log Z_s, log q = (y - A_y)/T - log Z_t and
       KL(p || q) = C_rev / Z_s - log Z_s + log Z_t,   KL(q || p) = C_fwd / Z_t - log Z_t + log Z_s.
   Everything is kept relative to the row maxima, in logit units, and 1/T multiplies differences
   only: logits of size 1e4 lose no precision to cancellation at any temperature. JSD needs log p
   and log q inside a logarithm of their mixture, so it does one more pass (sums of p log(p/m) and
   q log(q/m)) and one more all-reduce.

The gradient pass recomputes log p and log q per row from the global table (one more read of both
shards) and writes the gradient; it runs in the forward, as soon as the table is known (with TP = 1
on the GPU both passes are one fused kernel), so the backward only has to rescale it when the
upstream gradient is not 1. With the table every rank's gradient is local, no communication:
    d KL(p||q) / d s_i = p_i (log p_i - log q_i - KL(p||q))
    d KL(q||p) / d s_i = p_i - q_i
    d JSD_beta / d s_i = (1 - beta) p_i (log p_i - log m_i - KL(p || m)),  m = beta q + (1 - beta) p
    d CE / d s_i       = p_i - [i == label]
and d/d student = (1/T) d/d s.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

import megatron_sdzero.losses._torch_kernels as _torch_kernels
from megatron_sdzero.losses._cluster_kernel import select_fused_kernel
from megatron_sdzero.losses._torch_kernels import TABLE_WIDTH, GradSpec
from megatron_sdzero.losses.config import Backend
from megatron_sdzero.losses.parallel import VocabShard, all_reduce_max_, all_reduce_sum_


def select_kernels(backend: Backend, device: torch.device) -> ModuleType:
    """The module of per-row passes to use: Triton for CUDA tensors when available, else PyTorch."""
    if backend == "torch":
        return _torch_kernels
    if backend == "auto" and device.type != "cuda":
        return _torch_kernels
    try:
        from megatron_sdzero.losses import _triton_kernels
    except ImportError as error:
        if backend == "triton":
            raise ImportError("backend='triton' needs the triton package (pip install triton)") from error
        return _torch_kernels
    return _triton_kernels


@dataclass(frozen=True)
class PassSettings:
    """Everything the per-row passes need besides the tensors."""

    shard: VocabShard
    inv_temp: float
    chunk_tokens: int
    kernels: ModuleType


def combine_shard_stats(
    local: torch.Tensor, shard: VocabShard, inv_temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3: global (max_s, Z_s, max_t, Z_t) and (C_rev, C_fwd) from every shard's local stats
    (maxima in logit units)."""
    # stack, not local[:, [0, 2]]: indexing with a Python list copies the index to the GPU (a sync)
    maxima = all_reduce_max_(torch.stack([local[:, 0], local[:, 2]], dim=1), shard.group)
    max_s, max_t = maxima[:, 0], maxima[:, 1]
    gap_s, gap_t = local[:, 0] - max_s, local[:, 2] - max_t
    scale_s, scale_t = (gap_s * inv_temp).exp(), (gap_t * inv_temp).exp()
    # A shard with only -inf logits has max NEG_BIG and sums 0: multiply its sums by the (huge)
    # shift before 1/T, so that 0 * shift stays 0 instead of 0 * inf.
    shift = gap_s - gap_t
    sums = torch.stack(
        [
            scale_s * local[:, 1],
            scale_t * local[:, 3],
            scale_s * (local[:, 4] + local[:, 1] * shift * inv_temp),
            scale_t * (local[:, 5] - local[:, 3] * shift * inv_temp),
        ],
        dim=1,
    )
    all_reduce_sum_(sums, shard.group)
    return torch.stack([max_s, sums[:, 0], max_t, sums[:, 1]], dim=1), sums[:, 2:]


def _table(global_stats: torch.Tensor) -> torch.Tensor:
    """Global table: max_s, log Z_s, max_t, log Z_t, then the kind-specific scalar (filled later)."""
    table = torch.zeros(global_stats.shape[0], TABLE_WIDTH, dtype=torch.float32, device=global_stats.device)
    table[:, 0] = global_stats[:, 0]
    table[:, 1] = global_stats[:, 1].log()
    table[:, 2] = global_stats[:, 2]
    table[:, 3] = global_stats[:, 3].log()
    return table


def _kl_pair(table: torch.Tensor, cross: torch.Tensor, sum_s: torch.Tensor, sum_t: torch.Tensor):
    log_sum_gap = table[:, 1] - table[:, 3]
    reverse = cross[:, 0] / sum_s - log_sum_gap
    forward = cross[:, 1] / sum_t + log_sum_gap
    return reverse, forward


def _neutralise_inactive(table: torch.Tensor, values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Inactive rows get a finite table and value 0, so nothing downstream can turn into NaN.
    (masked_fill_, not table[~active] = 0: boolean indexing waits for the GPU.)"""
    table.masked_fill_(~active[:, None], 0.0)
    return torch.where(active, values, 0.0)


def _divergence_values(
    student: torch.Tensor, teacher: torch.Tensor, active: torch.Tensor, spec: GradSpec, settings: PassSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 for the KL family and JSD: per-row values and the global table for the gradient."""
    kernels, shard = settings.kernels, settings.shard
    local = kernels.local_softmax_stats(
        student, teacher, active, shard, settings.inv_temp,
        need_reverse=spec.kind == "kl" and spec.forward_weight < 1.0,
        need_forward=spec.kind == "kl" and spec.forward_weight > 0.0,
        chunk_tokens=settings.chunk_tokens,
    )  # fmt: skip
    global_stats, cross = combine_shard_stats(local, shard, settings.inv_temp)
    table = _table(global_stats)
    if spec.kind == "jsd":
        sums = kernels.jsd_local_sums(
            student, teacher, active, table, shard, settings.inv_temp, spec.jsd_beta, settings.chunk_tokens
        )
        all_reduce_sum_(sums, shard.group)
        table[:, 4] = sums[:, 0]
        values = spec.jsd_beta * sums[:, 1] + (1.0 - spec.jsd_beta) * sums[:, 0]
    else:
        reverse, forward = _kl_pair(table, cross, global_stats[:, 1], global_stats[:, 3])
        table[:, 4] = reverse
        w = spec.forward_weight
        values = (1.0 - w) * reverse + w * forward if 0.0 < w < 1.0 else (forward if w == 1.0 else reverse)
    return _neutralise_inactive(table, values, active), table


def _cross_entropy_values(
    logits: torch.Tensor, label_logit: torch.Tensor, active: torch.Tensor, settings: PassSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    local = settings.kernels.local_softmax_stats(
        logits, None, active, settings.shard, 1.0, False, False, settings.chunk_tokens
    )
    global_stats, _ = combine_shard_stats(local, settings.shard, 1.0)
    table = _table(global_stats)
    values = table[:, 1] - (label_logit - table[:, 0])
    return _neutralise_inactive(table, values, active), table


def label_columns(labels: torch.Tensor, active: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Each label's column in this shard, -1 where another rank owns it (or the token is inactive)."""
    owned = shard.owns(labels) & active & (labels < shard.valid_vocab_size)
    return torch.where(owned, labels - shard.start, -1)


def _label_logits(student: torch.Tensor, local_cols: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Each label's logit, gathered from the rank that owns it (all-reduce MAX of [tokens])."""
    owned = local_cols >= 0
    picked = student.gather(1, local_cols.clamp(min=0)[:, None]).squeeze(1).to(torch.float32)
    return all_reduce_max_(torch.where(owned, picked, float("-inf")), shard.group)


def _uses_fused_kernel(settings: PassSettings, spec: GradSpec, needs_grad: bool) -> bool:
    fused_available = getattr(settings.kernels, "FUSE_SINGLE_PROCESS", False)
    return needs_grad and settings.shard.tp_size == 1 and spec.kind != "jsd" and fused_available


def _in_place_target(student: torch.Tensor, grad_in_place: bool, needs_grad: bool) -> torch.Tensor | None:
    """The student itself when the gradient may overwrite it (rows contiguous, like the kernels'
    gradient buffers); else None and a separate gradient buffer."""
    rows_contiguous = student.stride(-1) == 1 and student.stride(0) == student.shape[-1]
    return student if grad_in_place and needs_grad and rows_contiguous else None


def scale_precomputed_grad(grad: torch.Tensor, grad_loss: torch.Tensor, kernels: ModuleType) -> torch.Tensor:
    """grad * upstream gradient, skipping the pass over the gradient when the upstream is exactly 1
    (loss.backward(), Megatron's per-token-loss mode). On the GPU the check happens in the kernel
    (no host sync, which would leave the GPU idle while Python prepares the next call); on the CPU
    it is a plain comparison."""
    scale_on_device = getattr(kernels, "scale_unless_one_", None)
    if grad.is_cuda and scale_on_device is not None:
        return scale_on_device(grad, grad_loss)
    if bool(grad_loss == 1.0):
        return grad
    return grad.mul_(grad_loss.to(torch.float32))


class FullVocabLoss(torch.autograd.Function):
    """sum_t coef_t * value_t over the full vocabulary, value = divergence or cross-entropy.

    Returns (loss, per-token values); only the loss is differentiable, only w.r.t. the student.
    The gradient is computed in the forward, right after the per-row statistics (one fused kernel
    with TP = 1 on the GPU: the one-pass cluster kernel where it qualifies, see _cluster_kernel.py),
    and the backward only rescales it when the upstream gradient is not 1. With ``grad_in_place``
    the gradient overwrites the student logits, whose version counter is then bumped so that any
    other autograd node that saved them fails at backward instead of using the gradient.
    """

    @staticmethod
    def forward(
        ctx, student, teacher, labels, row_coef, spec: GradSpec, settings: PassSettings, needs_grad: bool,
        grad_in_place: bool = False,
    ):  # type: ignore[override]  # fmt: skip
        active = row_coef != 0
        grad_coef = row_coef * settings.inv_temp
        local_cols = None if labels is None else label_columns(labels, active, settings.shard)
        out = _in_place_target(student, grad_in_place, needs_grad)
        if _uses_fused_kernel(settings, spec, needs_grad):
            fused = select_fused_kernel(settings.kernels, student, teacher, spec)
            values, grad = fused(
                student, teacher, grad_coef, local_cols, settings.shard, settings.inv_temp, spec, out=out
            )
        else:
            if spec.kind == "ce":
                label_logit = _label_logits(student, local_cols, settings.shard)
                values, table = _cross_entropy_values(student, label_logit, active, settings)
            else:
                values, table = _divergence_values(student, teacher, active, spec, settings)
            grad = None
            if needs_grad:
                grad = settings.kernels.divergence_grad(
                    student, teacher, table, grad_coef, local_cols, settings.shard, settings.inv_temp, spec,
                    settings.chunk_tokens, out=out,
                )  # fmt: skip
        if out is not None:
            torch.autograd.graph.increment_version(out)
        ctx.precomputed_grad, ctx.kernels = grad, settings.kernels
        ctx.mark_non_differentiable(values)
        return (values * row_coef).sum(), values

    @staticmethod
    def backward(ctx, grad_loss, grad_values):  # type: ignore[override]
        del grad_values  # the per-token values are outputs for logging only
        grad, ctx.precomputed_grad = ctx.precomputed_grad, None
        if grad is None:
            raise RuntimeError("distill_loss / masked_cross_entropy ran without grad mode; cannot backward")
        return scale_precomputed_grad(grad, grad_loss, ctx.kernels), None, None, None, None, None, None, None


def row_coefficients(grad_values: torch.Tensor, active: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """Upstream gradient per row times 1/T; exactly zero on inactive rows (their value is a constant)."""
    return torch.where(active, grad_values.to(torch.float32) * inv_temp, 0.0).contiguous()


__all__ = [
    "FullVocabLoss",
    "PassSettings",
    "label_columns",
    "row_coefficients",
    "scale_precomputed_grad",
    "select_kernels",
]
