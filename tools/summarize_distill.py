#!/usr/bin/env python3
"""Summarise on-policy runs (``sdzero distill|sdft|grpo``) as a markdown table, with each run's budget.

    python tools/summarize_distill.py --run disk=outputs/distill/smollm2_gpu \\
        --run memory=outputs/distill/smollm2_gpu_memory [--eval outputs/eval/smollm2_gpu/report.json] \\
        [--budget rft=outputs/rft/smollm2_gpu] [--json summary.json]

Per run (a column): the mean over the steps after the first (step 1 pays one-off warm-ups) of the
step time split, throughput, reward and KL from ``<run>/metrics.jsonl``; the largest engine-vs-trainer
log-prob difference of the refresh probe over all steps; the in-loop eval avg@k by step from
``<run>/eval_scores.json``; what each run spent from ``<run>/budget.json`` (``--budget``: runs with a
budget but no on-policy steps, e.g. ``sdzero rft``). ``--eval``: an ``sdzero eval`` report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMES = ("time_refresh_s", "time_generation_s", "time_grading_s", "time_teacher_s", "time_student_s")


@dataclass(frozen=True)
class Row:
    label: str
    value: Callable[[list[dict[str, Any]]], float]  # the run's step records -> the cell
    fmt: str = ".3f"


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, one record per iteration (a resumed run appends again: the last record wins)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["iteration"])] = record
    return [by_step[step] for step in sorted(by_step)]


def read_scores(run_dir: Path) -> dict[int, float]:
    path = run_dir / "eval_scores.json"
    if not path.is_file():
        return {}
    return {int(step): float(score) for step, score in sorted(json.loads(path.read_text()).items())}


def after_first(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return steps[1:] or steps


def mean_of(key: str) -> Callable[[list[dict[str, Any]]], float]:
    def value(steps: list[dict[str, Any]]) -> float:
        values = [float(s[key]) for s in after_first(steps) if key in s]
        return sum(values) / len(values) if values else math.nan

    return value


def max_of(key: str) -> Callable[[list[dict[str, Any]]], float]:
    def value(steps: list[dict[str, Any]]) -> float:
        values = [float(s[key]) for s in steps if key in s and not math.isnan(float(s[key]))]
        return max(values) if values else math.nan

    return value


def at(index: int, key: str) -> Callable[[list[dict[str, Any]]], float]:
    return lambda steps: float(steps[index][key]) if steps and key in steps[index] else math.nan


def other_seconds(steps: list[dict[str, Any]]) -> float:
    """Step seconds not in the five timed parts (batch building, teacher sync, logging)."""
    return mean_of("seconds")(steps) - sum(mean_of(key)(steps) for key in TIMES)


ROWS = (
    *(Row(f"{key} (mean)", mean_of(key)) for key in TIMES),
    Row("other seconds of the step (mean)", other_seconds),
    Row("step seconds, total (mean)", mean_of("seconds")),
    Row("train_tflops_per_gpu (mean)", mean_of("train_tflops_per_gpu"), ".2f"),
    Row("generation_tokens_per_s (mean)", mean_of("generation_tokens_per_s"), ",.0f"),
    Row("refresh_probe_max_diff (max over all steps)", max_of("refresh_probe_max_diff"), ".3g"),
    Row("refresh_probe_max_diff (mean)", mean_of("refresh_probe_max_diff"), ".3g"),
    Row("reward_mean (mean)", mean_of("reward_mean")),
    Row("reward_mean, first step", at(0, "reward_mean")),
    Row("reward_mean, last step", at(-1, "reward_mean")),
    Row("kl (mean)", mean_of("kl"), ".4g"),
    Row("kl, first step", at(0, "kl"), ".4g"),
    Row("kl, last step", at(-1, "kl"), ".4g"),
    Row("pg_loss (mean)", mean_of("pg_loss"), ".4g"),
    Row("zero_advantage_groups (mean)", mean_of("zero_advantage_groups"), ".2f"),
)


def cell(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else format(value, fmt)


def table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    names = list(runs)
    counts = [str(len(runs[n])) for n in names]
    lines = [
        f"| per step, steps after the first | {' | '.join(names)} |",
        f"|---|{'---:|' * len(names)}",
        f"| steps logged | {' | '.join(counts)} |",
    ]
    for row in ROWS:
        lines.append(f"| {row.label} | {' | '.join(cell(row.value(runs[n]), row.fmt) for n in names)} |")
    return lines


def score_lines(scores: dict[str, dict[int, float]]) -> list[str]:
    lines = []
    for name, by_step in scores.items():
        shown = ", ".join(f"step {step}: {value:.4f}" for step, value in by_step.items()) or "none"
        lines.append(f"- {name}: in-loop eval avg@k by step: {shown}")
    return lines


def eval_line(report_path: Path) -> list[str]:
    if not report_path.is_file():
        return [f"- exported student (sdzero eval): no report at {report_path}"]
    report = json.loads(report_path.read_text())
    scores = ", ".join(f"{k} {v:.4f}" for k, v in report.items() if k.startswith(("avg@", "pass@")))
    engine = report.get("config", {}).get("rollout", {}).get("engine", "?")
    return [
        f"- exported student, sdzero eval on the {engine} engine ({report.get('model')}): {scores} over "
        f"{report.get('num_problems')} problems, generation {report.get('generation_s')} s, "
        f"whole command {report.get('seconds')} s"
    ]


def budget_lines(runs: dict[str, Path]) -> list[str]:
    lines = []
    for name, path in runs.items():
        if not (path / "budget.json").is_file():
            continue
        b = json.loads((path / "budget.json").read_text())
        seconds = ", ".join(f"{phase} {value:.1f}" for phase, value in sorted(b["gpu_seconds"].items()))
        lines.append(
            f"- {name} budget: {b['questions']} questions, {b['total_samples']} samples generated "
            f"({b['prior_samples']} before the run), {b['samples_trained']} trained on, "
            f"{b['training_tokens']:,} loss tokens, {b['steps']} steps; GPU-seconds: {seconds}"
        )
    return lines


def summarize(
    runs: dict[str, Path], eval_report: Path | None, budgets: dict[str, Path] | None = None
) -> tuple[str, dict[str, Any]]:
    steps = {name: read_steps(path) for name, path in runs.items()}
    scores = {name: read_scores(path) for name, path in runs.items()}
    lines = [*table(steps), "", *score_lines(scores), *budget_lines({**runs, **(budgets or {})})]
    if eval_report is not None:
        lines += eval_line(eval_report)
    data = {
        "runs": {name: {row.label: row.value(steps[name]) for row in ROWS} for name in runs},
        "eval_scores": scores,
        "steps": {name: len(records) for name, records in steps.items()},
    }
    return "\n".join(lines), data


def parse_run(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--run NAME=RUN_DIR, got {text!r}")
    return name, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=parse_run, action="append", required=True, help="NAME=RUN_DIR")
    parser.add_argument("--budget", type=parse_run, action="append", default=[], help="NAME=RUN_DIR")
    parser.add_argument("--eval", type=Path, help="an sdzero eval report.json")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    text, data = summarize(dict(args.run), args.eval, dict(args.budget))
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
