"""Build what a training step needs: model chunks in Megatron DDP, the optimizer and its LR schedule.

``setup_trainable`` is the student side (DDP + distributed optimizer + scheduler); ``build_frozen``
is a model that only runs forward passes (Phase 2's teacher): no DDP, no gradient buffers, no
optimizer state. Both build one chunk per virtual pipeline stage of this rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_sdzero.models.architecture import DecoderArchitecture
from megatron_sdzero.models.builder import (
    ModelConfig,
    build_gpt_model,
    describe_layers,
    resolved_layers,
    transformer_config,
)
from megatron_sdzero.training.config import TrainConfig

_DECAY_STYLE = {"cosine": "cosine", "constant": "constant", "linear": "linear"}
# What each model of this process was built with ("trained", "frozen"); StepLogger records it with the
# run's config.
RESOLVED_LAYERS: dict[str, dict[str, str | None]] = {}


@dataclass
class Trainable:
    """A model being trained: DDP-wrapped chunks, their optimizer and LR/WD schedule."""

    model: list[Any]  # megatron.core.distributed.DistributedDataParallel, one per virtual stage
    optimizer: Any  # megatron.core.optimizer.MegatronOptimizer
    scheduler: Any  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler
    config: Any  # megatron.core.transformer.TransformerConfig shared by the chunks
    train_iters: int
    layers: dict[str, str | None]  # resolved_layers(): TE or local, FP8 format and recipe

    @property
    def modules(self) -> list[Any]:
        """The GPTModel chunks inside DDP (for state dicts and weight loading)."""
        return unwrap(self.model)


def unwrap(chunks: list[Any]) -> list[Any]:
    return [getattr(chunk, "module", chunk) for chunk in chunks]


def model_transformer_config(arch: DecoderArchitecture, model_cfg: ModelConfig, **overrides: Any):
    """TransformerConfig for this rank's parallel layout (TP/PP/VPP and sequence parallel)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is not None and arch.num_layers % (pp * vpp):
        raise ValueError(f"{arch.num_layers} layers do not split into pp={pp} x vpp={vpp} stages")
    if arch.num_layers < pp:
        raise ValueError(f"pp={pp} is larger than the number of layers ({arch.num_layers})")
    extra: dict[str, Any] = dict(virtual_pipeline_model_parallel_size=vpp)
    if vpp is not None and pp == 2:
        # Interleaved 1F1B with pp=2: the previous and next stage are the same rank, and batched
        # isend/irecv then pairs a forward activation with a backward gradient (measured: wrong
        # losses on gloo). Unbatched p2p orders the sends by rank parity and is exact.
        extra["batch_p2p_comm"] = False
    if overrides.get("variable_seq_lengths"):
        # Megatron rejects variable_seq_lengths with the default "allgather" MoE token dispatcher even
        # for dense models (measured: ValueError at config time); the dispatcher is unused here.
        extra["moe_token_dispatcher_type"] = "alltoall"
    extra.update(overrides)
    return transformer_config(arch, model_cfg, tp=tp, pp=pp, **extra)


def build_model_chunks(arch: DecoderArchitecture, model_cfg: ModelConfig, config) -> list[Any]:
    """This rank's GPTModel chunks: one, or one per virtual pipeline stage (interleaved 1F1B)."""
    from megatron.core import parallel_state

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vpp is None else list(range(vpp))
    return [build_gpt_model(arch, model_cfg, config=config, vp_stage=stage) for stage in stages]


def announce_layers(role: str, model_cfg: ModelConfig) -> dict[str, str | None]:
    """Resolve, print (first rank) and record what a model is built with."""
    import torch.distributed as dist

    resolved = resolved_layers(model_cfg)
    RESOLVED_LAYERS[role] = resolved
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[sdzero] {role} model: {describe_layers(resolved)}", flush=True)
    return resolved


def build_frozen(arch: DecoderArchitecture, model_cfg: ModelConfig, **config_overrides: Any) -> list[Any]:
    """Forward-only model chunks: eval mode, no gradients, no DDP, no optimizer."""
    announce_layers("frozen", model_cfg)
    config = model_transformer_config(arch, model_cfg, **config_overrides)
    chunks = build_model_chunks(arch, model_cfg, config)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


def _ddp_config(train: TrainConfig):
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=train.grad_reduce_in_fp32,
        overlap_grad_reduce=train.overlap_grad_reduce,
        overlap_param_gather=train.overlap_param_gather and train.use_distributed_optimizer,
        use_distributed_optimizer=train.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the step checks the grad norm and applies the NaN policy
    )


def _optimizer_config(train: TrainConfig, config):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=train.use_distributed_optimizer,
        overlap_param_gather=train.overlap_param_gather and train.use_distributed_optimizer,
    )


def _scheduler(optimizer, train: TrainConfig, train_iters: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=train.warmup_init_lr,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_iters(train_iters),
        lr_decay_steps=max(train_iters, 1),
        lr_decay_style=_DECAY_STYLE[train.lr_schedule],
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=max(train_iters, 1),
        wd_incr_style="constant",
        # The run's config wins over a checkpoint's schedule (only the step count is resumed).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def _install_schedule_hooks(config, chunks: list[Any], optimizer, train: TrainConfig) -> None:
    """The callbacks Megatron's pipeline schedules call into (as Megatron-LM's training.py sets)."""
    from megatron.core.distributed import finalize_model_grads

    no_sync = [chunk.no_sync for chunk in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if train.overlap_grad_reduce:
        grad_sync = [chunk.start_grad_sync for chunk in chunks]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss


def setup_trainable(
    arch: DecoderArchitecture,
    model_cfg: ModelConfig,
    train: TrainConfig,
    train_iters: int,
    **config_overrides: Any,
) -> Trainable:
    """DDP-wrapped chunks + Megatron optimizer (distributed by default) + LR/WD scheduler.

    The loss is per token (``calculate_per_token_loss``): loss functions return the *sum* over
    their valid tokens and the token count, and Megatron divides the gradients by the global
    count in ``finalize_model_grads`` (see ``step.py``).
    """
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import get_megatron_optimizer

    layers = announce_layers("trained", model_cfg)
    config = model_transformer_config(arch, model_cfg, calculate_per_token_loss=True, **config_overrides)
    chunks = build_model_chunks(arch, model_cfg, config)
    ddp_config = _ddp_config(train)
    model = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    for chunk in model:
        chunk.broadcast_params()  # identical replicas before the first step
    optimizer = get_megatron_optimizer(_optimizer_config(train, config), model)
    _install_schedule_hooks(config, model, optimizer, train)
    scheduler = _scheduler(optimizer, train, train_iters)
    return Trainable(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        config=config,
        train_iters=train_iters,
        layers=layers,
    )


def model_parameters_finite(chunks: list[Any]) -> bool:
    """True when every parameter on every rank is finite (checked before any checkpoint is written)."""
    import torch.distributed as dist

    bad = torch.zeros((), dtype=torch.float32, device=_device(chunks))
    for chunk in unwrap(chunks):
        for param in chunk.parameters():
            if not torch.isfinite(param).all():
                bad.fill_(1.0)
                break
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def _device(chunks: list[Any]) -> torch.device:
    return next(unwrap(chunks)[0].parameters()).device
