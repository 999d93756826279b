"""train.overlap_param_gather with the distributed optimizer: parameters read right after the optimizer
step are stale (CPU, gloo, DP=2), so Phase 2, which reads them there (weight refresh every step,
teacher sync, checkpoints), refuses the setting.

Megatron-Core 0.19.2 (DistributedOptimizer.step_with_ready_grads): without overlap the step ends with
a synchronous all-gather of the updated shards; with it, the all-gather is deferred to the next
forward pass (DDP's forward pre-hooks) and each rank holds only its own updated shard until then.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_sdzero.config import ConfigError, load_config
from megatron_sdzero.distill.config import DistillConfig
from megatron_sdzero.runtime.launch import run_on_ranks

EXAMPLE = Path(__file__).parents[1] / "examples" / "distill_tiny_cpu.yaml"


def _params(chunk):
    import torch

    return torch.cat([p.detach().reshape(-1).double() for p in chunk.module.parameters()])


def _read_after_step(hf_dir: str, overlap: bool) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_sdzero.models.architecture import architecture_from_hf
    from megatron_sdzero.models.builder import ModelConfig
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel
    from megatron_sdzero.training.config import TrainConfig
    from megatron_sdzero.training.setup import setup_trainable

    torch.set_num_threads(1)
    init_model_parallel(ParallelConfig(), seed=5)
    arch = architecture_from_hf(hf_dir)
    train = TrainConfig(
        lr=1e-2, min_lr=1e-2, lr_schedule="constant", train_iters=1, global_batch_size=2, clip_grad=0.0,
        use_distributed_optimizer=True, overlap_param_gather=overlap,
    )  # fmt: skip
    trainable = setup_trainable(arch, ModelConfig(params_dtype="float32", transformer_impl="local"), train, 1)
    (chunk,) = trainable.model
    before = _params(chunk)
    generator = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, arch.vocab_size, (1, 32), generator=generator)
    positions = torch.arange(32).unsqueeze(0)
    chunk(tokens, positions, None, labels=tokens.roll(-1, dims=1)).float().sum().backward()
    chunk.finish_grad_sync()
    trainable.optimizer.step()
    after_step = _params(chunk)  # what a refresh, a teacher sync or an export would read here
    chunk.start_param_sync(force_sync=True)  # the all-gather the next forward would do
    gathered = _params(chunk)
    everyone = [torch.zeros_like(gathered) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, gathered)
    return {
        "moved": float((gathered != before).double().mean()),
        "stale": float((after_step != gathered).double().mean()),
        "ranks_agree": all(torch.equal(everyone[0], other) for other in everyone),
        "gathered_sum": float(gathered.sum()),
    }


def test_parameters_read_right_after_the_step_are_stale_only_with_overlap(tiny_hf_models) -> None:
    hf = str(tiny_hf_models["qwen3_untied"])
    plain = run_on_ranks(_read_after_step, 2, hf, False, timeout_s=600)
    overlap = run_on_ranks(_read_after_step, 2, hf, True, timeout_s=600)
    for rank in range(2):
        assert plain[rank]["moved"] > 0.9 and plain[rank]["stale"] == 0.0
        # Each rank updated its own half of the flat buffer; the other half still holds the old values.
        assert 0.3 < overlap[rank]["stale"] < 0.7, overlap[rank]
        assert overlap[rank]["ranks_agree"] and plain[rank]["ranks_agree"]
        # Once gathered, the overlapped step is the same step.
        assert overlap[rank]["gathered_sum"] == pytest.approx(plain[rank]["gathered_sum"], rel=1e-12)


def test_distill_refuses_overlap_param_gather_with_the_distributed_optimizer() -> None:
    with pytest.raises(ConfigError, match="train.overlap_param_gather"):
        load_config(DistillConfig, EXAMPLE, ["train.overlap_param_gather=true"])
    # Without the distributed optimizer Megatron ignores the flag (training.setup passes it only with it).
    config = load_config(
        DistillConfig, EXAMPLE, ["train.overlap_param_gather=true", "train.use_distributed_optimizer=false"]
    )
    assert config.train.overlap_param_gather
