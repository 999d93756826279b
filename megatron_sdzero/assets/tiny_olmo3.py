"""Tiny random OLMo-3 checkpoints (transformers' Olmo3ForCausalLM) with the tiny ChatML tokenizer.

Kept apart from ``assets.tiny`` (Qwen3/Llama). The defaults mirror OLMo-3-7B's structure at toy
size: three sliding-window layers then one full-attention layer, and YaRN RoPE on the
full-attention layers only; the window and YaRN's original context are small so that 40-token
sequences already exercise both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, Olmo3Config, Olmo3ForCausalLM

from megatron_sdzero.assets.tiny import build_tiny_tokenizer

YARN_FACTOR = 4.0


def tiny_olmo3_rope(yarn: bool = True, original_context: int = 16) -> dict[str, dict[str, Any]]:
    """Per-layer-type RoPE: sliding layers plain, full layers YaRN (factor 4 over ``original_context``)."""
    sliding = {"rope_type": "default", "rope_theta": 10_000.0}
    if not yarn:
        return {"sliding_attention": sliding, "full_attention": dict(sliding)}
    full = {
        "rope_type": "yarn",
        "rope_theta": 1_000.0,
        "factor": YARN_FACTOR,
        "original_max_position_embeddings": original_context,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    return {"sliding_attention": sliding, "full_attention": full}


def make_tiny_olmo3(
    out_dir: str | Path,
    *,
    num_layers: int = 4,
    layer_types: list[str] | None = None,
    sliding_window: int = 8,
    yarn: bool = True,
    yarn_original_context: int = 16,
    tie_word_embeddings: bool = False,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    initializer_range: float = 0.15,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a tiny Olmo3ForCausalLM checkpoint (config, safetensors, tokenizer) to ``out_dir``."""
    tokenizer = build_tiny_tokenizer()
    config = Olmo3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        # = YaRN factor x original context, as in OLMo-3-7B (8 x 8192 = 65536)
        max_position_embeddings=int(YARN_FACTOR * yarn_original_context),
        rms_norm_eps=1e-6,
        sliding_window=sliding_window,
        layer_types=layer_types,
        rope_parameters=tiny_olmo3_rope(yarn, yarn_original_context),
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Olmo3ForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"generator": "megatron_sdzero.assets.tiny_olmo3.make_tiny_olmo3", "seed": seed, "dtype": dtype}
    (out / "sdzero_tiny.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
