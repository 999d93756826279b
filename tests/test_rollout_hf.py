"""The CPU rollout engine: per-request seeds, stop conditions, raw log-probs, reload."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_sdzero.config import ConfigError
from megatron_sdzero.rollout.base import ModelSource, RolloutConfig, SamplingParams, build_engine
from megatron_sdzero.rollout.hf_engine import HFEngine, _top_p


@pytest.fixture(scope="module")
def engine(tiny_hf_models: dict[str, Path]) -> HFEngine:
    config = RolloutConfig(engine="hf", batch_size=4, max_model_len=512, threads=1)
    return build_engine(ModelSource(tiny_hf_models["qwen3_tied"], family="qwen3"), config)


@pytest.fixture(scope="module")
def prompts(engine: HFEngine) -> list[list[int]]:
    texts = ["What is 2 + 3?", "Ben has 4 apples.", "Let us think step by step before we answer. Then"]
    return [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in completions] for completions in outputs]


def test_samples_depend_on_the_seed_not_on_the_batch(engine: HFEngine, prompts) -> None:
    params = [SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=12, seed=s) for s in (11, 12, 13)]
    together = engine.generate(prompts, params)
    alone = [engine.generate([p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    assert _ids(together) == _ids(alone)
    reordered = engine.generate(prompts[::-1], params[::-1])[::-1]
    assert _ids(reordered) == _ids(together)
    engine.config.batch_size = 1
    try:
        assert _ids(engine.generate(prompts, params)) == _ids(together)
    finally:
        engine.config.batch_size = 4
    assert all(len(c) == 2 for c in together) and together[0][0].token_ids != together[0][1].token_ids
    other_seed = engine.generate(prompts[:1], SamplingParams(n=2, max_tokens=12, top_p=0.9, seed=99))
    assert _ids(other_seed)[0] != _ids(together)[0]


def test_logprobs_are_the_models_raw_logprobs(engine: HFEngine, prompts) -> None:
    params = SamplingParams(n=1, temperature=0.7, top_p=0.8, max_tokens=10, seed=5, logprobs=True)
    completion = engine.generate(prompts[:1], params)[0][0]
    sequence = torch.tensor([prompts[0] + completion.token_ids])
    with torch.no_grad():
        logits = engine.model(sequence).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)[len(prompts[0]) - 1 : -1]
    expected = reference.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-4)
    assert engine.generate(prompts[:1], SamplingParams(max_tokens=3, seed=1))[0][0].logprobs is None


def test_greedy_follows_the_argmax(engine: HFEngine, prompts) -> None:
    completion = engine.generate(prompts[1:2], SamplingParams(temperature=0.0, max_tokens=6))[0][0]
    sequence = list(prompts[1])
    with torch.no_grad():
        for _ in range(6):
            sequence.append(int(engine.model(torch.tensor([sequence])).logits[0, -1].argmax()))
    assert completion.token_ids == sequence[len(prompts[1]) :]


def test_stop_ids_strings_and_length(engine: HFEngine, prompts) -> None:
    base = SamplingParams(n=1, temperature=1.0, max_tokens=16, seed=3)
    free = engine.generate(prompts[:1], base)[0][0]
    assert free.finish_reason == "length" and len(free.token_ids) == 16
    stop_token = free.token_ids[4]
    first = free.token_ids.index(stop_token)
    stopped = engine.generate(prompts[:1], replace(base, stop_token_ids=(stop_token,)))
    assert stopped[0][0].token_ids == free.token_ids[: first + 1]  # same draws, stop token included
    assert stopped[0][0].finish_reason == "stop"

    text = free.text
    stop = next(text[i : i + 2] for i in range(len(text) // 3, len(text)) if text[i : i + 2].isalnum())
    cut = engine.generate(prompts[:1], replace(base, stop=(stop,)))[0][0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    assert free.token_ids[: len(cut.token_ids)] == cut.token_ids

    engine.config.max_model_len = len(prompts[0]) + 5
    try:
        assert len(engine.generate(prompts[:1], base)[0][0].token_ids) == 5  # room left under max_model_len
        with pytest.raises(ValueError, match="no room"):
            engine.generate([prompts[0] + [1] * 5], base)
    finally:
        engine.config.max_model_len = 512


def test_reload_swaps_the_weights(tiny_hf_models: dict[str, Path], prompts) -> None:
    engine = HFEngine(tiny_hf_models["qwen3_tied"], RolloutConfig(threads=1))
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    before = engine.generate(prompts[:1], greedy)[0][0].token_ids
    engine.reload(tiny_hf_models["qwen3_untied"])
    after = engine.generate(prompts[:1], greedy)[0][0].token_ids
    fresh = HFEngine(tiny_hf_models["qwen3_untied"], RolloutConfig(threads=1))
    assert after == fresh.generate(prompts[:1], greedy)[0][0].token_ids and after != before


def test_top_p_keeps_the_smallest_head_reaching_the_mass() -> None:
    probs = torch.tensor([0.2, 0.5, 0.3])
    assert torch.allclose(_top_p(probs, 0.6), torch.tensor([0.0, 0.625, 0.375]))
    assert torch.allclose(_top_p(probs, 0.5), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(_top_p(probs, 1.0), probs)


def test_sampling_params_are_validated() -> None:
    for bad in ({"n": 0}, {"top_p": 0.0}, {"temperature": -1.0}, {"max_tokens": 0}):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)
