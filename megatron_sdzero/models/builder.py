"""HF architecture -> Megatron-Core TransformerConfig, layer spec and GPTModel.

Parallelism stays outside: the builder asks Megatron's parallel state which pipeline stage it is
on and nothing else. TransformerEngine modules are used on GPUs when TE is installed; the local
(pure PyTorch) modules everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from megatron_sdzero.models.architecture import DecoderArchitecture
from megatron_sdzero.models.olmo3 import olmo3_transformer_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    hf_path: str = ""  # HF directory: config.json (+ tokenizer); weights come from a Megatron checkpoint
    params_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    make_vocab_size_divisible_by: int = 128  # padding is independent of TP, so checkpoints reshard
    fp8: Literal["e4m3", "hybrid"] | None = None  # TransformerEngine FP8 format; None = no FP8
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    recompute: Literal["none", "selective", "full"] = "none"
    max_sequence_length: int | None = None  # default: the HF config's max_position_embeddings


class TransformerEngineMissing(RuntimeError):
    pass


def te_available() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


def use_transformer_engine(model_cfg: ModelConfig) -> bool:
    if model_cfg.transformer_impl == "local":
        if model_cfg.fp8:
            raise TransformerEngineMissing("FP8 needs transformer_impl=transformer_engine (or auto on a GPU)")
        return False
    wanted = model_cfg.transformer_impl == "transformer_engine" or model_cfg.fp8 is not None
    usable = torch.cuda.is_available() and te_available()
    if wanted and not usable:
        why = "no CUDA device" if not torch.cuda.is_available() else "transformer-engine is not installed"
        raise TransformerEngineMissing(
            f"transformer_impl=transformer_engine / fp8 requested but {why}; "
            "install the gpu extra (pip install 'megatron_sdzero[gpu]') on a GPU node"
        )
    return usable


def resolved_layers(model_cfg: ModelConfig) -> dict[str, str | None]:
    """What the model is built with, after "auto" and the FP8 settings are resolved on this machine:
    the layer implementation (transformer_engine or local), TE's version, FP8 format and recipe."""
    te = use_transformer_engine(model_cfg)
    return {
        "transformer_impl": "transformer_engine" if te else "local",
        "requested_impl": model_cfg.transformer_impl,
        "transformer_engine_version": _te_version() if te else None,
        "fp8": model_cfg.fp8,
        "fp8_recipe": model_cfg.fp8_recipe if model_cfg.fp8 else None,
        "params_dtype": model_cfg.params_dtype,
    }


def describe_layers(resolved: dict[str, str | None]) -> str:
    impl = resolved["transformer_impl"]
    if resolved["transformer_engine_version"]:
        impl += f" {resolved['transformer_engine_version']}"
    precision = f"FP8 {resolved['fp8']}/{resolved['fp8_recipe']}" if resolved["fp8"] else "no FP8"
    requested = resolved["requested_impl"]
    return f"{impl} layers (transformer_impl={requested}), {resolved['params_dtype']}, {precision}"


def _te_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-engine")
    except PackageNotFoundError:
        return None


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    padded = math.ceil(vocab_size / divisible_by) * divisible_by
    if padded % tp:
        raise ValueError(
            f"padded vocabulary {padded} is not divisible by tp={tp}; "
            f"set model.make_vocab_size_divisible_by to a multiple of {tp}"
        )
    return padded


def transformer_config(
    arch: DecoderArchitecture, model_cfg: ModelConfig, *, tp: int = 1, pp: int = 1, **extra
):
    from megatron.core.transformer import TransformerConfig

    te = use_transformer_engine(model_cfg)
    dtype = DTYPES[model_cfg.params_dtype]
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        qk_layernorm=arch.qk_norm == "per_head",  # OLMo-3's full-width QK norms are its own modules
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,  # HF checkpoints are trained and served without dropout
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Fusions need TE, apex or CUDA kernels; the unfused paths compute the same function.
        bias_activation_fusion=te,
        bias_dropout_fusion=te,
        apply_rope_fusion=te,
        masked_softmax_fusion=te,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    if arch.family == "olmo3":
        kwargs.update(olmo3_transformer_config(arch))
    if model_cfg.fp8:
        kwargs.update(fp8=model_cfg.fp8, fp8_recipe=model_cfg.fp8_recipe)
    if model_cfg.recompute != "none":
        kwargs.update(recompute_granularity=model_cfg.recompute)
        if model_cfg.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def layer_spec(arch: DecoderArchitecture, use_te: bool):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if arch.family == "olmo3":
        from megatron_sdzero.models.olmo3_layers import olmo3_layer_spec

        return olmo3_layer_spec(arch, use_te)
    if arch.family not in ("qwen3", "llama"):
        raise ValueError(f"no Megatron layer spec for family {arch.family!r}")
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm is not None)
    return get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=arch.qk_norm is not None)


def build_gpt_model(
    arch: DecoderArchitecture,
    model_cfg: ModelConfig,
    *,
    config=None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
):
    """One pipeline stage (or virtual stage) of the model, on the current device."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = config or transformer_config(arch, model_cfg, tp=tp, pp=pp)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_transformer_engine(model_cfg)),
        vocab_size=padded_vocab_size(arch.vocab_size, model_cfg.make_vocab_size_divisible_by, tp),
        max_sequence_length=model_cfg.max_sequence_length or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )
    # Local-spec norms stay fp32 under params_dtype=bf16; cast everything, as Megatron's Float16Module.
    model.to(DTYPES[model_cfg.params_dtype])
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
