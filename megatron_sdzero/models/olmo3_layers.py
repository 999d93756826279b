"""Megatron-Core modules for the OLMo-3 decoder layer, and its layer spec (local or TransformerEngine).

- ``FullWidthRMSNorm``: OLMo-3's q_norm / k_norm normalise over all heads of the projection, but
  tensor parallelism splits the heads across ranks. The mean of squares is taken over the global
  width (a sum all-reduced over the tensor-parallel group); the weight is split like the heads and
  saved as a tensor-parallel shard, so checkpoints reshard. The only parallel code of the family.
- ``Olmo3SelfAttention``: Megatron's SelfAttention with those norms applied to q and k, and the
  RoPE of its own layer type when that differs from the model's (YaRN on full-attention layers).
- ``Olmo3TransformerLayer``: no norm before attention or MLP; an RMSNorm on each of their outputs
  before the residual add.
Sliding-window attention is Megatron's own ``window_size`` / ``window_attn_skip_freq`` (see
``olmo3.olmo3_transformer_config``). TransformerEngine's attention takes the window;
``WindowedDotProductAttention`` (local spec) joins it to any given mask, such as packing's
block-causal one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import LayerNormBuilder
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    get_sliding_window_causal_mask,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import get_pg_size

from megatron_sdzero.models.architecture import DecoderArchitecture, LayerRope
from megatron_sdzero.models.olmo3 import layer_ropes

# --- full-width RMSNorm over tensor-parallel heads -------------------------------------------------


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) in forward and in backward.

    Every rank normalises its own heads by the same global sum, so the gradient of each rank's
    partial sum is the sum of all ranks' gradients of the global one.
    """

    @staticmethod
    def forward(ctx, partial_sum: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        total = partial_sum.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthRMSNorm(torch.nn.Module):
    """RMSNorm over ``num_heads * head_dim`` features whose heads are split over the TP group.

    Input ``[..., local_heads, head_dim]``; the weight holds this rank's ``local_heads * head_dim``
    entries (contiguous heads, as Megatron's QKV split gives them).
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float, tp_group: dist.ProcessGroup | None):
        super().__init__()
        tp = get_pg_size(tp_group)
        if num_heads % tp:
            raise ValueError(f"full-width QK norm: {num_heads} heads do not split over tp={tp}")
        self.tp_group = tp_group
        self.tp = tp
        self.local_heads = num_heads // tp
        self.full_width = num_heads * head_dim
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.local_heads * head_dim))
        # A TP-sharded parameter: counted once per rank in grad norms, never all-reduced over TP.
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        sum_of_squares = x.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp > 1:
            sum_of_squares = _SumOverGroup.apply(sum_of_squares, self.tp_group)
        x = x * torch.rsqrt(sum_of_squares / self.full_width + self.eps)
        return (self.weight.view(self.local_heads, -1) * x).to(dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=ensure_metadata_has_dp_cp_group(metadata)["dp_cp_group"],
        )

    def extra_repr(self) -> str:
        return f"local={self.weight.numel()}, full={self.full_width}, eps={self.eps}"


# --- local attention with a window and a mask -------------------------------------------------------


class WindowedDotProductAttention(DotProductAttention):
    """Megatron's local attention, keeping a given mask in sliding-window layers.

    Megatron's local softmax replaces any attention mask by the window mask when the layer has a
    window, so packed sequences (block-causal mask) would see each other there. The window is
    taken out of the softmax and joined to the mask here instead.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.window_size = self.scale_mask_softmax.window_size
        self.scale_mask_softmax.window_size = None

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, *args, **kwargs
    ):
        if self.window_size is not None:
            window = get_sliding_window_causal_mask(query.shape[0], key.shape[0], self.window_size)
            window = window.to(query.device)
            attention_mask = window if attention_mask is None else attention_mask | window
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


# --- attention ----------------------------------------------------------------------------------------


