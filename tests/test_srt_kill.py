"""The real ``sdzero srt-collect`` on a tiny random model, killed with SIGKILL at random moments.

The tiny model is random, so it almost never answers correctly and few or no tuples are kept: what is
tested here is the plumbing (CPU engine, math reward workers, batching, commits, resume), by comparing
a killed-and-restarted run byte for byte with an uninterrupted one. The tuple path through the same
commits is covered with a scripted engine in test_srt_collect.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sdzero.srt.store import ATTEMPTS, STATE, SUMMARY, TUPLES

NUM_PROBLEMS, BATCH = 12, 2


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_hf_models: dict[str, Path]) -> Path:
    path = tmp_path_factory.mktemp("kill") / "recipe.yaml"
    path.write_text(
        f"model: {{path: {tiny_hf_models['qwen3_tied']}, family: qwen3}}\n"
        f"problems: {{arithmetic: {{n: {NUM_PROBLEMS}, seed: 0, difficulty: 1}}}}\n"
        "rollout: {engine: hf, max_model_len: 1024, batch_size: 16, threads: 1}\n"
        "sampling: {max_tokens: 16, temperature: 1.0, top_p: 0.9}\n"
        "reward: {mode: math, math: {num_workers: 1}}\n"
        f"collect: {{target: 1000, batch_size: {BATCH}, num_responses: 2, num_revisions: 2,"
        " revise_correct: true, progress: false}\n"
    )
    return path


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "megatron_sdzero.cli", "srt-collect", "--config", str(recipe)]
    return subprocess.Popen(
        [*command, f"collect.output_dir={out}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def _batches_committed(out: Path) -> int:
    try:
        return json.loads((out / STATE).read_text())["counters"]["batches"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _kill_after(process: subprocess.Popen, out: Path, batches: int, extra_s: float) -> bool:
    """SIGKILL once `batches` batches are committed, plus extra_s; False if the run ended first."""
    while _batches_committed(out) < batches:
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    time.sleep(extra_s)
    if process.poll() is not None:
        return False
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return True


@pytest.fixture(scope="module")
def reference(recipe: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    _finish(_start(recipe, out))
    return out


def test_cpu_collection_end_to_end(reference: Path) -> None:
    summary = json.loads((reference / SUMMARY).read_text())
    attempts = [json.loads(line) for line in (reference / ATTEMPTS).read_text().splitlines()]
    tuples = (reference / TUPLES).read_text().splitlines()
    assert summary["problems"] == NUM_PROBLEMS and summary["batches"] == NUM_PROBLEMS // BATCH
    assert summary["init_attempts"] == 2 * NUM_PROBLEMS == sum(a["kind"] == "init" for a in attempts)
    assert summary["revision_attempts"] == 2 * summary["init_attempts"]  # revise_correct: every y_init
    assert summary["revision_correct"] == len(tuples) == summary["tuples_kept"]
    assert 0 < summary["tokens_generated"] <= 16 * 3 * summary["init_attempts"]
    assert all(a["num_tokens"] <= 16 and a["reason"] for a in attempts)
    assert summary["complete"] is False  # 12 problems cannot give 1000 tuples: the source ran out


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    recipe: Path, reference: Path, tmp_path
) -> None:
    out = tmp_path / "run"
    rng = random.Random()
    plan = [
        (0, rng.uniform(0.0, 6.0)),
        (1, rng.uniform(0.0, 0.6)),
        (3, rng.uniform(0.0, 0.6)),
        (4, rng.uniform(0, 1)),
    ]
    kills = []
    for batches, extra in plan:
        if _kill_after(_start(recipe, out), out, batches, extra):
            kills.append((batches, round(extra, 3), _batches_committed(out)))
    _finish(_start(recipe, out))
    assert len(kills) >= 2, f"too few kills landed: {kills}"
    for name in (TUPLES, ATTEMPTS):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), (
            f"{name} differs after kills {kills}"
        )
    resumed, uninterrupted = (json.loads((d / SUMMARY).read_text()) for d in (out, reference))
    for key in (
        "problems",
        "batches",
        "init_attempts",
        "revision_attempts",
        "tuples_kept",
        "tokens_generated",
    ):
        assert resumed[key] == uninterrupted[key], (key, kills)
