"""Megatron-Core models built from HF configs match transformers, at TP=1, TP=2 and PP=2 (gloo).

The checkpoints are converted once at TP2 x PP2 and loaded at each layout, so these tests also
check that the distributed checkpoint reshards on load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron_checks import logits_loss_and_grads, merge_ranks

from megatron_sdzero.conversion.convert import hf_to_mcore
from megatron_sdzero.runtime.launch import run_on_ranks

LAYOUTS = [(1, 1), (2, 1), (1, 2)]


@pytest.fixture(scope="module")
def converted(tiny_hf_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mcore")
    return {name: hf_to_mcore(path, root / name, tp=2, pp=2) for name, path in tiny_hf_models.items()}


def _grads(model, arch) -> dict:
    """The final norm's gradient (last stage) and the untied embedding's, TP shards gathered."""
    from megatron.core import parallel_state, tensor_parallel

    grads = {}
    if parallel_state.is_pipeline_last_stage():
        grads["final_norm"] = model.decoder.final_layernorm.weight.grad.clone()
    if parallel_state.is_pipeline_first_stage() and not arch.tie_word_embeddings:
        shard = model.embedding.word_embeddings.weight.grad
        grads["embedding"] = tensor_parallel.gather_from_tensor_model_parallel_region(shard.t()).t()
    return {"grads": grads}


@pytest.fixture(scope="module")
def megatron_results(converted) -> dict:
    torch.manual_seed(0)
    tokens = torch.randint(0, 500, (2, 48))
    checkpoints = {name: str(path) for name, path in converted.items()}
    results = {
        (tp, pp): merge_ranks(
            run_on_ranks(logits_loss_and_grads, tp * pp, checkpoints, tp, pp, tokens, _grads)
        )
        for tp, pp in LAYOUTS
    }
    return {"tokens": tokens, "results": results}


@pytest.mark.parametrize("name", ["qwen3_untied", "qwen3_tied", "llama_tied"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"tp{layout[0]}pp{layout[1]}")
def test_logits_match_transformers(name, layout, megatron_results, tiny_hf_models):
    from transformers import AutoModelForCausalLM

    tokens = megatron_results["tokens"]
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_models[name], dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(tokens).logits
    ours = megatron_results["results"][layout][name]["logits"]
    assert ours.shape == reference.shape
    assert reference.std() > 0.5, "weights too small for a meaningful comparison"
    assert (ours - reference).abs().max() < 1e-4


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_loss_and_grads_match_tp1(layout, megatron_results):
    for name in ("qwen3_untied", "qwen3_tied", "llama_tied"):
        base = megatron_results["results"][(1, 1)][name]
        other = megatron_results["results"][layout][name]
        assert abs(base["loss"] - other["loss"]) < 1e-5, name
        assert base["grads"].keys() == other["grads"].keys()
        for key, grad in base["grads"].items():
            assert grad.abs().max() > 0
            torch.testing.assert_close(
                other["grads"][key],
                grad,
                rtol=1e-4,
                atol=1e-5 * float(grad.abs().max()),
                msg=lambda m, n=name, k=key: f"{n}.{k}: {m}",
            )
