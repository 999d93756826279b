"""OLMo-3 (``model_type: olmo3``): HF config -> DecoderArchitecture, and its attention-window settings.

What differs from Llama/Qwen3, as transformers' ``modeling_olmo3.py`` computes it:
- no norm before attention or the MLP; RMSNorm on the attention output and on the MLP output, each
  before its residual add (``post_attention_layernorm``, ``post_feedforward_layernorm``);
- q_norm / k_norm are RMSNorms over the whole q and k projections (all heads at once), applied
  before the heads are split;
- per layer (``layer_types``) sliding-window or full causal attention, each type with its own RoPE
  settings (``rope_parameters[layer_type]``); OLMo-3-7B uses YaRN on the full-attention layers only.

Only config parsing lives here (no Megatron import); the Megatron modules are in ``olmo3_layers``.
"""

from __future__ import annotations

import math
from typing import Any

from megatron_sdzero.models.architecture import (
    DecoderArchitecture,
    LayerRope,
    UnsupportedModelError,
    YarnScaling,
    _check_activation,
    _common,
)

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

# Olmo3Config's defaults for keys a config.json may leave out (transformers 5.17).
HF_DEFAULTS: dict[str, Any] = {
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
DEFAULT_THETA = 500_000.0


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """Olmo3Config's default: every fourth layer is full attention, the others sliding-window."""
    return tuple(FULL if (i + 1) % 4 == 0 else SLIDING for i in range(num_layers))


def read_olmo3_config(config: dict[str, Any]) -> DecoderArchitecture:
    config = {**HF_DEFAULTS, **config}
    _check_activation(config)
    if config.get("attention_bias"):
        raise UnsupportedModelError("OLMo-3 with attention_bias=true is not supported")
    layer_types = _layer_types(config)
    window = config.get("sliding_window")
    if SLIDING in layer_types and (not isinstance(window, int) or window < 1):
        raise UnsupportedModelError(f"OLMo-3 has sliding-window layers but sliding_window={window!r}")
    ropes = rope_by_layer_type(config)
    if ropes[SLIDING].yarn is not None:
        raise UnsupportedModelError("OLMo-3 with YaRN on the sliding-window layers is not supported")
    fields = _common(config, "olmo3", rope=(ropes[SLIDING].theta, None))
    fields["norm_epsilon"] = float(config["rms_norm_eps"])
    return DecoderArchitecture(
        **fields,
        qk_norm="full",
        sliding_window=window if SLIDING in layer_types else None,
        layer_types=layer_types,
        full_attention_rope=None if ropes[FULL] == ropes[SLIDING] else ropes[FULL],
    )


def _layer_types(config: dict[str, Any]) -> tuple[str, ...]:
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int):
        raise UnsupportedModelError("HF config (olmo3) lacks required key(s) ['num_hidden_layers']")
    layer_types = tuple(config.get("layer_types") or default_layer_types(num_layers))
    if len(layer_types) != num_layers:
        raise UnsupportedModelError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedModelError(f"OLMo-3 layer type(s) {unknown} are not supported; known: {LAYER_TYPES}")
    return layer_types


# --- RoPE per layer type ----------------------------------------------------------------------------


def rope_by_layer_type(config: dict[str, Any]) -> dict[str, LayerRope]:
    """The RoPE of each layer type, read from either config layout the way transformers 5.17 reads it.

    transformers 5 writes ``rope_parameters = {layer_type: {rope_type, rope_theta, ...}}``;
    transformers 4 wrote a top-level ``rope_theta`` and a ``rope_scaling`` that applies to the
    full-attention layers only (OLMo-3-7B's YaRN).
    """
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict) or not set(params) <= set(LAYER_TYPES):
        raise UnsupportedModelError(
            f"OLMo-3 rope_parameters must be keyed by layer type {LAYER_TYPES}, got {params!r}"
        )
    top_theta = config.get("rope_theta")
    full = {**(params.get(FULL) or {}), **(config.get("rope_scaling") or {})}
    full.setdefault("rope_theta", DEFAULT_THETA if top_theta is None else top_theta)
    sliding = dict(params.get(SLIDING) or {})
    if "rope_theta" not in sliding:
        if top_theta is not None and float(top_theta) != DEFAULT_THETA:
            # transformers 4 gives the sliding layers the top-level theta, transformers 5.17 its default
            # 500,000: refuse rather than silently build one of two different models.
            raise UnsupportedModelError(
                f"OLMo-3 config: rope_theta={top_theta} but none for the sliding-attention layers, which "
                "transformers 4 and 5 read differently; set rope_parameters.sliding_attention.rope_theta"
            )
        sliding["rope_theta"] = DEFAULT_THETA
    return {SLIDING: _layer_rope(sliding, config), FULL: _layer_rope(full, config)}


def _layer_rope(params: dict[str, Any], config: dict[str, Any]) -> LayerRope:
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("OLMo-3 with partial_rotary_factor != 1 is not supported")
    theta = float(params["rope_theta"])
    if rope_type == "default":
        return LayerRope(theta=theta)
    if rope_type == "yarn":
        return LayerRope(theta=theta, yarn=_yarn(params, config))
    raise UnsupportedModelError(f"OLMo-3 RoPE type {rope_type!r} is not supported (default and yarn are)")


def _yarn(params: dict[str, Any], config: dict[str, Any]) -> YarnScaling:
    """transformers' ``_compute_yarn_parameters``, value by value."""
    if "original_max_position_embeddings" not in params:
        raise UnsupportedModelError("YaRN RoPE without original_max_position_embeddings")
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor")
    factor = float(factor) if factor is not None else config["max_position_embeddings"] / original
    if params.get("truncate") is False:
        # transformers 5.17 looks `truncate` up in the per-layer-type dict's parent and never finds it.
        raise UnsupportedModelError("YaRN with truncate=false is ignored by transformers 5; not supported")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return YarnScaling(
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        attention_factor=float(attention_factor),
    )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# --- what Megatron's TransformerConfig needs ---------------------------------------------------------


def olmo3_transformer_config(arch: DecoderArchitecture) -> dict[str, Any]:
    """TransformerConfig settings OLMo-3 needs on top of the common ones.

    transformers' window W lets a token see itself and the W-1 tokens before it
    (``q - W < kv <= q``); Megatron's and TransformerEngine's ``window_size=(left, right)`` counts
    the tokens on each side, so W becomes (W-1, 0). ``window_attn_skip_freq`` lists, per global
    layer, 1 for a windowed layer and 0 for a full-attention one. YaRN scales cos and sin, which
    TE's fused RoPE for packed (THD) sequences silently skips, so YaRN models use the unfused RoPE.
    """
    settings: dict[str, Any] = {}
    if SLIDING in arch.layer_types:
        settings.update(
            window_size=(arch.sliding_window - 1, 0),
            window_attn_skip_freq=[int(t == SLIDING) for t in arch.layer_types],
        )
    if arch.full_attention_rope is not None and arch.full_attention_rope.yarn is not None:
        settings.update(apply_rope_fusion=False)
    return settings


def layer_ropes(arch: DecoderArchitecture) -> tuple[LayerRope | None, ...]:
    """Per global layer: the RoPE that layer uses instead of the model's (None: the model's)."""
    return tuple(arch.full_attention_rope if t == FULL else None for t in arch.layer_types)
