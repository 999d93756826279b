"""GPU checks of the training loop (run on the GPU box: pytest -m gpu tests/test_training_gpu.py).

On CPU only the FP8 guard runs: asking for FP8 without TransformerEngine or without a GPU is a clear
error before anything is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sdzero.models.builder import ModelConfig, TransformerEngineMissing, use_transformer_engine

REPO = Path(__file__).resolve().parents[1]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("impl", ["auto", "transformer_engine", "local"])
def test_fp8_without_a_gpu_is_a_clear_error(impl) -> None:
    with pytest.raises(TransformerEngineMissing, match="FP8|fp8"):
        use_transformer_engine(ModelConfig(fp8="hybrid", fp8_recipe="tensorwise", transformer_impl=impl))


def _run(args: list[str], tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OUT": str(tmp_path)}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.gpu
@needs_gpu
def test_bench_runs_bf16_and_fp8_side_by_side(tmp_path) -> None:
    args = [
        "tools/bench_sft.py",
        "--num-layers",
        "2",
        "--seq-length",
        "1024",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--variants",
        "bf16",
        "fp8-delayed",
        "fp8-tensorwise",
    ]
    done = _run(args, tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_sft.json").read_text())["results"]
    bf16 = rows[0]
    assert bf16["variant"] == "bf16" and bf16["tokens_per_s"] > 0 and 0 < bf16["mfu"] < 1
    for row in rows[1:]:
        assert "error" not in row, row
        assert row["first_loss"] == pytest.approx(bf16["first_loss"], rel=0.05)  # same init and data


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_pp2_dp2_follow_one_gpu(tmp_path) -> None:
    done = _run(["tools/parity_sft.py", "--steps", "3"], tmp_path, timeout=1800)
    assert done.returncode == 0 and "PARITY OK" in done.stdout, done.stdout[-4000:] + done.stderr[-3000:]
