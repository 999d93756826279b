"""Policy-gradient losses on vocab-parallel logits: per-token log-probs and the GRPO surrogate.

:func:`token_logprobs` gives log pi(y_t | ...) of the sampled tokens from this rank's
[tokens, vocab/TP] logit shard without gathering the vocabulary: the shard's maximum and
sum of exponentials are all-reduced over the tensor-parallel group (as the cross-entropy does),
the target's logit comes from the one shard that owns it. Logits are divided by the sampling
temperature first, so the log-probs are those of the distribution the engine sampled from.
Padding ids (at or above ``valid_vocab_size``) take no probability. The backward is
g_t * (onehot(y_t) - softmax(x_t / T)) / T on each shard, recomputed chunk by chunk in float32.

:func:`grpo_loss`, per valid token t of sample i with advantage A_i (DeepSeekMath's GRPO, PPO-clip)::

    r_t    = exp(lp_t - old_t)                      old_t: the sampling policy's log-prob
    pg_t   = -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i)
    kl_t   = exp(ref_t - lp_t) - (ref_t - lp_t) - 1  (k3 estimator, with a reference model)
    loss_t = pg_t + kl_coef * kl_t

Aggregation: ``token_mean`` sums loss_t over the tokens and counts tokens (Megatron's per-token
loss path then divides by the global token count: the DAPO / Dr. GRPO token-level mean);
``sequence_mean`` sums loss_t / |y_i| and counts sequences (the original per-sequence mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megatron_sdzero.losses.parallel import (
    ProcessGroup,
    VocabShard,
    all_reduce_max_,
    all_reduce_sum_,
    default_tp_group,
    make_vocab_shard,
)

Aggregation = Literal["token_mean", "sequence_mean"]


def _masked_shard(chunk: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """float32 copy of a row chunk with padding columns at -inf."""
    x = chunk.float()
    if shard.valid_columns < shard.size:
        x[:, shard.valid_columns :] = float("-inf")
    return x


def _shard_stats(
    x: torch.Tensor, inv_temp: float, group: ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global row maximum (logit units) and log of the sum of exp((x - max) / T)."""
    row_max = all_reduce_max_(x.max(dim=1).values, group)
    safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sums = torch.exp((x - safe_max[:, None]) * inv_temp).sum(dim=1)
    return safe_max, torch.log(all_reduce_sum_(sums, group))


