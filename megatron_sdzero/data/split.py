"""``sdzero split-openr1``: a deterministic held-out split of OpenR1-Math, disjoint from training.

    sdzero split-openr1 --input OpenR1-Math-220k/data --held-out 500 --seed 0 \\
        --train-out data/openr1_train.jsonl --held-out-out data/openr1_heldout.jsonl

Problems are grouped by the hash of their normalised statement (case, whitespace and trailing
punctuation ignored), so a question that appears twice lands on one side only. Among the groups
with a gradable answer (what ``format: openr1`` keeps), the ``--held-out`` groups with the smallest
seeded hash are held out: the same input and seed always give the same split, and adding rows to the
input moves no other problem across. ``--exclude FILE`` (repeatable) keeps every problem of FILE
(JSONL/Parquet with a ``problem`` or ``question`` column, e.g. the training set of an earlier run) on
the training side. Both outputs keep the publisher's columns, one JSON row per line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_sdzero.data.benchmarks import ProblemFiltered, openr1
from megatron_sdzero.data.problems import file_rows, normalised_text_hash


def _statement(row: Any) -> str | None:
    if not isinstance(row, Mapping):
        return None
    text = row.get("problem") or row.get("question")
    return text if isinstance(text, str) and text.strip() else None


def _gradable(row: Mapping) -> bool:
    try:
        openr1(row)
    except (ProblemFiltered, ValueError):
        return False
    return True


def split_rows(
    rows: Iterable[Any], held_out: int, seed: int = 0, exclude: Iterable[str] = ()
) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows); held-out holds one row per chosen statement."""
    excluded = {normalised_text_hash(text) for text in exclude}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        text = _statement(row)
        if text is not None:
            groups.setdefault(normalised_text_hash(text), []).append(dict(row))
    eligible = [key for key, group in groups.items() if key not in excluded and _gradable(group[0])]
    if held_out > len(eligible):
        raise ValueError(
            f"--held-out {held_out}: only {len(eligible)} distinct gradable problems to choose from"
        )
    chosen = set(
        sorted(eligible, key=lambda key: hashlib.sha1(f"{seed}:{key}".encode()).hexdigest())[:held_out]
    )
    train = [row for key, group in groups.items() if key not in chosen for row in group]
    held = [groups[key][0] for key in groups if key in chosen]
    return train, held


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def _texts(path: Path) -> list[str]:
    return [text for _, row in file_rows(path, True, "train") if (text := _statement(row)) is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdzero split-openr1", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", type=Path, required=True, help="OpenR1-Math .parquet/.jsonl or a directory"
    )
    parser.add_argument("--held-out", type=int, required=True, help="distinct problems to hold out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-out", type=Path, required=True)
    parser.add_argument("--held-out-out", type=Path, required=True)
    parser.add_argument(
        "--exclude", type=Path, action="append", default=[], help="keep these on the train side"
    )
    args = parser.parse_args(argv)
    if args.held_out < 1:
        parser.error("--held-out must be >= 1")
    exclude = [text for path in args.exclude for text in _texts(path)]
    rows = (row for _, row in file_rows(args.input, True, "train"))
    try:
        train, held = split_rows(rows, args.held_out, args.seed, exclude)
    except ValueError as err:
        parser.error(str(err))
    _write_jsonl(args.train_out, train)
    _write_jsonl(args.held_out_out, held)
    print(
        f"split-openr1: {len(train)} training rows -> {args.train_out}, "
        f"{len(held)} held out -> {args.held_out_out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
