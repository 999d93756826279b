"""README's first command: `sdzero demo` warms a tiny model up, runs every stage, learns, then resumes."""

from __future__ import annotations

import json
import subprocess
import sys

# A shorter warm-up and Phase 2 than the demo's defaults, to keep CI fast; still enough for the
# model to be right sometimes, so tuples are kept and the evals are nonzero.
FAST = ["warmup_steps=300", "distill_steps=3"]


def _demo(out_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_sdzero.cli", "demo", f"output_dir={out_dir}", *FAST],
        capture_output=True,
        text=True,
        timeout=900,
    )


def _avg(out_dir, name: str) -> float:
    results = json.loads((out_dir / "eval" / name / "results.json").read_text())
    return results["benchmarks"]["default"]["avg@4"]


def test_demo_learns_and_resumes(tmp_path):
    done = _demo(tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    demo_lines = [line for line in done.stdout.splitlines() if line.startswith("[demo] ")]
    for stage in (
        "HF -> Megatron",
        "warm-up",
        "SRT collection",
        "two-stage SFT",
        "self-distillation",
        "export",
    ):
        assert any(stage in line for line in demo_lines), stage

    assert _avg(tmp_path, "random") == 0.0
    for name in ("warm", "srt", "distilled"):
        assert _avg(tmp_path, name) > 0.0, name
    summary = json.loads((tmp_path / "srt" / "summary.json").read_text())
    assert summary["problems"] == 96 and summary["tuples_kept"] > 0
    for stage in (1, 2):
        records = (tmp_path / "srt" / "sft" / f"stage{stage}.jsonl").read_text().splitlines()
        assert records and all(json.loads(r)["stage"] == stage for r in records)
        finished = json.loads((tmp_path / "sft" / f"stage{stage}" / "sft_finished.json").read_text())
        assert finished["iterations"] > 0 and finished["skipped_iterations"] == 0
    steps = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in steps] == [1, 2, 3]
    assert all(row["kl"] >= 0 for row in steps) and any(row["reward_mean"] > 0 for row in steps)
    assert (tmp_path / "final_hf" / "model.safetensors").is_file()
    for run in ("sft/stage2", "distill"):
        assert (tmp_path / run / "report" / "loss.png").is_file(), run
    assert "what happened" in done.stdout and "plots (PNG)" in done.stdout.splitlines()[-1]

    again = _demo(tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("already done") == 12
