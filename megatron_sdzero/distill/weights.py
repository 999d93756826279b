"""The live Megatron model as Hugging Face tensors: (hf_name, full tensor) pairs, one at a time.

Every rank of a model-parallel group iterates :func:`iter_hf_weights` together (it runs
collectives). Each parameter is gathered over tensor parallelism (all-gather, then the inverse of
the conversion's split: ``merge_tp``), converted with the conversion's rules (``to_hf``), and sent
from its pipeline stage to the others (broadcast over the pipeline group, TP rank 0 only), so the
engine rank (TP 0 of stage 0) receives the whole model in the HF layout. Only one parameter is
materialised in full at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_sdzero.conversion.megatron_io import global_param_name, rules_by_mcore_name
from megatron_sdzero.conversion.weight_maps import Kind, to_hf
from megatron_sdzero.models.architecture import DecoderArchitecture

# TransformerEngine's layer spec fuses the pre-attention and pre-MLP norms into the next linear.
TE_TO_LOCAL = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
}


def local_name(name: str) -> str:
    for te, local in TE_TO_LOCAL.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def merge_tp(kind: Kind, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full (TP=1) Megatron tensor from its TP shards: the inverse of ``weight_maps.to_mcore``."""
    if kind == "copy" or len(shards) == 1:
        return shards[0]
    if kind in ("column", "vocab", "qkv"):
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind == "gated":  # rank r holds [gate_r; up_r]
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown transform {kind!r}")


def unwrap(chunks: list[Any]) -> list[Any]:
    return [getattr(chunk, "module", chunk) for chunk in chunks]


def _stage_weights(chunks: list[Any], arch: DecoderArchitecture) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's parameters as HF tensors (collective over the tensor-parallel group)."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group) if dist.is_initialized() else 1
    rules = rules_by_mcore_name(arch, parallel_state.get_pipeline_model_parallel_world_size())
    for chunk in unwrap(chunks):
        for name, tensor in chunk.state_dict(keep_vars=True).items():
            if name.endswith("_extra_state"):
                continue
            global_name = local_name(global_param_name(name, chunk))
            if arch.tie_word_embeddings and global_name == "output_layer.weight":
                continue  # the last stage's copy of the tied embedding
            if global_name not in rules:
                raise KeyError(f"Megatron parameter {global_name} has no HF mapping for {arch.family}")
            rule = rules[global_name]
            shard = tensor.detach()
            if tp > 1 and rule.kind != "copy":
                shards = [torch.empty_like(shard) for _ in range(tp)]
                dist.all_gather(shards, shard.contiguous(), group=tp_group)
            else:
                shards = [shard]
            full = merge_tp(rule.kind, shards)
            yield from zip(rule.hf, to_hf(rule.kind, full, arch), strict=True)


def iter_hf_weights(chunks: list[Any], arch: DecoderArchitecture) -> Iterator[tuple[str, torch.Tensor]]:
    """All HF tensors of the model, on the engine rank; other ranks get their own stage's or nothing.

    Collective: every rank of the model-parallel group must exhaust the iterator.
    """
    from megatron.core import parallel_state

    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp = dist.get_world_size(pp_group) if dist.is_initialized() else 1
    if pp == 1:
        yield from _stage_weights(chunks, arch)
        return
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        drain(_stage_weights(chunks, arch))  # the TP all-gathers with TP rank 0; it sends on
        return
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    for stage in range(pp):
        src = dist.get_global_rank(pp_group, stage)
        if stage == my_stage:
            for name, tensor in _stage_weights(chunks, arch):
                _send(name, tensor, src, pp_group, device)
                yield name, tensor
            _send(None, None, src, pp_group, device)
        else:
            yield from _receive(src, pp_group, device)


def _send(name: str | None, tensor: torch.Tensor | None, src: int, group, device) -> None:
    header = [None if tensor is None else (name, tuple(tensor.shape), tensor.dtype)]
    dist.broadcast_object_list(header, src=src, group=group, device=device)
    if tensor is not None:
        dist.broadcast(tensor.contiguous(), src=src, group=group)


def _receive(src: int, group, device) -> Iterator[tuple[str, torch.Tensor]]:
    while True:
        header: list[Any] = [None]
        dist.broadcast_object_list(header, src=src, group=group, device=device)
        if header[0] is None:
            return
        name, shape, dtype = header[0]
        tensor = torch.empty(shape, dtype=dtype, device=device or "cpu")
        dist.broadcast(tensor, src=src, group=group)
        yield name, tensor


def drain(pairs: Iterator[Any]) -> int:
    count = 0
    for _ in pairs:
        count += 1
    return count