def _target_logit(x: torch.Tensor, targets: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    owned = shard.owns(targets) & (targets < shard.valid_vocab_size)
    columns = torch.where(owned, targets - shard.start, torch.zeros_like(targets))
    picked = x.gather(1, columns[:, None])[:, 0]
    return all_reduce_sum_(torch.where(owned, picked, torch.zeros_like(picked)), shard.group)


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, shard: VocabShard, inv_temp: float, chunk_tokens: int):
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        maxima = torch.empty_like(out)
        log_sums = torch.empty_like(out)
        for start in range(0, logits.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            x = _masked_shard(logits[rows], shard)
            row_max, log_sum = _shard_stats(x, inv_temp, shard.group)
            target = _target_logit(x, targets[rows], shard)
            out[rows] = (target - row_max) * inv_temp - log_sum
            maxima[rows], log_sums[rows] = row_max, log_sum
        ctx.save_for_backward(logits, targets, maxima, log_sums)
        ctx.shard, ctx.inv_temp, ctx.chunk_tokens = shard, inv_temp, chunk_tokens
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, maxima, log_sums = ctx.saved_tensors
        shard, inv_temp = ctx.shard, ctx.inv_temp
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            x = _masked_shard(logits[rows], shard)
            probs = torch.exp((x - maxima[rows, None]) * inv_temp - log_sums[rows, None])
            g = grad_out[rows].float()
            chunk = -(g[:, None] * inv_temp) * probs
            owned = shard.owns(targets[rows]) & (targets[rows] < shard.valid_vocab_size)
            columns = torch.where(owned, targets[rows] - shard.start, torch.zeros_like(targets[rows]))
            chunk.scatter_add_(
                1, columns[:, None], torch.where(owned, g * inv_temp, torch.zeros_like(g))[:, None]
            )
            grad[rows] = chunk.to(grad.dtype)
        return grad, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int | None = None,
    valid_vocab_size: int | None = None,
    tp_group: ProcessGroup | None = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """log pi(targets) under softmax(logits / temperature), float32, shaped like ``targets``.

    logits: [..., vocab/TP] (this rank's shard); targets: [...] global token ids.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match logits {tuple(logits.shape[:-1])}")
    group = tp_group if tp_group is not None else default_tp_group()
    shard = make_vocab_shard(logits.shape[-1], vocab_start, valid_vocab_size, group)
    flat = logits.reshape(-1, logits.shape[-1])
    ids = targets.reshape(-1).to(device=logits.device, dtype=torch.long)
    return _TokenLogProbs.apply(flat, ids, shard, 1.0 / temperature, chunk_tokens).reshape(targets.shape)


@dataclass(frozen=True)
class GRPOLossConfig:
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2  # DAPO's clip-higher: e.g. 0.28
    kl_coef: float = 0.0  # weight of the k3 KL to the reference model; 0: no reference model
    aggregation: Aggregation = "token_mean"
    temperature: float = 1.0  # the sampling temperature

    def __post_init__(self) -> None:
        from megatron_sdzero.config import ConfigError

        if not (0 <= self.clip_eps_low < 1 and self.clip_eps_high >= 0):
            raise ConfigError(
                f"grpo.loss: clip_eps_low must lie in [0, 1) and clip_eps_high be >= 0, got "
                f"{self.clip_eps_low}, {self.clip_eps_high}"
            )
        if self.kl_coef < 0:
            raise ConfigError(f"grpo.loss.kl_coef: must be >= 0, got {self.kl_coef}")
        if self.aggregation not in ("token_mean", "sequence_mean"):
            raise ConfigError(f"grpo.loss.aggregation: token_mean or sequence_mean, got {self.aggregation!r}")
        if self.temperature <= 0:
            raise ConfigError(f"grpo.loss.temperature: must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class GRPOMetrics:
    """Detached sums over this call's valid tokens (divide by ``num_tokens``)."""

    num_tokens: torch.Tensor  # valid tokens
    count: torch.Tensor  # what the loss is averaged over: tokens or sequences
    clipped_tokens: torch.Tensor  # tokens whose clipped term was the active one
    ratio_sum: torch.Tensor
    kl_sum: torch.Tensor


def grpo_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    config: GRPOLossConfig,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GRPOMetrics]:
    """Summed GRPO loss of one micro-batch (see the module docstring) and its metrics.

    logprobs [B, K] (with gradient) from :func:`token_logprobs`; loss_mask [B, K]; advantages [B];
    old_logprobs [B, K] (None: the current policy sampled, so the ratio is 1 and its gradient the
    policy gradient); ref_logprobs [B, K] for the KL term (needed when ``kl_coef > 0``).
    """
    mask = loss_mask.to(torch.float32)
    old = logprobs.detach() if old_logprobs is None else old_logprobs.float()
    ratio = torch.exp(logprobs - old)
    adv = advantages.float()[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if config.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("grpo_loss: kl_coef > 0 needs ref_logprobs")
        log_ratio = ref_logprobs.float() - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1.0
        per_token = per_token + config.kl_coef * kl
    lengths = mask.sum(dim=1)
    if config.aggregation == "token_mean":
        token_weight, count = mask, lengths.sum()
    else:
        token_weight = mask / lengths.clamp(min=1.0)[:, None]
        count = (lengths > 0).sum().float()
    # where() and not a product: a masked position's inf/NaN must not leak into the sum.
    loss = torch.where(mask > 0, per_token * token_weight, torch.zeros_like(per_token)).sum()
    with torch.no_grad():
        active_clip = (clipped < unclipped) & (mask > 0)
        metrics = GRPOMetrics(
            num_tokens=lengths.sum(),
            count=count,
            clipped_tokens=active_clip.sum().float(),
            ratio_sum=(ratio * mask).sum(),
            kl_sum=(kl * mask).sum(),
        )
    return loss, metrics


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, scale_by_std: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, int]:
    """(r_i - mean of its group) [/ (std of its group + eps)], and the number of groups whose rewards
    are all equal (their advantages are exactly 0: no gradient, never NaN). std is the sample
    standard deviation (n - 1), as in DeepSeekMath's implementation; a group of one has std 0."""
    rewards = rewards.double()
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    groups = len(unique)
    counts = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards))
    means = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, rewards) / counts
    centred = rewards - means[inverse]
    squares = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, centred**2)
    std = torch.sqrt(squares / (counts - 1).clamp(min=1.0))
    flat = squares <= 1e-24
    advantages = centred
    if scale_by_std:
        advantages = centred / (std[inverse] + eps)
    advantages = torch.where(flat[inverse], torch.zeros_like(advantages), advantages)
    return advantages.float(), int(flat.sum())
