"""OLMo-3: config reading, Megatron logits vs transformers at TP1/TP2/PP2, gradients, exact round trip.

Tiny models have OLMo-3-7B's structure (3 sliding-window layers + 1 full-attention layer, YaRN RoPE
on the full-attention layer, post-norms, full-width QK norms) with GQA, a window of 8 and 40-token
sequences, so the window, the per-layer RoPE and the TP split of the QK norms all matter.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron_checks import logits_loss_and_grads, merge_ranks
from safetensors.torch import load_file

from megatron_sdzero.conversion.convert import hf_to_mcore, mcore_to_hf
from megatron_sdzero.data.formatting import resolve_phrases
from megatron_sdzero.models.architecture import LayerRope, UnsupportedModelError, architecture_from_hf
from megatron_sdzero.models.builder import padded_vocab_size
from megatron_sdzero.models.olmo3 import olmo3_transformer_config
from megatron_sdzero.runtime.launch import run_on_ranks

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
MODELS = ["yarn_untied", "plain_tied"]
SEQ = 40
WINDOW = 8

# allenai/Olmo-3-7B-Instruct's config.json (transformers 4.57 layout), architecture keys only.
OLMO3_7B = {
    "architectures": ["Olmo3ForCausalLM"],
    "model_type": "olmo3",
    "attention_bias": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-06,
    "rope_theta": 500000,
    "rope_scaling": {
        "attention_factor": 1.2079441541679836,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "yarn",
    },
    "sliding_window": 4096,
    "layer_types": (["sliding_attention"] * 3 + ["full_attention"]) * 8,
    "tie_word_embeddings": False,
    "vocab_size": 100278,
    "torch_dtype": "bfloat16",
}


# --- config ------------------------------------------------------------------------------------------


def test_olmo3_7b_config_is_read_as_transformers_reads_it():
    arch = architecture_from_hf(OLMO3_7B)
    assert (arch.family, arch.qk_norm, arch.num_layers, arch.head_dim) == ("olmo3", "full", 32, 128)
    assert (arch.vocab_size, padded_vocab_size(arch.vocab_size, 128, 8)) == (100278, 100352)
    assert arch.norm_epsilon == 1e-6 and not arch.tie_word_embeddings
    assert arch.layer_types == tuple(OLMO3_7B["layer_types"]) and arch.sliding_window == 4096
    assert arch.rope_theta == 500000.0 and arch.rope_scaling_factor is None  # sliding layers: plain RoPE
    yarn = arch.full_attention_rope.yarn
    assert arch.full_attention_rope.theta == 500000.0
    assert (yarn.factor, yarn.original_max_position_embeddings, yarn.beta_fast, yarn.beta_slow) == (
        8,
        8192,
        32,
        1,
    )
    assert yarn.attention_factor == 1.2079441541679836
    settings = olmo3_transformer_config(arch)
    assert settings["window_size"] == (4095, 0)
    assert settings["window_attn_skip_freq"] == [0 if (i + 1) % 4 == 0 else 1 for i in range(32)]
    assert settings["apply_rope_fusion"] is False  # TE's fused THD RoPE would drop YaRN's cos/sin scale


ROPE_LAYOUTS = {
    "legacy_yarn": {
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    },
    "nested_mscale": {
        "rope_parameters": {
            "full_attention": {
                "rope_type": "yarn",
                "rope_theta": 50.0,
                "factor": 2.0,
                "original_max_position_embeddings": 16,
                "mscale": 2.0,
                "mscale_all_dim": 1.0,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 9.0},
        }
    },
    "nested_partial": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 7.0}}},
    "defaults": {},
}


@pytest.mark.parametrize("layout", sorted(ROPE_LAYOUTS))
def test_rope_per_layer_type_matches_transformers(layout):
    from transformers import Olmo3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = {**OLMO3_7B, "num_hidden_layers": 4, "layer_types": None, "max_position_embeddings": 128}
    for key in ("rope_theta", "rope_scaling"):
        config.pop(key)
    config.update(ROPE_LAYOUTS[layout])
    arch = architecture_from_hf(config)
    hf = Olmo3Config.from_dict(copy.deepcopy(config))
    assert arch.layer_types == tuple(hf.layer_types)
    assert arch.rope_theta == hf.rope_parameters["sliding_attention"]["rope_theta"]
    assert hf.rope_parameters["sliding_attention"]["rope_type"] == "default"
    full = arch.full_attention_rope or LayerRope(theta=arch.rope_theta)
    hf_full = hf.rope_parameters["full_attention"]
    assert full.theta == hf_full["rope_theta"]
    assert (full.yarn is not None) == (hf_full["rope_type"] == "yarn")
    if full.yarn is not None:
        _, hf_attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, layer_type="full_attention")
        assert full.yarn.attention_factor == pytest.approx(hf_attention_factor, rel=1e-12)
        assert full.yarn.attention_factor != 1.0


SLIDING_YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "rope_theta": 1e4}
BAD_CONFIGS = {
    "ambiguous_theta": ({"rope_theta": 10000.0, "rope_scaling": None}, "transformers 4 and 5"),
    "yarn_on_sliding": ({"rope_parameters": {"sliding_attention": SLIDING_YARN}}, "sliding-window layers"),
    "flat_rope_parameters": ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "keyed by"),
    "unknown_layer_type": ({"layer_types": ["chunked_attention"] * 32}, "chunked_attention"),
    "layer_count": ({"layer_types": ["full_attention"] * 3}, "3 entries for 32 layers"),
    "attention_bias": ({"attention_bias": True}, "attention_bias"),
    "no_window": ({"sliding_window": None}, "sliding_window=None"),
    "yarn_truncate_false": ({"rope_scaling": {**OLMO3_7B["rope_scaling"], "truncate": False}}, "truncate"),
    "longrope": ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_unsupported_olmo3_configs_are_refused_by_name(case):
    change, needle = BAD_CONFIGS[case]
    with pytest.raises(UnsupportedModelError, match=needle):
        architecture_from_hf({**OLMO3_7B, **change})


def test_olmo3_family_resolves_to_the_olmo_control_phrases():
    phrases = resolve_phrases(architecture_from_hf(OLMO3_7B).family)
    assert phrases.incorrect == "Wrong. I need to redo all."
    assert phrases.correct == "Let me rephrase the above solution."


# --- the sliding-window mask ---------------------------------------------------------------------------


def _megatron_window_mask(seq: int, window: int) -> torch.Tensor:
    from megatron.core.transformer.utils import get_sliding_window_causal_mask

    from megatron_sdzero.runtime.cpu_compat import enable_cpu_compat

    enable_cpu_compat()  # the mask is made on "cuda"; a no-op where there is a GPU
    arch = architecture_from_hf({**OLMO3_7B, "sliding_window": window})
    masked = get_sliding_window_causal_mask(seq, seq, olmo3_transformer_config(arch)["window_size"])
    return ~masked.cpu()  # Megatron marks the masked-out positions


def test_megatron_window_mask_is_transformers_sliding_window():
    from transformers.masking_utils import sliding_window_causal_mask_function

    allowed = sliding_window_causal_mask_function(WINDOW)
    index = torch.arange(20)
    reference = torch.stack([torch.stack([allowed(0, 0, q, kv) for kv in index]) for q in index])
    (ours,) = run_on_ranks(_megatron_window_mask, 1, 20, WINDOW)
    assert reference[19].sum() == WINDOW  # a token sees itself and the WINDOW - 1 before it
    assert torch.equal(ours, reference)


# --- Megatron vs transformers --------------------------------------------------------------------------


def _make(root: Path, name: str, **kwargs) -> Path:
    from conftest import _perturb_norms

    from megatron_sdzero.assets.tiny_olmo3 import make_tiny_olmo3

    path = make_tiny_olmo3(root / name, sliding_window=WINDOW, seed=5, **kwargs)
    _perturb_norms(path / "model.safetensors", seed=5)
    return path


@pytest.fixture(scope="module")
def olmo3_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_olmo3")
    return {
        "yarn_untied": _make(root, "yarn_untied", yarn=True, tie_word_embeddings=False),
        "plain_tied": _make(root, "plain_tied", yarn=False, tie_word_embeddings=True),
    }


@pytest.fixture(scope="module")
def converted(olmo3_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("olmo3_mcore")
    return {name: hf_to_mcore(path, root / name, tp=2, pp=2) for name, path in olmo3_models.items()}


def _tp_gathered(tensor: torch.Tensor) -> torch.Tensor:
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(tensor.unsqueeze(0)).squeeze(0)


def _grads(model, arch) -> dict[str, torch.Tensor]:
    """Gradients of the parameters OLMo-3 adds, whole (TP shards gathered), by global layer."""
    from megatron.core import parallel_state

    grads = {}
    for layer in model.decoder.layers:
        i = layer.layer_number - 1
        grads[f"{i}.q_norm"] = _tp_gathered(layer.self_attention.q_norm.weight.grad)
        grads[f"{i}.k_norm"] = _tp_gathered(layer.self_attention.k_norm.weight.grad)
        grads[f"{i}.post_attention"] = layer.post_attention_layernorm.weight.grad.clone()
        grads[f"{i}.post_mlp"] = layer.post_mlp_layernorm.weight.grad.clone()
    if parallel_state.is_pipeline_first_stage() and not arch.tie_word_embeddings:
        grads["embedding"] = _tp_gathered(model.embedding.word_embeddings.weight.grad.t()).t()
    return grads


def _grad_norm(model) -> float:
    """The gradient norm as Megatron's optimizer computes it: each TP-sharded parameter once."""
    from megatron.core import parallel_state
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    grads = [
        p.grad
        for p in model.parameters()
        if p.grad is not None and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)
    ]
    return get_grad_norm_fp32(grads, grad_stats_parallel_group=parallel_state.get_model_parallel_group())


