"""GRPO's loss and the vocab-parallel token log-probs against float64 references, TP = 1 and 2 (gloo)."""

from __future__ import annotations

import pytest
import torch

from megatron_sdzero.losses.policy import GRPOLossConfig, group_advantages, grpo_loss, token_logprobs
from megatron_sdzero.runtime.launch import run_on_ranks

VALID_VOCAB = 37
PADDED_VOCAB = 40  # 3 padding columns in the last shard at TP = 2


def _inputs(seed: int, dtype: torch.dtype, batch: int = 4, k: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, k, PADDED_VOCAB, generator=g) * 3).to(dtype)
    logits[..., VALID_VOCAB:] = 50.0  # padding columns: must take no probability
    targets = torch.randint(0, VALID_VOCAB, (batch, k), generator=g)
    mask = torch.rand(batch, k, generator=g) > 0.25
    mask[0] = False  # a row with no valid token
    mask[1, :3] = True
    advantages = torch.randn(batch, generator=g)
    # old and reference log-probs around the current ones: ratios on both sides of the clip range
    return {
        "logits": logits,
        "targets": targets,
        "mask": mask,
        "advantages": advantages,
        "old_shift": torch.randn(batch, k, generator=g) * 0.6,
        "ref_shift": torch.randn(batch, k, generator=g) * 0.4,
    }


