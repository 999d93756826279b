"""`sdzero sft` end to end on a tiny model (CPU): two stages, the loss drops, the SRT checkpoint exports
to Hugging Face, a rerun skips finished stages, and SIGTERM (clean save) then SIGKILL (mid-run)
followed by a resume reproduce the uninterrupted losses exactly.

Measured with this recipe (24 samples per stage, 3 epochs, 9 iterations per stage): stage 1 goes from
7.68 to 2.54 nats, stage 2 from 2.76 to 0.69; the test asserts stage 1 ends below half its first loss.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_sdzero.runtime.launch import run_on_ranks
from megatron_sdzero.training.sft import SFTConfig, run_sft

ITERATIONS = 9  # per stage: 24 samples -> 12 packed rows per epoch, 3 epochs, 4 rows per step


@pytest.fixture(scope="module")
def assets(tiny_hf_models, tmp_path_factory) -> dict:
    from test_training_parallel import training_setup

    setup = training_setup(tiny_hf_models, tmp_path_factory)
    return {
        "mcore": setup["mcore"],
        "hf": setup["hf"],
        "stage1": setup["paths"][1],
        "stage2": setup["paths"][2],
    }


def _recipe(assets: dict, out: Path) -> dict:
    return {
        "init": str(assets["mcore"]),
        "output_dir": str(out),
        "model": {"params_dtype": "float32", "transformer_impl": "local"},
        "data": {
            "stage1": str(assets["stage1"]),
            "stage2": str(assets["stage2"]),
            "seq_length": 256,
            "packing": True,
        },
        "train": {
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 2,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "epochs": 3,
            "seed": 5,
        },
        "checkpoint": {"interval": 2, "keep_last": 2},
        "logging": {"interval": 1, "progress": False},
    }


def _config(recipe: dict) -> SFTConfig:
    from megatron_sdzero.config import from_dict

    return from_dict(SFTConfig, recipe)


def _logged_iteration(run_dir: Path) -> int:
    """The last iteration in metrics.jsonl so far (0 before its first line; a torn line is skipped)."""
    path, last = run_dir / "metrics.jsonl", 0
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            last = max(last, json.loads(line)["iteration"])
        except (json.JSONDecodeError, KeyError):
            continue
    return last


def _losses(run_dir: Path) -> dict[int, float]:
    """Loss per iteration; after a crash an iteration may be logged twice: the resumed run's counts."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "run"
    assert run_on_ranks(run_sft, 1, _config(_recipe(assets, out)), timeout_s=600) == [0]
    return out


def test_two_stages_learn_and_end_in_an_exportable_srt_checkpoint(uninterrupted, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from megatron_sdzero.conversion.convert import mcore_to_hf

    stage1, stage2 = _losses(uninterrupted / "stage1"), _losses(uninterrupted / "stage2")
    assert sorted(stage1) == sorted(stage2) == list(range(1, ITERATIONS + 1))
    assert stage1[ITERATIONS] < 0.5 * stage1[1]
    assert stage2[1] < 0.5 * stage1[1]  # stage 2 starts from stage 1's weights
    assert stage2[ITERATIONS] < stage2[1]
    finished = json.loads((uninterrupted / "stage2" / "sft_finished.json").read_text())
    assert finished["iterations"] == ITERATIONS and "stage1" in finished["started_from"]
    assert (uninterrupted / "stage2" / "latest_checkpointed_iteration.txt").read_text() == str(ITERATIONS)
    assert sorted(p.name for p in (uninterrupted / "stage2").glob("iter_*")) == [
        "iter_0000008",
        "iter_0000009",
    ]
    assert not list(uninterrupted.rglob("*.partial"))

    hf = mcore_to_hf(uninterrupted / "stage2", tmp_path / "srt-hf")
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.model_type == "qwen3" and (hf / "tokenizer.json").is_file()


def test_rerun_skips_finished_stages(uninterrupted, assets) -> None:
    before = (uninterrupted / "stage2" / "metrics.jsonl").read_text()
    assert run_on_ranks(run_sft, 1, _config(_recipe(assets, uninterrupted)), timeout_s=600) == [0]
    assert (uninterrupted / "stage2" / "metrics.jsonl").read_text() == before


def _run_sft_signalled(config: SFTConfig, run_dir: str, iteration: int, signum: int) -> int:
    """run_sft, with a watcher thread that signals this very process once ``iteration`` is logged."""
    import threading

    def watch() -> None:
        while _logged_iteration(Path(run_dir)) < iteration:
            time.sleep(0.02)
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, daemon=True).start()
    return run_sft(config)


def _wait_for_iteration(process: subprocess.Popen, run_dir: Path, iteration: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        if _logged_iteration(run_dir) >= iteration:
            return
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no iteration {iteration} in {run_dir} within 300 s")


def _kill_with_descendants(process: subprocess.Popen) -> None:
    """SIGKILL the CLI; then end the helpers it had started (checkpoint writer, resource tracker), as
    Slurm's cgroup would."""
    import psutil

    helpers = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    for helper in helpers:
        try:
            helper.kill()
        except psutil.NoSuchProcess:
            pass


def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(uninterrupted, assets, tmp_path) -> None:
    out = tmp_path / "run"
    config = _config(_recipe(assets, out))

    # SIGTERM during stage 1: the step finishes, a checkpoint is written, the command returns 0.
    assert run_on_ranks(_run_sft_signalled, 1, config, str(out / "stage1"), 2, signal.SIGTERM) == [0]
    saved = int((out / "stage1" / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < ITERATIONS and not (out / "stage1" / "sft_finished.json").exists()

    # The real CLI resumes, finishes stage 1 and dies without warning in stage 2.
    recipe_path, log = tmp_path / "recipe.yaml", tmp_path / "cli.log"
    recipe_path.write_text(yaml.safe_dump(_recipe(assets, out)))
    with log.open("w") as sink:
        command = [sys.executable, "-m", "megatron_sdzero.cli", "sft", "--config", str(recipe_path)]
        cli = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        _wait_for_iteration(cli, out / "stage2", 3, log)
        _kill_with_descendants(cli)
    assert f"resumed from {out / 'stage1'}/iter_{saved:07d}" in log.read_text()
    assert (out / "stage1" / "sft_finished.json").is_file()
    assert not (out / "stage2" / "sft_finished.json").exists()

    assert run_on_ranks(run_sft, 1, config, timeout_s=600) == [0]
    for stage in ("stage1", "stage2"):
        assert _losses(out / stage) == _losses(uninterrupted / stage), stage  # bit-identical
