"""The layer implementation and FP8 recipe a run resolved: printed at setup and recorded with the run's
config (CPU: the local implementation, no FP8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sdzero.models.builder import (
    ModelConfig,
    TransformerEngineMissing,
    describe_layers,
    resolved_layers,
)
from megatron_sdzero.runtime.launch import run_on_ranks

pytestmark = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks what a machine without CUDA resolves"
)


def test_auto_resolves_to_local_without_fp8_on_cpu():
    resolved = resolved_layers(ModelConfig(params_dtype="float32"))
    assert resolved == {
        "transformer_impl": "local",
        "requested_impl": "auto",
        "transformer_engine_version": None,
        "fp8": None,
        "fp8_recipe": None,  # the recipe field's default means nothing without fp8
        "params_dtype": "float32",
    }
    assert describe_layers(resolved) == "local layers (transformer_impl=auto), float32, no FP8"
    with pytest.raises(TransformerEngineMissing):
        resolved_layers(ModelConfig(transformer_impl="transformer_engine"))
    with pytest.raises(TransformerEngineMissing):
        resolved_layers(ModelConfig(fp8="hybrid", fp8_recipe="tensorwise"))


def _setup_and_log(hf_dir: str, run_dir: str) -> dict:
    import contextlib
    import io

    import torch

    from megatron_sdzero.models.architecture import architecture_from_hf
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel
    from megatron_sdzero.training.config import LoggingConfig, TrainConfig
    from megatron_sdzero.training.logging import StepLogger
    from megatron_sdzero.training.setup import build_frozen, setup_trainable

    torch.set_num_threads(1)
    init_model_parallel(ParallelConfig())
    arch = architecture_from_hf(hf_dir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainable = setup_trainable(arch, ModelConfig(params_dtype="float32"), TrainConfig(train_iters=1), 1)
        build_frozen(arch, ModelConfig(params_dtype="float32", transformer_impl="local"))
    logger = StepLogger(LoggingConfig(), run_dir, flops=None, world_size=1, train_iters=1)
    config = logger._with_resolved_layers({"train": {"lr": 1.0}})
    logger.close()
    return {"layers": trainable.layers, "printed": printed.getvalue(), "config": config}


def test_setup_prints_and_the_logger_records_what_was_resolved(tiny_hf_models, tmp_path: Path):
    run_dir = tmp_path / "run"
    out = run_on_ranks(_setup_and_log, 1, str(tiny_hf_models["qwen3_tied"]), str(run_dir), timeout_s=300)[0]
    assert out["layers"]["transformer_impl"] == "local" and out["layers"]["fp8"] is None
    assert "[sdzero] trained model: local layers (transformer_impl=auto), float32, no FP8" in out["printed"]
    assert "[sdzero] frozen model: local layers (transformer_impl=local), float32, no FP8" in out["printed"]
    recorded = json.loads((run_dir / "resolved_layers.json").read_text())
    assert recorded["trained"] == out["layers"] and recorded["frozen"]["requested_impl"] == "local"
    assert out["config"] == {"train": {"lr": 1.0}, "resolved_layers": recorded}
