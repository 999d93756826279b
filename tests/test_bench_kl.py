"""tools/bench_kl.py's peer rows on the CPU: rows of peers that are not importable say why, our rows
run (the CPU path of the same losses), and the report renders both. The timing itself needs a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "bench_kl", Path(__file__).parents[1] / "tools" / "bench_kl.py"
)
bench_kl = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_kl)


@pytest.fixture
def no_peers(monkeypatch) -> None:
    monkeypatch.setattr(bench_kl, "import_peer", lambda module: (None, f"{module} not importable: test"))


def _logits(tokens: int = 6, vocab: int = 40) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(tokens, vocab, generator=gen).requires_grad_()
    teacher = torch.randn(tokens, vocab, generator=gen)
    return student, teacher, torch.ones(tokens), torch.randint(0, vocab, (tokens,), generator=gen)


def test_a_missing_module_is_a_reason_not_an_error() -> None:
    module, reason = bench_kl.import_peer("no_such_peer_module_for_bench_kl")
    assert module is None and reason.startswith("no_such_peer_module_for_bench_kl not importable")
    assert bench_kl.measure_row("x: Liger", reason, torch.zeros(1)) == bench_kl.not_run(reason)


def test_logit_rows_without_peers(no_peers) -> None:
    student, teacher, mask, labels = _logits()
    rows = bench_kl.logit_peer_steps(student, teacher, mask, labels)
    assert (
        rows["reverse KL: Liger JSD(beta=1) on bf16 log-softmax"]
        == "liger_kernel.transformers not importable: test"
    )
    assert rows["cross-entropy: Liger"].startswith("liger_kernel.transformers")
    for name in ("reverse KL: ours", "reverse KL: naive fp32", "cross-entropy: ours"):
        rows[name]()
        assert student.grad is not None and torch.isfinite(student.grad).all(), name


def test_output_layer_rows_without_peers(no_peers) -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 8, generator=gen).requires_grad_()
    weight = torch.randn(40, 8, generator=gen).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(6, 8, generator=gen), torch.randn(40, 8, generator=gen)
    labels = torch.randint(0, 40, (6,), generator=gen)
    rows = bench_kl.output_layer_peer_steps(
        hidden, weight, teacher_hidden, teacher_weight, torch.ones(6), labels
    )
    missing = [name for name, step in rows.items() if isinstance(step, str)]
    assert len(missing) == 3 and all("Liger" in name or "Cut Cross-Entropy" in name for name in missing)
    for name, step in rows.items():
        if not isinstance(step, str):
            step()
            assert weight.grad is not None and torch.isfinite(weight.grad).all(), name
            assert hidden.grad is not None and torch.isfinite(hidden.grad).all(), name


def test_peer_table_shows_skipped_and_timed_rows() -> None:
    timed = {"ms": 8.1, "host_ms": 0.2, "peak_gib": 14.0, "extra_gib": 4.6, "oom": False}
    rows = [
        {"level": "logits", "name": "reverse KL: ours", **timed},
        {"level": "logits", "name": "cross-entropy: Liger", **bench_kl.not_run("liger not importable")},
    ]
    lines = bench_kl.peers_markdown(bench_kl.PEERS_SHAPE, rows)
    assert "| logits | reverse KL: ours | 8.10 | 14.00 | 4.60 |" in lines
    assert "| logits | cross-entropy: Liger | not run (liger not importable) | - | - |" in lines
