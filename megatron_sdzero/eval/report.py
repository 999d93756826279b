"""results.json and the markdown table of a ``sdzero eval`` run."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def metric_names(benchmarks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """avg@k and pass@k columns in order of first appearance."""
    names: list[str] = []
    for summary in benchmarks.values():
        names.extend(n for n in summary if n.startswith(("avg@", "pass@")) and n not in names)
    return names


def markdown_table(
    model: str, benchmarks: Mapping[str, Mapping[str, Any]], validation: str | None = None
) -> str:
    """One row per reported benchmark: each score with its 95 % bootstrap interval over problems; the
    validation benchmark (checkpoint selection) goes in a table of its own below."""
    reported = {name: s for name, s in benchmarks.items() if name != validation}
    lines = [f"Model: `{model}`. Scores in percent, [95 % bootstrap interval over problems].", ""]
    lines += _table(reported)
    if validation is not None and validation in benchmarks:
        lines += ["", "Validation set (selects checkpoints; not a reported number):", ""]
        lines += _table({validation: benchmarks[validation]})
    return "\n".join(lines) + "\n"


def _table(benchmarks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    columns = metric_names(benchmarks)
    lines = ["| benchmark | problems | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for name, summary in benchmarks.items():
        cells = []
        for column in columns:
            if column not in summary:
                cells.append("-")
                continue
            low, high = summary["ci95"][column]
            cells.append(f"{100 * summary[column]:.1f} [{100 * low:.1f}, {100 * high:.1f}]")
        lines.append(f"| {name} | {summary['num_problems']} | " + " | ".join(cells) + " |")
    return lines


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_results(directory: Path, results: Mapping[str, Any]) -> tuple[Path, Path]:
    """``results.json`` (everything) and ``results.md`` (the table) in ``directory``."""
    as_json, as_markdown = directory / "results.json", directory / "results.md"
    write_atomically(as_json, json.dumps(results, indent=2) + "\n")
    table = markdown_table(results["model"], results["benchmarks"], results.get("validation"))
    write_atomically(as_markdown, table)
    return as_json, as_markdown
