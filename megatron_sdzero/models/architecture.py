"""A decoder architecture read from a Hugging Face ``config.json``, family by family.

The family comes from the config's ``model_type`` (never from a path), and each family lists the
keys it needs: a missing key or an unsupported feature is an error naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sdzero.errors import UserError


class UnsupportedModelError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling, with every value resolved the way transformers resolves it."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    attention_factor: float  # multiplies cos and sin, so attention logits scale by its square


@dataclass(frozen=True)
class LayerRope:
    theta: float
    yarn: YarnScaling | None = None


@dataclass(frozen=True)
class DecoderArchitecture:
    family: str  # "qwen3" | "llama" | "olmo3"
    hf_architecture: str  # e.g. "Qwen3ForCausalLM"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    norm_epsilon: float
    tie_word_embeddings: bool
    rope_theta: float
    max_position_embeddings: int
    qk_norm: str | None = None  # None | "per_head" (Qwen3) | "full" (OLMo-3: over all heads)
    qkv_bias: bool = False
    rope_scaling_factor: float | None = None  # Llama-3 style scaling, as Megatron implements it
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = field(default_factory=tuple)  # per layer: full or sliding attention
    full_attention_rope: LayerRope | None = None  # OLMo-3: RoPE of full-attention layers if not rope_theta
    torch_dtype: str = "float32"

    @property
    def num_params(self) -> int:
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = 2 * self.num_query_groups * self.head_dim
        per_layer = h * (q + kv) + q * h + 3 * h * f + 2 * h
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h


def read_hf_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UnsupportedModelError(f"{config_file} is not valid JSON: {err}") from err


def _require(config: dict[str, Any], *keys: str) -> list[Any]:
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise UnsupportedModelError(f"HF config ({config.get('model_type')}) lacks required key(s) {missing}")
    return [config[k] for k in keys]


def _rope(config: dict[str, Any]) -> tuple[float, float | None]:
    """(theta, Llama-3 scaling factor or None) from either the transformers 4 or 5 layout."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise UnsupportedModelError("HF config lacks rope_theta (or rope_parameters.rope_theta)")
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        settings = {**scaling, **params}
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in expected.items():
            if float(settings.get(key, value)) != value:
                raise UnsupportedModelError(
                    f"llama3 RoPE scaling with {key}={settings[key]} (Megatron fixes {value})"
                )
        return float(theta), float(settings["factor"])
    raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported")


def _common(
    config: dict[str, Any], family: str, rope: tuple[float, float | None] | None = None
) -> dict[str, Any]:
    layers, hidden, ffn, heads, vocab = _require(
        config, "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"
    )
    theta, scaling = rope if rope is not None else _rope(config)
    architectures = config.get("architectures") or [""]
    return dict(
        family=family,
        hf_architecture=architectures[0],
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
        vocab_size=vocab,
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling_factor=scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
    )


def _check_activation(config: dict[str, Any]) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")


def _qwen3(config: dict[str, Any]) -> DecoderArchitecture:
    _check_activation(config)
    if config.get("use_sliding_window"):
        raise UnsupportedModelError("Qwen3 with use_sliding_window=true is not supported")
    return DecoderArchitecture(
        **_common(config, "qwen3"), qk_norm="per_head", qkv_bias=bool(config.get("attention_bias", False))
    )


def _llama(config: dict[str, Any]) -> DecoderArchitecture:
    _check_activation(config)
    if config.get("mlp_bias"):
        raise UnsupportedModelError("Llama with mlp_bias=true is not supported")
    return DecoderArchitecture(**_common(config, "llama"), qkv_bias=bool(config.get("attention_bias", False)))


def _olmo3(config: dict[str, Any]) -> DecoderArchitecture:
    from megatron_sdzero.models.olmo3 import read_olmo3_config

    return read_olmo3_config(config)


FAMILY_READERS = {"qwen3": _qwen3, "llama": _llama, "olmo3": _olmo3}


def register_family(model_type: str, reader) -> None:
    FAMILY_READERS[model_type] = reader


def architecture_from_hf(config: dict[str, Any] | str | Path) -> DecoderArchitecture:
    if not isinstance(config, dict):
        config = read_hf_config(config)
    model_type = config.get("model_type")
    if model_type not in FAMILY_READERS:
        raise UnsupportedModelError(
            f"unknown architecture model_type={model_type!r}; supported: {sorted(FAMILY_READERS)}"
        )
    return FAMILY_READERS[model_type](config)