def _grads_and_norm(model, arch) -> dict:
    return {"grads": _grads(model, arch), "grad_norm": _grad_norm(model)}


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 760, (2, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def megatron_results(converted, tokens) -> dict:
    checkpoints = {name: str(path) for name, path in converted.items()}
    return {
        (tp, pp): merge_ranks(
            run_on_ranks(
                logits_loss_and_grads, tp * pp, checkpoints, tp, pp, tokens, _grads_and_norm, timeout_s=600
            )
        )
        for tp, pp in LAYOUTS
    }


def _hf_logits(path: Path, tokens: torch.Tensor, **config_changes) -> torch.Tensor:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"tp{layout[0]}pp{layout[1]}")
def test_logits_match_transformers(name, layout, megatron_results, olmo3_models, tokens):
    reference = _hf_logits(olmo3_models[name], tokens)
    ours = megatron_results[layout][name]["logits"]
    assert ours.shape == reference.shape == (2, SEQ, 768)
    assert reference.std() > 0.5, "weights too small for a meaningful comparison"
    assert (ours - reference).abs().max() < 1e-4


def test_the_window_and_the_yarn_layer_change_the_logits(olmo3_models, tokens):
    """The parity above would catch a wrong window or a missing YaRN: both move the logits a lot."""
    path = olmo3_models["yarn_untied"]
    reference = _hf_logits(path, tokens)
    no_window = _hf_logits(path, tokens, sliding_window=SEQ)
    window_one_larger = _hf_logits(path, tokens, sliding_window=WINDOW + 1)
    plain = {"rope_type": "default", "rope_theta": 1e4}
    plain_rope = _hf_logits(
        path, tokens, rope_parameters={"sliding_attention": plain, "full_attention": plain}
    )
    # The window only hides tokens more than WINDOW - 1 back.
    torch.testing.assert_close(reference[:, :WINDOW], no_window[:, :WINDOW], rtol=0, atol=1e-5)
    for changed in (no_window, window_one_larger, plain_rope):
        assert (changed - reference).abs().max() > 1e-2


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_loss_and_grads_match_tp1(layout, megatron_results):
    for name in MODELS:
        base, other = megatron_results[(1, 1)][name], megatron_results[layout][name]
        assert abs(base["loss"] - other["loss"]) < 1e-5, name
        assert base["grads"].keys() == other["grads"].keys()
        assert "3.q_norm" in base["grads"] and ("embedding" in base["grads"]) == (name == "yarn_untied")
        if layout == (2, 1):  # (at PP2 a tied embedding's two copies are summed by finalize_model_grads)
            assert other["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5), name
        for key, grad in base["grads"].items():
            assert grad.abs().max() > 0, f"{name}.{key}"
            torch.testing.assert_close(
                other["grads"][key],
                grad,
                rtol=1e-4,
                atol=1e-5 * float(grad.abs().max()),
                msg=lambda m, n=name, k=key: f"{n}.{k}: {m}",
            )


def _packed_and_separate(checkpoint: str, first: torch.Tensor, second: torch.Tensor) -> tuple:
    """Logits of two sequences packed in one row (block-causal mask, as SFT packing on the local
    spec does) and of each on its own."""
    from megatron_sdzero.conversion.megatron_io import ModelMeta, _build, load_weights, resolve_checkpoint
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel
    from megatron_sdzero.training.packing import block_causal_mask

    init_model_parallel(ParallelConfig())
    root, ckpt = resolve_checkpoint(Path(checkpoint))
    model = _build(ModelMeta.read(root))
    load_weights(model, ckpt)
    model.eval()

    def run(tokens, positions, mask):
        with torch.no_grad():
            return model(tokens.unsqueeze(0), positions.unsqueeze(0), mask)[0]

    packed = torch.cat([first, second])
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])
    segments = torch.cat([torch.zeros(len(first)), torch.ones(len(second))]).unsqueeze(0)
    together = run(packed, positions, block_causal_mask(segments))
    return together, run(first, torch.arange(len(first)), None), run(second, torch.arange(len(second)), None)


