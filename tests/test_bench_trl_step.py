"""tools/bench_trl_step.py (the TRL-style peer step) on CPU: its loss against a float64 reference and
a smoke run of the whole step on a tiny Qwen3."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

TOOL = runpy.run_path(str(Path(__file__).parents[1] / "tools" / "bench_trl_step.py"), run_name="bench_trl")


def _reverse_kl_float64(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum_v p_s (log p_s - log p_t), averaged over batch x positions, with explicit exp/log in float64."""
    s, t = student.double(), teacher.double()
    log_p_s = s - s.exp().sum(-1, keepdim=True).log()
    log_p_t = t - t.exp().sum(-1, keepdim=True).log()
    return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1).mean()


def test_the_peer_loss_is_the_reverse_kl_per_token():
    generator = torch.Generator().manual_seed(11)
    student = (3 * torch.randn(2, 7, 50, generator=generator)).requires_grad_()
    teacher = 3 * torch.randn(2, 7, 50, generator=generator)
    ours = TOOL["reverse_kl_batchmean"](student, teacher)
    reference = _reverse_kl_float64(student, teacher)
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    forward = _reverse_kl_float64(teacher, student)  # KL(teacher || student): a different number
    assert abs(float(forward) - float(reference)) > 0.1
    (grad,) = torch.autograd.grad(ours, student)
    leaf = student.detach().double().requires_grad_()
    (grad_reference,) = torch.autograd.grad(_reverse_kl_float64(leaf, teacher), leaf)
    torch.testing.assert_close(grad.double(), grad_reference, rtol=1e-4, atol=1e-7)


def test_trl_own_loss_is_the_same_number_when_trl_is_installed():
    pytest.importorskip("trl")
    loss, name = TOOL["trl_loss"]()
    assert name.startswith("trl ")
    generator = torch.Generator().manual_seed(12)
    student, teacher = (torch.randn(2, 5, 40, generator=generator) for _ in range(2))
    assert float(loss(student, teacher)) == pytest.approx(
        float(_reverse_kl_float64(student, teacher)), rel=1e-5
    )


def test_tiny_step_runs_and_reports(tmp_path):
    out = tmp_path / "trl.json"
    argv = ["--shape", "tiny", "--layers", "2", "--micro-batches", "2", "--micro-batch-size", "2",
            "--prompt-tokens", "8", "--response-tokens", "16", "--warmup", "1", "--steps", "2",
            "--device", "cpu", "--json", str(out)]  # fmt: skip
    assert TOOL["main"](argv) == 0
    result = json.loads(out.read_text())
    assert result["samples"] == 4 and result["attention"] == "sdpa"
    assert result["student_tokens"] == 4 * (8 + 16) and result["teacher_tokens"] == 4 * (8 + 32 + 16)
    assert result["ms_per_step"] > 0 and len(result["losses"]) == 2
    assert all(loss > 0 for loss in result["losses"])  # the teacher reads another context than the student


def test_bad_arguments_are_refused():
    for bad in (["--layers", "0"], ["--warmup", "-1"], ["--shape", "qwen3-8b"]):
        with pytest.raises(SystemExit):
            TOOL["parse_args"](bad)