def _reference(inputs: dict, config: GRPOLossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, count, d loss / d logits) in float64 with plain autograd on the gathered vocabulary."""
    logits = inputs["logits"].double()[..., :VALID_VOCAB].clone().requires_grad_(True)
    lp_all = torch.log_softmax(logits / config.temperature, dim=-1)
    lp = lp_all.gather(-1, inputs["targets"][..., None])[..., 0]
    old = lp.detach() + inputs["old_shift"].double()
    ref = lp.detach() + inputs["ref_shift"].double()
    ratio = torch.exp(lp - old)
    adv = inputs["advantages"].double()[:, None]
    clipped = ratio.clamp(1 - config.clip_eps_low, 1 + config.clip_eps_high)
    per = -torch.minimum(ratio * adv, clipped * adv)
    if config.kl_coef:
        per = per + config.kl_coef * (torch.exp(ref - lp) - (ref - lp) - 1)
    mask = inputs["mask"].double()
    if config.aggregation == "token_mean":
        loss, count = (per * mask).sum(), mask.sum()
    else:
        lengths = mask.sum(1)
        loss = (per * mask / lengths.clamp(min=1)[:, None]).sum()
        count = (lengths > 0).sum().double()
    loss.backward()
    grad = torch.zeros(inputs["logits"].shape, dtype=torch.float64)
    grad[..., :VALID_VOCAB] = logits.grad
    return loss.detach(), count, grad


def _ours(inputs: dict, config: GRPOLossConfig, vocab_start: int = 0, width: int = PADDED_VOCAB, group=None):
    full = inputs["logits"]
    logits = full[..., vocab_start : vocab_start + width].clone().requires_grad_(True)
    lp = token_logprobs(
        logits, inputs["targets"], temperature=config.temperature, vocab_start=vocab_start,
        valid_vocab_size=VALID_VOCAB, tp_group=group,
    )  # fmt: skip
    old = lp.detach() + inputs["old_shift"]
    ref = lp.detach() + inputs["ref_shift"]
    loss, metrics = grpo_loss(lp, inputs["mask"], inputs["advantages"], config, old, ref)
    loss.backward()
    return loss.detach(), metrics, logits.grad


def _grad_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """float32 arithmetic; a bf16 gradient is additionally rounded to bf16 (relative 2^-8)."""
    return {"rtol": 1e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 1e-6}


CONFIGS = [
    GRPOLossConfig(),
    GRPOLossConfig(clip_eps_low=0.1, clip_eps_high=0.28, kl_coef=0.05, temperature=0.7),
    GRPOLossConfig(kl_coef=0.2, aggregation="sequence_mean"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "clip-higher-kl-T0.7", "sequence-mean-kl"])
def test_grpo_loss_and_gradient_match_float64_at_tp1(dtype: torch.dtype, config: GRPOLossConfig) -> None:
    for seed in range(3):
        inputs = _inputs(seed, dtype)
        want_loss, want_count, want_grad = _reference(inputs, config)
        loss, metrics, grad = _ours(inputs, config)
        assert metrics.count.item() == want_count.item()
        torch.testing.assert_close(loss.double(), want_loss, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(grad.double(), want_grad, **_grad_tolerance(dtype))
        assert grad[..., VALID_VOCAB:].abs().max() == 0  # padding gets no gradient
        assert grad[~inputs["mask"]].abs().max() == 0  # masked tokens neither


def test_the_shifts_clip_on_both_sides() -> None:
    """The random inputs exercise both sides of the clip range and both signs of the advantage."""
    inputs = _inputs(0, torch.float32)
    ratio = torch.exp(-inputs["old_shift"])[inputs["mask"]]
    assert (ratio > 1.2).any() and (ratio < 0.8).any()
    assert (inputs["advantages"] > 0).any() and (inputs["advantages"] < 0).any()
    _, metrics, _ = _ours(inputs, GRPOLossConfig())
    assert 0 < metrics.clipped_tokens.item() < metrics.num_tokens.item()


def test_on_policy_ratio_is_one_and_the_gradient_is_the_policy_gradient() -> None:
    inputs = _inputs(5, torch.float32)
    logits = inputs["logits"].clone().requires_grad_(True)
    lp = token_logprobs(logits, inputs["targets"], valid_vocab_size=VALID_VOCAB)
    loss, metrics = grpo_loss(lp, inputs["mask"], inputs["advantages"], GRPOLossConfig())
    assert metrics.ratio_sum.item() == pytest.approx(metrics.num_tokens.item())
    loss.backward()
    reference = inputs["logits"].double()[..., :VALID_VOCAB].clone().requires_grad_(True)
    lp64 = torch.log_softmax(reference, -1).gather(-1, inputs["targets"][..., None])[..., 0]
    (-(lp64 * inputs["advantages"].double()[:, None]) * inputs["mask"]).sum().backward()
    torch.testing.assert_close(logits.grad[..., :VALID_VOCAB].double(), reference.grad, rtol=1e-5, atol=1e-6)


def test_group_advantages_normalise_within_groups_and_flat_groups_are_zero() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])
    adv, flat = group_advantages(rewards, groups)
    assert flat == 3  # groups 1 and 2 (all equal) and group 3 (a single sample)
    assert adv[3:].abs().max() == 0 and torch.isfinite(adv).all()
    first = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    want = (first - first.mean()) / (first.std() + 1e-6)
    torch.testing.assert_close(adv[:3].double(), want, rtol=1e-6, atol=1e-6)
    no_std, _ = group_advantages(rewards, groups, scale_by_std=False)  # Dr. GRPO
    torch.testing.assert_close(no_std[:3].double(), first - first.mean())


def test_kl_without_reference_is_refused() -> None:
    inputs = _inputs(1, torch.float32)
    lp = token_logprobs(inputs["logits"], inputs["targets"], valid_vocab_size=VALID_VOCAB)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, inputs["mask"], inputs["advantages"], GRPOLossConfig(kl_coef=0.1))


def _tp2_rank(config: GRPOLossConfig, seeds: list[int]) -> list[tuple]:
    import torch.distributed as dist

    from megatron_sdzero.runtime.distributed import init_distributed

    init_distributed()
    rank = dist.get_rank()
    width = PADDED_VOCAB // 2
    out = []
    for seed in seeds:
        for dtype in (torch.float32, torch.bfloat16):
            inputs = _inputs(seed, dtype)
            loss, metrics, grad = _ours(inputs, config, rank * width, width, dist.group.WORLD)
            out.append((seed, str(dtype), float(loss), float(metrics.count), grad.double()))
    return out


@pytest.mark.parametrize("config", CONFIGS[:2], ids=["plain", "clip-higher-kl-T0.7"])
def test_grpo_loss_and_gradient_match_float64_at_tp2(config: GRPOLossConfig) -> None:
    ranks = run_on_ranks(_tp2_rank, 2, config, [0, 1], timeout_s=300)
    width = PADDED_VOCAB // 2
    for i, (seed, dtype_name, loss, count, _) in enumerate(ranks[0]):
        dtype = torch.float32 if dtype_name == str(torch.float32) else torch.bfloat16
        want_loss, want_count, want_grad = _reference(_inputs(seed, dtype), config)
        assert count == want_count.item() and ranks[1][i][3] == count
        assert loss == pytest.approx(want_loss.item(), rel=2e-6, abs=2e-6)
        assert ranks[1][i][2] == loss  # every tensor-parallel rank computes the same loss
        grad = torch.cat([ranks[0][i][4], ranks[1][i][4]], dim=-1)
        torch.testing.assert_close(grad, want_grad, **_grad_tolerance(dtype))
        assert grad.shape[-1] == 2 * width
