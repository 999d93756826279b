"""Float64 single-process references and test cases for megatron_sdzero.losses.

Holds no tests itself: test_losses.py (CPU, TP = 1, 2, 4 over gloo) and test_losses_triton.py
(GPU / Triton interpreter) import it. The references are written independently of the library:
plain log-softmax over the kept vocabulary ids, row by row, with autograd for the gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_sdzero.losses import DistillLossConfig

# Tolerances (documented in docs/benchmarks.md): |got - ref| <= ATOL + RTOL * |ref| for loss values
# and per-token values; gradients, elementwise: |got - ref| <= GRAD_TOL_FP32 * scale, plus
# GRAD_TOL_BF16 * |ref| when the gradient is stored in bf16, where scale = max(max |ref|, unit) and
# unit = max token weight / (valid tokens * temperature) is the size of a gradient entry whose
# probability moves by one nat: float32 arithmetic cannot resolve gradients far below it (with
# |logits| ~ 1e4 in bf16 whole gradients are ~1e-27, all cancellation).
VALUE_RTOL = 2e-5
VALUE_ATOL = 1e-6
GRAD_TOL_FP32 = 2e-5
GRAD_TOL_BF16 = 2.0**-7  # one bf16 ulp: the gradient is rounded to bf16 once


@dataclass(frozen=True)
class Case:
    """One comparison: inputs are built from the seed; the config decides the divergence."""

    name: str
    config: DistillLossConfig
    seed: int = 0
    seq: int = 5
    batch: int = 3
    vocab: int = 96  # padded vocabulary, divisible by 4 for TP = 4
    valid_vocab: int = 90  # ids 90..95 are Megatron padding (finite garbage in the logits)
    scale: float = 3.0
    offset: float = 0.0  # added to every finite student and teacher logit
    student_dtype: torch.dtype = torch.float32
    teacher_dtype: torch.dtype = torch.float32
    neg_inf_columns: tuple[int, ...] = ()
    inf_masked_row: bool = False
    # Finite teacher logits per row of every other row (cycling through the tuple), fewer than some
    # top-k: the teacher is -inf at the other valid ids, and so is the student unless student_keeps.
    teacher_support: tuple[int, ...] = ()
    student_keeps: bool = False


TOP_DISTINCT = 80  # more than any k the tests use, so no top-k cut falls inside a tie


def _bf16_teacher_without_ties_at_the_top(shape: tuple[int, ...], case: Case, gen) -> torch.Tensor:
    """bf16 has too few values for a whole vocabulary of distinct logits (at 151936 columns ranks
    spaced 0.08 reach 12000, where one bf16 ulp is 64: hundreds of ties at the top), and a top-k
    cut inside a tie makes the loss depend on tie-breaking. So: moderate logits, then in every row
    TOP_DISTINCT random valid columns set to 20, 20.5, ... (bf16 ulp <= 0.25 there): the top-k is
    unique for every k <= TOP_DISTINCT."""
    teacher = torch.randn(shape, generator=gen, dtype=torch.float64) * 3.0
    valid = case.valid_vocab or case.vocab
    top = min(TOP_DISTINCT, valid)
    columns = torch.rand(*shape[:-1], valid, generator=gen).argsort(dim=-1)[..., :top]
    planted = 20.0 + 0.5 * torch.arange(top, dtype=torch.float64)
    return teacher.scatter_(-1, columns, planted.expand(columns.shape).contiguous())


def _rule_out_teacher_ids(student: torch.Tensor, teacher: torch.Tensor, case: Case, gen) -> None:
    """In place: rows 1, 3, ... (flattened) keep teacher_support[i] finite valid teacher logits (i
    cycling): id 0 and random others; the other valid ids are -inf in both (padding columns stay
    finite garbage). Id 0 is where an empty candidate slot used to point. With student_keeps the
    student stays finite there: the reverse (and mixed) KL is +inf outside renormalised top-k."""
    valid = case.valid_vocab or case.vocab
    flat_s, flat_t = student.view(-1, case.vocab), teacher.view(-1, case.vocab)
    for index, row in enumerate(range(1, flat_t.shape[0], 2)):
        support = case.teacher_support[index % len(case.teacher_support)]
        ruled_out = 1 + torch.randperm(valid - 1, generator=gen)[support - 1 :]
        if not case.student_keeps:
            flat_s[row, ruled_out] = float("-inf")
        flat_t[row, ruled_out] = float("-inf")


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    """Logits [seq, batch, vocab] (Megatron's layout), mask [seq, batch], per-sample weights [1, batch]."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = (case.seq, case.batch, case.vocab)
    student = torch.randn(shape, generator=gen, dtype=torch.float64) * case.scale
    # Teacher correlated with the student, like a related model: the KL stays moderate.
    teacher = 0.6 * student + torch.randn(shape, generator=gen, dtype=torch.float64) * case.scale
    if case.teacher_dtype == torch.bfloat16:
        teacher = _bf16_teacher_without_ties_at_the_top(shape, case, gen)
    student += case.offset
    teacher += case.offset
    if case.neg_inf_columns:
        student[..., list(case.neg_inf_columns)] = float("-inf")
        teacher[..., list(case.neg_inf_columns)] = float("-inf")
    if case.teacher_support:
        _rule_out_teacher_ids(student, teacher, case, gen)
    loss_mask = (torch.rand(case.seq, case.batch, generator=gen) > 0.3).to(torch.float32)
    loss_mask[0, :] = 0.0  # a fully masked position (a prompt token of every sample)
    loss_mask[1, 0] = 1.0
    if case.inf_masked_row:
        student[0, 1, :] = float("-inf")
        teacher[0, 1, :] = float("-inf")
    # Sample 1 is switched off; the others weigh differently.
    weights = torch.tensor([[(1.0, 0.0, 2.5, 0.5)[b % 4] for b in range(case.batch)]], dtype=torch.float32)
    return {
        "student": student.to(case.student_dtype),
        "teacher": teacher.to(case.teacher_dtype),
        "loss_mask": loss_mask,
        "sample_weights": weights,
    }


def _bucket_divergence(u: torch.Tensor, v: torch.Tensor, config: DistillLossConfig) -> torch.Tensor:
    lp, lq = torch.log_softmax(u, -1), torch.log_softmax(v, -1)
    p, q = lp.exp(), lq.exp()
    reverse = _expected_log_ratio(p, lp, lq)
    forward = _expected_log_ratio(q, lq, lp)
    if config.kind == "reverse":
        return reverse
    if config.kind == "forward":
        return forward
    if config.kind == "mixed":
        w = config.mixed_forward_weight
        return w * forward + (1 - w) * reverse
    beta = config.jsd_beta
    lm = torch.logaddexp(lq + math.log(beta), lp + math.log(1 - beta))
    return beta * _expected_log_ratio(q, lq, lm) + (1 - beta) * _expected_log_ratio(p, lp, lm)


def _expected_log_ratio(p: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q), with 0 log 0 = 0 (an outcome of probability 0 adds nothing)."""
    return torch.where(p > 0, p * (lp - lq), 0.0).sum()


def _row_buckets(s: torch.Tensor, t: torch.Tensor, config: DistillLossConfig):
    """Bucket logits of one row over the kept ids (valid and not -inf in both). The top-k ids are
    the teacher's min(k, finite) largest finite logits: an id the teacher rules out is no candidate."""
    kept = torch.isfinite(s.detach()) | torch.isfinite(t)
    s, t = s[kept], t[kept]
    if config.top_k is None:
        return s, t
    finite = torch.isfinite(t).nonzero().squeeze(1)
    top = finite[torch.topk(t[finite], min(config.top_k, finite.numel())).indices]
    if not config.top_k_tail:
        return s[top], t[top]
    rest = torch.ones_like(t, dtype=torch.bool)
    rest[top] = False
    if not rest.any():
        return s[top], t[top]
    u = torch.cat([s[top], torch.logsumexp(s[rest], 0, keepdim=True)])
    v = torch.cat([t[top], torch.logsumexp(t[rest], 0, keepdim=True)])
    return u, v


def reference_loss_and_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    loss_mask: torch.Tensor,
    sample_weights: torch.Tensor,
    config: DistillLossConfig,
    valid_vocab: int,
    num_valid_global: int | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    """(loss, d loss / d student float64, per-token values, gradient unit) of the token-level mean."""
    x = student.detach().to(torch.float64).requires_grad_()
    teacher64 = teacher.detach().to(torch.float64)
    weights = (loss_mask != 0).to(torch.float64) * sample_weights.to(torch.float64)
    flat_w = weights.reshape(-1)
    flat_x = x.reshape(-1, x.shape[-1])[:, :valid_vocab] / config.temperature
    flat_t = teacher64.reshape(-1, x.shape[-1])[:, :valid_vocab] / config.temperature
    values = []
    for row in range(flat_x.shape[0]):
        if flat_w[row] == 0:
            values.append(flat_x.new_zeros(()))
            continue
        values.append(_bucket_divergence(*_row_buckets(flat_x[row], flat_t[row], config), config))
    token_values = torch.stack(values)
    count = int((flat_w != 0).sum()) if num_valid_global is None else num_valid_global
    loss = (token_values * flat_w).sum() / max(count, 1)
    # A token of value +inf (reverse or mixed KL with student mass where the teacher has none) is
    # +inf for every finite student: its gradient is 0, so it stays out of the differentiated sum.
    finite = [value * flat_w[row] for row, value in enumerate(values) if torch.isfinite(value)]
    differentiated = torch.stack(finite).sum() / max(count, 1) if finite else loss
    needs_grad = differentiated.requires_grad
    (grad,) = torch.autograd.grad(differentiated, x) if needs_grad else (torch.zeros_like(x),)
    unit = flat_w.max().item() / (max(count, 1) * config.temperature)
    return loss.item(), grad, token_values.detach().reshape(weights.shape), unit


def reference_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, valid_vocab: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(loss, gradient, per-token cross-entropy) of the masked token mean, float64."""
    x = logits.detach().to(torch.float64).requires_grad_()
    mask = (loss_mask != 0).to(torch.float64)
    log_probs = torch.log_softmax(x[..., :valid_vocab], dim=-1)
    safe_labels = torch.where(loss_mask != 0, labels, 0)
    token_ce = -log_probs.gather(-1, safe_labels[..., None]).squeeze(-1) * mask
    loss = token_ce.sum() / mask.sum().clamp(min=1)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.item(), grad, token_ce.detach()


def value_error(got: float, ref: float) -> float:
    """Error in units of the tolerance: <= 1 passes."""
    if math.isinf(ref) or math.isinf(got):
        return 0.0 if got == ref else math.inf
    return abs(got - ref) / (VALUE_ATOL + VALUE_RTOL * abs(ref))


def grad_error(got: torch.Tensor, ref: torch.Tensor, student_dtype: torch.dtype, unit: float = 0.0) -> float:
    """Gradient error in units of the tolerance: <= 1 passes."""
    got64 = got.to(torch.float64)
    scale = max(ref.abs().max().item(), unit)
    if scale == 0.0:
        return 0.0 if got64.abs().max().item() == 0.0 else math.inf
    if student_dtype == torch.float32:
        return (got64 - ref).abs().max().item() / (GRAD_TOL_FP32 * scale)
    allowed = GRAD_TOL_BF16 * ref.abs() + GRAD_TOL_FP32 * scale
    return ((got64 - ref).abs() / allowed).max().item()


def _configs_for(kind: str, **kind_args) -> list[tuple[str, DistillLossConfig]]:
    out = [(f"{kind}-full", DistillLossConfig(kind=kind, chunk_tokens=4, **kind_args))]
    for k in (5, 56):  # 56 > a TP=2 shard (48) and > a TP=4 shard (24)
        out.append((f"{kind}-top{k}", DistillLossConfig(kind=kind, top_k=k, chunk_tokens=4, **kind_args)))
        out.append(
            (
                f"{kind}-top{k}-tail",
                DistillLossConfig(kind=kind, top_k=k, top_k_tail=True, chunk_tokens=4, **kind_args),
            )
        )
    return out


def _variants() -> list[dict]:
    return [
        {"tag": "fp32"},
        {
            "tag": "bf16-T0.7",
            "student_dtype": torch.bfloat16,
            "teacher_dtype": torch.bfloat16,
            "temperature": 0.7,
        },
        {"tag": "fp32-student-bf16-teacher", "teacher_dtype": torch.bfloat16},
        {"tag": "extreme-1e4", "scale": 1e4},
        # a large common offset keeps probabilities spread: any rounding of x/T shows in the gradient
        {"tag": "offset-1e4-T0.7", "offset": 1e4, "temperature": 0.7},
        {"tag": "neg-inf", "neg_inf_columns": (7, 40, 41, 88), "inf_masked_row": True},
        # rows with fewer finite teacher logits than k = 5 or 56: the cut falls among -inf ties
        {"tag": "few-finite-teacher", "teacher_support": (1, 3, 30)},
        # the same with the student finite where the teacher is -inf (infinite reverse KL)
        {"tag": "teacher-rules-out", "teacher_support": (1, 3, 30), "student_keeps": True},
    ]


def all_cases() -> list[Case]:
    """Every kind x {full, top-k small, top-k larger than a shard, with/without tail} x input variant."""
    kinds = [
        ("reverse", {}),
        ("forward", {}),
        ("mixed", {"mixed_forward_weight": 0.3}),
        ("jsd", {"jsd_beta": 0.3}),
    ]
    cases = []
    for seed, variant in enumerate(_variants()):
        variant = dict(variant)
        tag, temperature = variant.pop("tag"), variant.pop("temperature", 1.0)
        for kind, kind_args in kinds:
            for name, config in _configs_for(kind, **kind_args):
                config = DistillLossConfig(**{**config.__dict__, "temperature": temperature})
                cases.append(Case(name=f"{name}/{tag}", config=config, seed=seed, **variant))
    return cases