class Olmo3SelfAttention(SelfAttention):
    """SelfAttention + full-width q/k norms + this layer type's RoPE (``layer_ropes[layer - 1]``)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        *,
        layer_ropes: tuple[LayerRope | None, ...] = (),
        **kwargs,
    ):
        if config.qk_layernorm:
            # finalize_model_grads sums q_layernorm/k_layernorm grads over TP when this is set; the
            # full-width norms are TP-sharded and must not be summed.
            raise ValueError("OLMo-3 attention needs qk_layernorm=False (it has its own full-width norms)")
        super().__init__(config, submodules, layer_number, **kwargs)
        d, tp_group = self.hidden_size_per_attention_head, self.pg_collection.tp
        self.q_norm = FullWidthRMSNorm(config.num_attention_heads, d, config.layernorm_epsilon, tp_group)
        self.k_norm = FullWidthRMSNorm(config.num_query_groups, d, config.layernorm_epsilon, tp_group)
        rope = layer_ropes[self.layer_number - 1] if layer_ropes else None
        self.layer_rotary_emb = _rotary_embedding(rope, config) if rope is not None else None
        if rope is not None and rope.yarn is not None:
            # Megatron's attention multiplies cos and sin by this factor (YaRN's "mscale").
            self._yarn_concentration_factor = rope.yarn.attention_factor

    def get_query_key_value_tensors(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        output_gate: bool = False,
        split_qkv: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if output_gate or not split_qkv:
            raise NotImplementedError("OLMo-3 attention supports neither an output gate nor fused QKV RoPE")
        query, key, value = super().get_query_key_value_tensors(hidden_states, key_value_states)
        return self.q_norm(query), self.k_norm(key), value

    def forward(
        self, hidden_states: torch.Tensor, *args, rotary_pos_emb: torch.Tensor | None = None, **kwargs
    ):
        if self.layer_rotary_emb is not None and rotary_pos_emb is not None:
            rotary_pos_emb = self._layer_rotary_pos_emb(rotary_pos_emb, kwargs)
        return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)

    def _layer_rotary_pos_emb(self, model_emb: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if not isinstance(model_emb, torch.Tensor) or kwargs.get("rotary_pos_cos") is not None:
            raise NotImplementedError("per-layer RoPE needs the plain rotary_pos_emb path (no flash decode)")
        emb = self.layer_rotary_emb(model_emb.shape[0])  # same positions as the model's embedding
        return emb[0] if isinstance(emb, tuple) else emb


def _rotary_embedding(rope: LayerRope, config: TransformerConfig) -> RotaryEmbedding:
    if config.context_parallel_size > 1:
        raise NotImplementedError("OLMo-3 per-layer RoPE with context parallelism is not supported")
    common = dict(
        kv_channels=config.kv_channels,
        rotary_percent=1.0,
        rotary_base=rope.theta,
        use_cpu_initialization=config.use_cpu_initialization,
    )
    if rope.yarn is None:
        return RotaryEmbedding(**common)
    return YarnRotaryEmbedding(
        **common,
        scaling_factor=rope.yarn.factor,
        original_max_position_embeddings=rope.yarn.original_max_position_embeddings,
        beta_fast=rope.yarn.beta_fast,
        beta_slow=rope.yarn.beta_slow,
        correction_range_round_to_int=True,  # transformers' truncate=True
    )


# --- the layer: post-norms ------------------------------------------------------------------------------


@dataclass
class Olmo3TransformerLayerSubmodules(TransformerLayerSubmodules):
    post_attention_layernorm: LayerNormBuilder = IdentityOp
    post_mlp_layernorm: LayerNormBuilder = IdentityOp


class _NormThenBiasDropoutAdd:
    """A bias-dropout-add builder that first normalises the sublayer output: residual + norm(out)."""

    def __init__(self, norm: torch.nn.Module, bda: Callable[[bool, bool], Callable]):
        self.norm = norm
        self.bda = bda

    def __call__(self, training: bool, fused: bool) -> Callable:
        add = self.bda(training, fused)

        def norm_then_add(output_with_bias, residual, prob):
            output, bias = output_with_bias
            if bias is not None:
                output = output + bias
            return add((self.norm(output), None), residual, prob)

        return norm_then_add


class Olmo3TransformerLayer(TransformerLayer):
    """TransformerLayer with OLMo-3's post-norms: h + norm(attn(h)), then h + norm(mlp(h))."""

    def __init__(
        self, config: TransformerConfig, submodules: Olmo3TransformerLayerSubmodules, *args, **kwargs
    ):
        if submodules.input_layernorm is not IdentityOp or submodules.pre_mlp_layernorm is not IdentityOp:
            raise ValueError("OLMo-3 layers have no pre-norms")
        if config.inference_fuse_tp_communication:
            raise NotImplementedError("fused TP inference skips the bias-dropout-add the post-norms live in")
        super().__init__(config, submodules, *args, **kwargs)
        self.post_attention_layernorm = self._norm(submodules.post_attention_layernorm)
        self.post_mlp_layernorm = self._norm(submodules.post_mlp_layernorm)
        # TransformerLayer applies bias-dropout-add right after attention and after the MLP; the
        # post-norms go in front of those adds.
        self.self_attn_bda = _NormThenBiasDropoutAdd(self.post_attention_layernorm, self.self_attn_bda)
        self.mlp_bda = _NormThenBiasDropoutAdd(self.post_mlp_layernorm, self.mlp_bda)

    def _norm(self, builder: LayerNormBuilder) -> torch.nn.Module:
        return builder(
            config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon
        )


# --- spec ------------------------------------------------------------------------------------------------


def olmo3_layer_spec(arch: DecoderArchitecture, use_te: bool) -> ModuleSpec:
    """The OLMo-3 layer with TransformerEngine linears, attention and norms, or Megatron's local ones."""
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
    else:
        backend = LocalSpecProvider()
    norm = backend.layer_norm(rms_norm=True)
    attention = ModuleSpec(
        module=Olmo3SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal, "layer_ropes": layer_ropes(arch)},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=backend.core_attention() if use_te else WindowedDotProductAttention,
            linear_proj=backend.row_parallel_linear(),
        ),
    )
    mlp = partial(
        MLP.as_mlp_submodule,
        submodules=MLPSubmodules(
            linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()
        ),
    )
    return ModuleSpec(
        module=Olmo3TransformerLayer,
        submodules=Olmo3TransformerLayerSubmodules(
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            post_attention_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            post_mlp_layernorm=norm,
        ),
    )
