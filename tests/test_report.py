"""``sdzero report`` on a synthetic run: the PNGs exist and are PNGs, the printed numbers are right."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from megatron_sdzero import cli
from megatron_sdzero.report import PNG_MAGIC, _layout

pytest.importorskip("matplotlib")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _distill_run(run: Path, steps: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for step in range(1, steps + 1):
        kl = rng.uniform(0.001, 0.01)
        record = dict(
            iteration=step,
            loss=kl,
            kl=kl,
            lr=1e-5,
            reward_mean=rng.random(),
            time_generation_s=rng.uniform(1, 2),
            time_teacher_s=rng.uniform(0.1, 0.5),
            time_student_s=rng.uniform(0.2, 0.6),
        )
        if step % 2 == 0:
            record["eval_avg@4"] = rng.random()
        records.append(record)
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", records)
    return records


def _pngs(out: str) -> list[str]:
    return out.strip().splitlines()[-1].split(": ", 2)[2].split(", ")


def test_report_draws_every_plot_and_prints_the_right_numbers(tmp_path, capsys):
    run = tmp_path / "run"
    records = _distill_run(run, steps=7, seed=11)
    tokens = ["The", " answer", " is", " 4", ".\n", "Wait", ",", " 2", "+", "2", "=", "4"]
    values = [random.Random(5).uniform(0, 3) for _ in tokens]
    samples = [
        {"step": 3, "problem_id": "aa11", "reward": 0.0, "tokens": tokens[:5], "values": values[:5]},
        {"step": 7, "problem_id": "bb22", "reward": 1.0, "tokens": tokens, "values": values},
        {"step": 7, "problem_id": "bad", "reward": 1.0, "tokens": tokens, "values": values[:3]},
    ]
    _write_jsonl(run / "token_samples.jsonl", samples)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 8, "kl": 0.00')  # a torn last line of a killed run

    assert cli.main(["report", str(run), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    names = _pngs(out)
    tokens_pngs = {"tokens_step3_aa11.png", "tokens_step7_bb22.png"}
    assert set(names) == {"loss.png", "reward.png", "eval.png", "step_time.png", *tokens_pngs}
    for name in names:
        data = (run / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000

    kl = [r["kl"] for r in records]
    assert (
        f"kl: first {kl[0]:.6g} (step 1), last {kl[-1]:.6g} (step 7), min {min(kl):.6g}, max {max(kl):.6g}"
        in out
    )
    assert "loss: first" not in out  # distill's loss is its KL: one line, not two
    evals = [r["eval_avg@4"] for r in records if "eval_avg@4" in r]
    assert f"eval_avg@4: first {evals[0]:.6g} (step 2), last {evals[-1]:.6g} (step 6)" in out
    generation = sum(r["time_generation_s"] for r in records) / len(records)
    assert f"generation: mean {generation:.6g} s per step" in out
    top = max(range(len(values)), key=values.__getitem__)
    assert f"max {values[top]:.6g} at token {top} {tokens[top]!r}" in out
    assert "1 unreadable line(s) skipped" in out and "1 record(s) that cannot be drawn skipped" in out


def test_missing_files_skip_their_plots_with_a_note(tmp_path, capsys):
    run = tmp_path / "sft_stage1"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [{"iteration": i, "loss": 2.0 / i} for i in range(1, 5)])
    assert cli.main(["report", str(run), "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert _pngs(out) == ["loss.png"] and (tmp_path / "plots" / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert "loss: first 2 (step 1), last 0.5 (step 4), min 0.5, max 2 over 4 steps" in out
    for skipped in (
        "reward.png skipped",
        "eval plot skipped",
        "step-time plot skipped",
        "divergence plots skipped",
    ):
        assert skipped in out


def test_eval_scores_json_is_the_fallback_for_eval_accuracy(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval_scores.json").write_text(json.dumps({"20": 0.25, "10": 0.125}))
    assert cli.main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "first 0.125 (step 10), last 0.25 (step 20)" in out and _pngs(out) == ["eval.png"]


def test_a_directory_with_nothing_to_plot_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to plot" in err[0]


def test_token_layout_wraps_and_breaks_lines():
    rows = _layout(["ab", "cd\nef", "g" * 5], width=6)
    assert rows == [[(0, 0, "ab"), (2, 1, "cd")], [(0, 1, "ef")], [(0, 2, "ggggg")]]


def test_a_run_that_ends_writes_its_pngs_and_a_plot_failure_is_one_line(tmp_path, capsys):
    from megatron_sdzero.report import write_run_report

    run = tmp_path / "run"
    _distill_run(run, steps=4, seed=3)
    assert write_run_report(run) == run / "report"
    for name in ("loss.png", "reward.png", "eval.png", "step_time.png"):
        assert (run / "report" / name).read_bytes().startswith(PNG_MAGIC), name
    assert capsys.readouterr().out.startswith(f"report: 4 PNG(s) in {run / 'report'}")

    (tmp_path / "empty").mkdir()
    assert write_run_report(tmp_path / "empty") is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("report: no PNGs for") and "sdzero report" in out[0]
