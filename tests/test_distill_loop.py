"""The whole Phase 2 loop on CPU with a tiny model: rollouts from disk-refreshed exports, teacher sync,
eval, best-k checkpoints, and kill-and-resume reproducing the uninterrupted run exactly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from torch.multiprocessing.spawn import ProcessExitedException

from megatron_sdzero.config import ConfigError, from_dict
from megatron_sdzero.conversion.convert import hf_to_mcore
from megatron_sdzero.distill.config import DistillConfig
from megatron_sdzero.distill.loop import prune_checkpoints
from megatron_sdzero.runtime.launch import run_on_ranks


def _distill_rank(values: dict, crash_at: int | None) -> dict:
    from megatron_sdzero.distill.loop import Hooks, distill

    def on_step_start(step: int) -> None:
        if step == crash_at:  # SIGKILL: no handler, no finally, no flush runs (as under the OOM killer)
            os.kill(os.getpid(), signal.SIGKILL)

    return distill(from_dict(DistillConfig, values), Hooks(on_step_start=on_step_start))


@pytest.fixture(scope="module")
def student(tiny_hf_models, tmp_path_factory) -> Path:
    return hf_to_mcore(tiny_hf_models["qwen3_tied"], tmp_path_factory.mktemp("loop") / "srt")


def _values(student: Path, run_dir: Path, **overrides) -> dict:
    values = {
        "student": {
            "checkpoint": str(student), "family": "qwen3", "start_is_srt": True,
            "model": {"params_dtype": "float32", "transformer_impl": "local"},
        },
        "problems": {"arithmetic": {"n": 10, "seed": 0}},
        "teacher": {"sync": "copy", "sync_interval": 2},
        "rollout": {"engine": "hf", "max_model_len": 512, "threads": 1, "batch_size": 4},
        "sampling": {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": 10},
        "reward": {"math": {"num_workers": 1}},
        "batch": {"student_max_tokens": 256, "teacher_budget": 512},
        "train": {
            "lr": 1e-3, "min_lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 1, "warmup_init_lr": 1e-4,
            "weight_decay": 0.01, "adam_beta2": 0.999, "micro_batch_size": 2, "global_batch_size": 4,
            "train_iters": 4, "epochs": None,
        },
        "refresh": {"mode": "disk", "keep_versions": 2, "probe": {"num_tokens": 8, "atol": 1e-4}},
        "eval": {
            "problems": {"arithmetic": {"n": 3, "seed": 7}}, "interval": 2,
            "sampling": {"max_tokens": 6}, "options": {"k": 2, "pass_at": [1, 2]},
        },
        "checkpoint": {"save": str(run_dir), "interval": 2, "keep_last": None},
        "logging": {"progress": False, "tensorboard_dir": None},
        "schedule": {"seed": 0, "keep_best": 1},
    }  # fmt: skip
    for key, value in overrides.items():
        section, name = key.split(".")
        values[section][name] = value
    return values


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["iteration"]: record for record in lines}


@pytest.mark.slow
def test_the_loop_runs_and_a_sigkilled_run_resumes_to_the_same_losses(student: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    last = run_on_ranks(_distill_rank, 1, _values(student, whole), None, timeout_s=600)[0]
    metrics = _metrics(whole)
    assert sorted(metrics) == [1, 2, 3, 4] and last["step"] == 4
    for record in metrics.values():
        assert record["kl"] > 0 and record["num_target_tokens"] > 0 and not record["skipped"]
        assert record["refresh_probe_max_diff"] < 1e-4
        assert 0.0 <= record["reward_mean"] <= 1.0 and 1 <= record["response_length_mean"] <= 10
        for name in ("refresh", "generation", "grading", "teacher", "student"):
            assert record[f"time_{name}_s"] > 0, name
        assert record["train_tflops_per_gpu"] > 0 and record["generation_tokens_per_s"] > 0
    assert len({round(r["kl"], 6) for r in metrics.values()}) == 4
    assert "eval_avg@2" in last
    scores = json.loads((whole / "eval_scores.json").read_text())
    assert sorted(scores) == ["2", "4"]
    kept = sorted(p.name for p in whole.glob("iter_*"))
    best = max(scores, key=lambda s: (scores[s], int(s)))
    assert kept == sorted({"iter_0000004", f"iter_{int(best):07d}"})
    assert sorted(p.name for p in (whole / "rollout_weights").iterdir()) == ["step_0000003", "step_0000004"]

    killed = tmp_path / "killed"
    with pytest.raises(ProcessExitedException, match="SIGKILL"):
        run_on_ranks(_distill_rank, 1, _values(student, killed), 3, timeout_s=600)
    assert (killed / "latest_checkpointed_iteration.txt").read_text() == "2"
    run_on_ranks(_distill_rank, 1, _values(student, killed), None, timeout_s=600)
    resumed = _metrics(killed)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for name in ("kl", "grad_norm", "reward_mean", "response_length_mean", "num_target_tokens"):
            assert resumed[step][name] == metrics[step][name], (step, name)


def test_a_plain_conversion_is_refused_unless_declared(student: Path, tmp_path: Path) -> None:
    from megatron_sdzero.distill.loop import check_start

    values = _values(student, tmp_path / "run")
    values["student"]["start_is_srt"] = None
    with pytest.raises(ConfigError, match="start_is_srt"):
        check_start(from_dict(DistillConfig, values))
    values["student"]["start_is_srt"] = True
    assert check_start(from_dict(DistillConfig, values))[1].name == "release"


def test_config_checks(student: Path, tmp_path: Path) -> None:
    values = _values(student, tmp_path / "run")
    values["train"]["global_batch_size"] = 5
    values["sampling"]["n"] = 2
    with pytest.raises(ConfigError, match="multiple of sampling.n"):
        from_dict(DistillConfig, values)
    values = _values(student, tmp_path / "run")
    values["student"]["family"] = "llama"
    with pytest.raises(ConfigError, match="control phrase"):
        from_dict(DistillConfig, values)


def test_prune_keeps_the_newest_and_the_best(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40, 50):
        (tmp_path / f"iter_{step:07d}").mkdir()
    removed = prune_checkpoints(tmp_path, {20: 0.5, 40: 0.7, 50: 0.1}, keep_best=2)
    assert removed == [10, 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000020", "iter_0000040", "iter_0000050"]


@pytest.mark.parametrize("name", ["distill_tiny_cpu", "distill_qwen3_4b_math", "distill_olmo3_7b_math"])
def test_recipes_load_with_the_reference_defaults(name: str) -> None:
    from megatron_sdzero.config import load_config

    config = load_config(DistillConfig, Path(__file__).parents[1] / "examples" / f"{name}.yaml")
    assert (
        config.loss.kind == "reverse" and config.sampling.temperature == 1.0 and config.sampling.top_p == 1.0
    )
    if name != "distill_tiny_cpu":
        train = config.train
        assert (train.lr, train.weight_decay, train.adam_beta2, train.clip_grad) == (5e-6, 0.01, 0.999, 1.0)
        assert (train.warmup_steps, train.warmup_init_lr, train.train_iters) == (20, 5e-7, 1000)
        assert config.prompts_per_step == 128 and config.sampling.n == 1
        assert (config.batch.student_max_tokens, config.batch.teacher_budget) == (8192, 32768)
        assert (config.eval.interval, config.eval.options.k, config.checkpoint.interval) == (20, 8, 10)
        assert config.schedule.keep_best == 3
