"""README's first command: `sdzero demo` runs every stage end to end, then resumes without redoing work."""

from __future__ import annotations

import json
import subprocess
import sys


def _demo(out_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_sdzero.cli", "demo", f"output_dir={out_dir}", "distill_steps=3"],
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_demo_runs_every_stage_and_resumes(tmp_path):
    done = _demo(tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    demo_lines = [line for line in done.stdout.splitlines() if line.startswith("[demo] ")]
    for stage in ("HF -> Megatron", "SRT collection", "two-stage SFT", "self-distillation", "export"):
        assert any(stage in line for line in demo_lines), stage
    summary = json.loads((tmp_path / "srt" / "summary.json").read_text())
    assert summary["problems"] == 24 and summary["init_attempts"] == 48
    finished = json.loads((tmp_path / "sft" / "stage2" / "sft_finished.json").read_text())
    assert finished["iterations"] > 0 and finished["skipped_iterations"] == 0
    steps = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in steps] == [1, 2, 3]
    assert all(row["kl"] >= 0 for row in steps)
    assert (tmp_path / "final_hf" / "model.safetensors").is_file()

    again = _demo(tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("already done") == 6
