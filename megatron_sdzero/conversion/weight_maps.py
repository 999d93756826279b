"""Explicit HF <-> Megatron-Core weight-name maps, one per family, and the tensor transforms.

Megatron names are those of the local layer spec (``model.state_dict()``); its sharded state dict
maps them to the TransformerEngine names in the checkpoint, so a checkpoint written from the local
spec loads into the TE spec and back. ``{layer}`` is the global layer index.

Transforms, each with its tensor-parallel split (``to_mcore``) and its inverse on the full,
unsplit Megatron tensor (``to_hf``):
- copy:     replicated (norms)
- column:   split along dim 0 (output features)
- row:      split along dim 1 (input features)
- vocab:    rows padded to the padded vocabulary with zeros, then split along dim 0
- qkv:      q, k, v interleaved per query group: [q_g (heads/groups rows), k_g, v_g] for each g
- gated:    gate and up each split by rank; rank r holds [gate_r; up_r]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_sdzero.models.architecture import DecoderArchitecture

Kind = Literal["copy", "column", "row", "vocab", "qkv", "gated"]


@dataclass(frozen=True)
class WeightRule:
    mcore: str
    hf: tuple[str, ...]
    kind: Kind


def llama_rules(arch: DecoderArchitecture) -> list[WeightRule]:
    """Llama, SmolLM2 and Qwen3 (Qwen3 adds per-head q/k norms)."""
    layer = "decoder.layers.{layer}."
    hf = "model.layers.{layer}."
    rules = [
        WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
        WeightRule(layer + "input_layernorm.weight", (hf + "input_layernorm.weight",), "copy"),
        WeightRule(
            layer + "self_attention.linear_qkv.weight",
            tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"),
            "qkv",
        ),
        WeightRule(layer + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), "row"),
        WeightRule(layer + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), "copy"),
        WeightRule(
            layer + "mlp.linear_fc1.weight",
            (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
            "gated",
        ),
        WeightRule(layer + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), "row"),
    ]
    if arch.qkv_bias:
        rules.append(
            WeightRule(
                layer + "self_attention.linear_qkv.bias",
                tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv"),
                "qkv",
            )
        )
    if arch.qk_norm == "per_head":
        rules += [
            WeightRule(
                layer + "self_attention.q_layernorm.weight", (hf + "self_attn.q_norm.weight",), "copy"
            ),
            WeightRule(
                layer + "self_attention.k_layernorm.weight", (hf + "self_attn.k_norm.weight",), "copy"
            ),
        ]
    if not arch.tie_word_embeddings:
        rules.append(WeightRule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return rules


def olmo3_rules(arch: DecoderArchitecture) -> list[WeightRule]:
    """OLMo-3: post-norms instead of pre-norms; q/k norms over the full projection width, split over
    tensor-parallel ranks with the heads (hence "column")."""
    layer = "decoder.layers.{layer}."
    hf = "model.layers.{layer}."
    rules = [
        WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
        WeightRule(
            layer + "self_attention.linear_qkv.weight",
            tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"),
            "qkv",
        ),
        WeightRule(layer + "self_attention.q_norm.weight", (hf + "self_attn.q_norm.weight",), "column"),
        WeightRule(layer + "self_attention.k_norm.weight", (hf + "self_attn.k_norm.weight",), "column"),
        WeightRule(layer + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), "row"),
        WeightRule(
            layer + "post_attention_layernorm.weight", (hf + "post_attention_layernorm.weight",), "copy"
        ),
        WeightRule(
            layer + "mlp.linear_fc1.weight",
            (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
            "gated",
        ),
        WeightRule(layer + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), "row"),
        WeightRule(layer + "post_mlp_layernorm.weight", (hf + "post_feedforward_layernorm.weight",), "copy"),
    ]
    if not arch.tie_word_embeddings:
        rules.append(WeightRule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return rules


FAMILY_RULES: dict[str, Callable[[DecoderArchitecture], list[WeightRule]]] = {
    "qwen3": llama_rules,
    "llama": llama_rules,
    "olmo3": olmo3_rules,
}


def rules_for(arch: DecoderArchitecture) -> list[WeightRule]:
    if arch.family not in FAMILY_RULES:
        raise ValueError(f"no weight map for family {arch.family!r}; known: {sorted(FAMILY_RULES)}")
    return FAMILY_RULES[arch.family](arch)


def expand_layers(rules: list[WeightRule], num_layers: int) -> list[WeightRule]:
    """Every rule with ``{layer}`` written out for each global layer index."""
    out = []
    for rule in rules:
        if "{layer}" not in rule.mcore:
            out.append(rule)
            continue
        for i in range(num_layers):
            out.append(
                WeightRule(rule.mcore.format(layer=i), tuple(n.format(layer=i) for n in rule.hf), rule.kind)
            )
    return out


# --- HF -> Megatron (one tensor-parallel shard) -----------------------------------------------


def _qkv_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: DecoderArchitecture) -> torch.Tensor:
    groups, d = arch.num_query_groups, arch.head_dim
    heads_per_group = arch.num_attention_heads // groups
    tail = q.shape[1:]
    q = q.reshape(groups, heads_per_group * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def to_mcore(
    kind: Kind, hf: list[torch.Tensor], arch: DecoderArchitecture, padded_vocab: int, tp_rank: int, tp: int
) -> torch.Tensor:
    if kind == "copy":
        return hf[0]
    if kind == "column":
        return hf[0].chunk(tp, dim=0)[tp_rank]
    if kind == "row":
        return hf[0].chunk(tp, dim=1)[tp_rank]
    if kind == "vocab":
        full = hf[0]
        padding = full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])
        return torch.cat([full, padding]).chunk(tp, dim=0)[tp_rank]
    if kind == "qkv":
        if arch.num_query_groups % tp:
            raise ValueError(f"num_query_groups={arch.num_query_groups} is not divisible by tp={tp}")
        return _qkv_full(*hf, arch).chunk(tp, dim=0)[tp_rank]
    if kind == "gated":
        gate, up = (t.chunk(tp, dim=0)[tp_rank] for t in hf)
        return torch.cat([gate, up])
    raise ValueError(f"unknown transform {kind!r}")


# --- Megatron (full, tp=1) -> HF ---------------------------------------------------------------


def to_hf(kind: Kind, full: torch.Tensor, arch: DecoderArchitecture) -> list[torch.Tensor]:
    if kind in ("copy", "column", "row"):
        return [full]
    if kind == "vocab":
        return [full[: arch.vocab_size]]
    if kind == "qkv":
        groups, d = arch.num_query_groups, arch.head_dim
        q_rows = arch.num_attention_heads // groups * d
        per_group = full.reshape(groups, q_rows + 2 * d, *full.shape[1:])
        q, k, v = per_group.split([q_rows, d, d], dim=1)
        return [t.reshape(-1, *full.shape[1:]) for t in (q, k, v)]
    if kind == "gated":
        return list(full.chunk(2, dim=0))
    raise ValueError(f"unknown transform {kind!r}")


def expected_hf_shapes(arch: DecoderArchitecture) -> dict[str, tuple[int, ...]]:
    """The shape every HF tensor must have, for a clear error before any work is done."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (d,) if arch.qk_norm == "per_head" else (q,),
        "self_attn.k_norm.weight": (d,) if arch.qk_norm == "per_head" else (kv,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
        "post_feedforward_layernorm.weight": (h,),
    }
    shapes = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "lm_head.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    for i in range(arch.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes
