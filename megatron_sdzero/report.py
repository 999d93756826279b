"""``sdzero report RUN_DIR``: PNG plots of a run, from what it wrote.

    sdzero report outputs/distill/qwen3_4b_math          # -> outputs/distill/qwen3_4b_math/report/*.png

From ``RUN_DIR/metrics.jsonl`` (one record per step, see training/logging.py): loss and KL, reward,
eval accuracy (``eval_avg@k`` / ``eval_pass@k`` records, or ``eval_scores.json``), the step-time
split (``time_*_s``). From ``RUN_DIR/token_samples.jsonl`` (``{"step", "problem_id", "reward",
"tokens": [...], "values": [...]}`` per line): the per-token teacher-student divergence of a few
samples drawn over their text, so one sees which tokens the reviser points at. A plot whose data the
run did not write is skipped with a note. Prints where the PNGs are and the numbers behind them.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sdzero.errors import UserError, run_reporting_user_errors

METRICS = "metrics.jsonl"
TOKEN_SAMPLES = "token_samples.jsonl"
EVAL_SCORES = "eval_scores.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ReportError(UserError):
    """The run directory cannot be reported on."""


@dataclass
class Series:
    """One metric over iterations."""

    name: str
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)

    def summary(self) -> str:
        finite = [v for v in self.values if math.isfinite(v)]
        if not finite:
            return f"{self.name}: no finite values"
        return (
            f"{self.name}: first {self.values[0]:.6g} (step {self.steps[0]}), last {self.values[-1]:.6g} "
            f"(step {self.steps[-1]}), min {min(finite):.6g}, max {max(finite):.6g} "
            f"over {len(self.values)} steps"
        )


@dataclass
class Report:
    pngs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    numbers: list[str] = field(default_factory=list)


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSONL file and the number of lines that did not parse (a run cut mid-write)."""
    records, bad = [], 0
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def series(records: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Series]:
    out: dict[str, Series] = {}
    for record in records:
        step = record.get("iteration")
        if not isinstance(step, int):
            continue
        for name in names:
            value = record.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out.setdefault(name, Series(name)).add(step, float(value))
    return out


def _names_with(records: list[dict[str, Any]], prefix: str, suffix: str = "") -> list[str]:
    names = {k for r in records for k in r if k.startswith(prefix) and k.endswith(suffix)}
    return sorted(names)


def eval_series(records: list[dict[str, Any]], run_dir: Path) -> dict[str, Series]:
    found = series(records, _names_with(records, "eval_"))
    if found or not (run_dir / EVAL_SCORES).is_file():
        return found
    scores = json.loads((run_dir / EVAL_SCORES).read_text())
    avg = Series("eval avg@k (eval_scores.json)")
    for step, value in sorted((int(s), float(v)) for s, v in scores.items()):
        avg.add(step, value)
    return {avg.name: avg} if avg.steps else {}


# --- plots ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write and close a figure (closing frees it: reports draw many)."""
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def line_plot(path: Path, title: str, ylabel: str, lines: Sequence[Series]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for s in lines:
        ax.plot(s.steps, s.values, marker="o" if len(s.steps) < 30 else None, label=s.name)
    ax.set(title=title, xlabel="iteration", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def step_time_plot(path: Path, times: dict[str, Series]) -> Path:
    """Stacked seconds per step, one band per phase (generation, grading, teacher, student, ...)."""
    plt = _pyplot()
    steps = sorted({s for t in times.values() for s in t.steps})
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    bottom = [0.0] * len(steps)
    for name, s in times.items():
        by_step = dict(zip(s.steps, s.values, strict=True))
        heights = [by_step.get(step, 0.0) for step in steps]
        ax.bar(steps, heights, bottom=bottom, label=_phase(name), width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set(title="step time split", xlabel="iteration", ylabel="seconds (max over ranks)")
    ax.legend()
    return save_figure(fig, path)


def _phase(name: str) -> str:
    return name.removeprefix("time_").removesuffix("_s")


def token_plot(path: Path, sample: dict[str, Any], width_chars: int = 100) -> Path:
    """The response's tokens laid out as text, each on a background coloured by its divergence."""
    plt = _pyplot()
    tokens, values = sample["tokens"], [float(v) for v in sample["values"]]
    rows = len(_layout(tokens, width_chars))
    height = 1.2 + 0.28 * max(rows, 1)
    fig, ax = plt.subplots(figsize=(token_figure_width(width_chars), height), dpi=100)
    draw_tokens(ax, tokens, values, width_chars)
    ax.set_title(
        f"per-token teacher-student divergence: step {sample.get('step')}, "
        f"problem {sample.get('problem_id')}, reward {sample.get('reward')}",
        fontsize=9,
    )
    return save_figure(fig, path)


def token_figure_width(width_chars: int) -> float:
    """Inches for a text of ``width_chars`` columns: a 9 pt monospace glyph is ~0.075 in wide."""
    return width_chars * 0.075 / 0.82 + 0.4


def draw_tokens(
    ax: Any,
    tokens: Sequence[str],
    values: Sequence[float],
    width_chars: int = 100,
    marked: Sequence[bool] | None = None,
    label: str = "divergence",
) -> int:
    """Draw tokens as wrapped text on ``ax``, each on a background coloured by its value, with a
    colour bar; tokens whose ``marked`` entry is true are underlined. Returns the number of rows."""
    _pyplot()
    import matplotlib
    from matplotlib import cm, colors
    from matplotlib.patches import Rectangle

    rows = _layout(tokens, width_chars)
    norm = colors.Normalize(vmin=min(values), vmax=max(max(values), min(values) + 1e-12))
    cmap = matplotlib.colormaps["magma_r"]
    ax.set_xlim(0, width_chars)  # one data unit is one character
    ax.set_ylim(max(len(rows), 1), 0)
    ax.axis("off")
    for row, line in enumerate(rows):
        for col, index, text in line:
            ax.add_patch(Rectangle((col, row + 0.1), len(text), 0.8, color=cmap(norm(values[index])), lw=0))
            ink = "white" if norm(values[index]) > 0.6 else "black"
            ax.text(col, row + 0.5, text, va="center", ha="left", family="monospace", fontsize=9, color=ink)
            if marked is not None and marked[index]:
                ax.plot([col, col + len(text)], [row + 0.93, row + 0.93], color="tab:cyan", lw=2)
    ax.figure.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.02, pad=0.01, label=label)
    return len(rows)


def _layout(tokens: Sequence[str], width: int) -> list[list[tuple[int, int, str]]]:
    """Rows of (column, token index, visible text); a newline in a token starts a new row."""
    rows: list[list[tuple[int, int, str]]] = [[]]
    col = 0
    for index, token in enumerate(tokens):
        pieces = token.split("\n")
        for n, piece in enumerate(pieces):
            if n:
                rows.append([])
                col = 0
            text = piece.replace("\t", "    ") or ("⏎" if len(pieces) > 1 and n == 0 else "")
            if not text:
                continue
            if col + len(text) > width and col:
                rows.append([])
                col = 0
            rows[-1].append((col, index, text[:width]))
            col += len(text[:width])
    return rows


def check_token_sample(record: dict[str, Any], number: int) -> str | None:
    """Why a token_samples.jsonl record cannot be drawn, or None."""
    tokens, values = record.get("tokens"), record.get("values")
    if not isinstance(tokens, list) or not isinstance(values, list):
        return f"line {number}: needs lists 'tokens' and 'values'"
    if len(tokens) != len(values) or not tokens:
        return f"line {number}: {len(tokens)} tokens but {len(values)} values"
    return None


# --- the command ---------------------------------------------------------------------------------------


def build_report(run_dir: Path, out_dir: Path, num_samples: int = 3) -> Report:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory; give the run directory (it holds {METRICS})")
    if not any((run_dir / name).is_file() for name in (METRICS, TOKEN_SAMPLES, EVAL_SCORES)):
        raise ReportError(
            f"{run_dir} holds none of {METRICS}, {TOKEN_SAMPLES}, {EVAL_SCORES}: nothing to plot; give a "
            "run directory (an SFT stage directory, or distill's checkpoint.save)"
        )
    report = Report()
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    if (run_dir / METRICS).is_file():
        records, bad = read_jsonl(run_dir / METRICS)
        if bad:
            report.notes.append(f"{run_dir / METRICS}: {bad} unreadable line(s) skipped")
    else:
        report.notes.append(f"no {METRICS} in {run_dir}: loss, reward and step-time plots skipped")
    _metric_plots(records, run_dir, out_dir, report)
    _token_plots(run_dir, out_dir, num_samples, report)
    return report


def _metric_plots(records: list[dict[str, Any]], run_dir: Path, out_dir: Path, report: Report) -> None:
    losses = series(records, ["loss", "kl"])
    if "kl" in losses and "loss" in losses and losses["kl"].values == losses["loss"].values:
        del losses["loss"]  # distill's loss is its KL: one line
    _plot_or_note(report, out_dir / "loss.png", "loss / KL", "value", list(losses.values()), records)
    rewards = series(records, ["reward_mean"])
    _plot_or_note(report, out_dir / "reward.png", "reward", "mean reward", list(rewards.values()), records)
    evals = eval_series(records, run_dir)
    if evals:
        report.pngs.append(line_plot(out_dir / "eval.png", "eval accuracy", "accuracy", list(evals.values())))
        report.numbers += [s.summary() for s in evals.values()]
    else:
        report.notes.append(f"no eval_* metrics and no {EVAL_SCORES}: eval plot skipped")
    times = series(records, _names_with(records, "time_", "_s"))
    if times:
        report.pngs.append(step_time_plot(out_dir / "step_time.png", times))
        for name, s in times.items():
            report.numbers.append(f"{_phase(name)}: mean {sum(s.values) / len(s.values):.6g} s per step")
    elif records:
        report.notes.append("no time_*_s metrics: step-time plot skipped")


def _plot_or_note(report: Report, path: Path, title: str, ylabel: str, lines: list[Series], records) -> None:
    if lines:
        report.pngs.append(line_plot(path, title, ylabel, lines))
        report.numbers += [s.summary() for s in lines]
    elif records:
        report.notes.append(f"no {title} metrics in {METRICS}: {path.name} skipped")


def _token_plots(run_dir: Path, out_dir: Path, num_samples: int, report: Report) -> None:
    path = run_dir / TOKEN_SAMPLES
    if not path.is_file():
        report.notes.append(f"no {TOKEN_SAMPLES} in {run_dir}: per-token divergence plots skipped")
        return
    records, bad = read_jsonl(path)
    drawable = []
    for number, record in enumerate(records, start=1):
        problem = check_token_sample(record, number)
        if problem:
            bad += 1
        else:
            drawable.append(record)
    if bad:
        report.notes.append(f"{path}: {bad} record(s) that cannot be drawn skipped")
    for sample in drawable[-num_samples:]:  # the latest ones: what the trained student does now
        name = f"tokens_step{sample.get('step')}_{sample.get('problem_id')}.png"
        report.pngs.append(token_plot(out_dir / _safe(name), sample))
        values = [float(v) for v in sample["values"]]
        top = max(range(len(values)), key=values.__getitem__)
        report.numbers.append(
            f"sample step {sample.get('step')} problem {sample.get('problem_id')}: {len(values)} tokens, "
            f"mean divergence {sum(values) / len(values):.6g}, max {values[top]:.6g} at token "
            f"{top} {sample['tokens'][top]!r}"
        )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def write_run_report(run_dir: Path) -> Path | None:
    """The PNGs of a run that just ended, into RUN_DIR/report; the directory, or None if none was drawn.

    Training has finished by now, so a plot that fails is reported in one line, never raised.
    """
    out = run_dir / "report"
    try:
        report = build_report(run_dir, out)
    except Exception as err:  # noqa: BLE001 - the run's results are saved; only its pictures are missing
        print(f"report: no PNGs for {run_dir} ({type(err).__name__}: {err}); try sdzero report {run_dir}")
        return None
    if not report.pngs:
        return None
    print(
        f"report: {len(report.pngs)} PNG(s) in {out} ({', '.join(p.name for p in report.pngs)})", flush=True
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdzero report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default RUN_DIR/report)")
    parser.add_argument("--samples", type=int, default=3, help="token-divergence samples to draw (default 3)")
    args = parser.parse_args(list(argv or []))

    def run() -> int:
        out = args.out or args.run_dir / "report"
        report = build_report(args.run_dir, out, args.samples)
        for line in report.numbers:
            print(line)
        for note in report.notes:
            print(f"note: {note}")
        print(f"sdzero report: {len(report.pngs)} PNG(s) in {out}: " + ", ".join(p.name for p in report.pngs))
        return 0

    return run_reporting_user_errors("sdzero report", run)