def test_packed_sequences_do_not_see_each_other_in_windowed_layers(converted, tokens):
    """Megatron's local softmax swaps any given mask for the window mask; packing must still hold."""
    first, second = tokens[0, :24], tokens[1, :20]
    (result,) = run_on_ranks(_packed_and_separate, 1, str(converted["yarn_untied"]), first, second)
    together, alone_first, alone_second = result
    assert together.shape[0] == 44
    torch.testing.assert_close(together[:24], alone_first, rtol=0, atol=1e-4)
    torch.testing.assert_close(together[24:], alone_second, rtol=0, atol=1e-4)


# --- conversion --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_tp2_pp2_is_bit_exact(name, olmo3_models, converted, tmp_path):
    back = mcore_to_hf(converted[name], tmp_path / "hf")
    original, exported = (
        load_file(olmo3_models[name] / "model.safetensors"),
        load_file(back / "model.safetensors"),
    )
    assert original.keys() == exported.keys()
    assert any(k.endswith("post_feedforward_layernorm.weight") for k in original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key


def test_qk_norm_weights_are_split_over_tp_like_the_heads(olmo3_models, converted):
    """At TP2 each rank holds the q_norm/k_norm entries of its own heads (needed for the TP logits)."""
    from megatron_sdzero.conversion.megatron_io import load_model_rank, resolve_checkpoint

    root, ckpt = resolve_checkpoint(converted["yarn_untied"])
    ranks = run_on_ranks(load_model_rank, 2, str(root), str(ckpt), 2, 1)
    hf = load_file(olmo3_models["yarn_untied"] / "model.safetensors")
    for which, width in (("q", 64), ("k", 32)):
        full = hf[f"model.layers.1.self_attn.{which}_norm.weight"]
        shards = [state[f"decoder.layers.1.self_attention.{which}_norm.weight"] for state in ranks]
        assert [s.numel() for s in shards] == [width // 2] * 2
        assert torch.equal(torch.cat(shards), full)
        assert (full - 1).abs().max() > 0.05  # perturbed away from HF's all-ones init


@pytest.mark.gpu
def test_transformer_engine_spec_matches_in_bf16(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU with transformer-engine")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "olmo3_te.json"
    done = subprocess.run(
        [sys.executable, "tools/check_olmo3_te.py", "--out", str(out)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_olmo3_7b_recipe_sections_load_and_fit_the_model():
    from megatron_sdzero.config import from_dict, load_yaml
    from megatron_sdzero.models.builder import ModelConfig
    from megatron_sdzero.runtime.distributed import ParallelConfig

    values = load_yaml(Path(__file__).resolve().parents[1] / "examples" / "olmo3_7b_model.yaml")
    assert set(values) == {"model", "parallel"}
    model = from_dict(ModelConfig, values["model"], prefix="model.")
    parallel = from_dict(ParallelConfig, values["parallel"], prefix="parallel.")
    arch = architecture_from_hf(OLMO3_7B)
    assert model.params_dtype == "bfloat16"
    assert arch.num_query_groups % parallel.tp == 0 and arch.num_layers % parallel.pp == 0
    padded_vocab_size(arch.vocab_size, model.make_vocab_size_divisible_by, parallel.tp)
