"""``sdzero srt-prepare``: clean, dedupe and split collected tuples into the two SFT stages.

    sdzero srt-prepare --config examples/srt_qwen3_4b_math.yaml

Reads the committed tuples of every input (collection directories or tuples.jsonl files; by
default the recipe's collect.output_dir), trims degenerate periodic tails of y_init and y_revised,
strips sycophantic openers of y_revised, dedupes on (x, y_init, y_revised), and splits with a seeded
shuffle: stage 2 (revision) takes its quota first, correct-init tuples first; stage 1 (generation)
takes the remaining incorrect-init tuples. Writes stage1.jsonl, stage2.jsonl (schema in
docs/phase1.md; turn a record into tokens with data.formatting.build_sft_sample) and
prepare_summary.json.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from megatron_sdzero.checks import check_output_dir
from megatron_sdzero.config import ConfigError, run_config_command
from megatron_sdzero.data.formatting import ChatFormat
from megatron_sdzero.srt.cleaning import Cleaner
from megatron_sdzero.srt.config import SRTConfig
from megatron_sdzero.srt.split import dedupe, split_stages, stage_record
from megatron_sdzero.srt.store import open_committed, read_jsonl, write_json_atomic


def prepare(config: SRTConfig) -> dict[str, Any]:
    inputs, output_dir = resolve_paths(config)
    raw = list(read_tuples(inputs))  # bad inputs fail before the tokenizer is loaded
    check_output_dir(output_dir, "prepare.output_dir")
    cleaner = Cleaner(load_format(config.model.path), config.prepare.cleaning)
    cleaned = [record for record in map(cleaner.clean, raw) if record is not None]
    unique, duplicates = dedupe(cleaned)
    stage1, stage2 = split_stages(unique, config.prepare.split)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(output_dir / "stage1.jsonl", (stage_record(r, 1) for r in stage1))
    write_jsonl_atomic(output_dir / "stage2.jsonl", (stage_record(r, 2) for r in stage2))
    summary = {
        "inputs": [str(p) for p in inputs],
        "output_dir": str(output_dir),
        "tuples_read": len(raw),
        "cleaning": dict(cleaner.stats),
        "duplicates_dropped": duplicates,
        "unique": len(unique),
        "stage1": len(stage1),
        "stage2": len(stage2),
        "stage2_correct_init": sum(r["init_correct"] for r in stage2),
        "unused": len(unique) - len(stage1) - len(stage2),
        "seed": config.prepare.split.seed,
    }
    write_json_atomic(output_dir / "prepare_summary.json", summary)
    return summary


def load_format(model_path: str | Path) -> ChatFormat:
    from transformers import AutoTokenizer

    return ChatFormat(AutoTokenizer.from_pretrained(str(model_path)))


def resolve_paths(config: SRTConfig) -> tuple[list[Path], Path]:
    inputs = [Path(p) for p in config.prepare.inputs] or [Path(config.collect.output_dir)]
    output_dir = config.prepare.output_dir or Path(config.collect.output_dir) / "sft"
    return inputs, Path(output_dir)


def read_tuples(inputs: Iterable[Path]) -> Iterator[dict]:
    """Committed tuples of collection directories (as state.json records them) or JSONL files."""
    for path in inputs:
        yield from tuples_of(path, "prepare.inputs")


def tuples_of(path: Path, key: str) -> Iterator[dict]:
    """The committed tuples of one collection directory or tuples.jsonl file (``key``: the setting)."""
    if path.is_dir():
        yield from open_committed(path).tuples()
    elif path.is_file():
        yield from read_jsonl(path)
    else:
        raise ConfigError(f"{key}: {path} does not exist")


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    def run(config: SRTConfig) -> int:
        s = prepare(config)
        print(
            f"srt-prepare: {s['tuples_read']} tuples -> {s['unique']} unique -> stage1 {s['stage1']}, "
            f"stage2 {s['stage2']} ({s['stage2_correct_init']} correct-init); written to {s['output_dir']}"
        )
        return 0

    argv = sys.argv[1:] if argv is None else argv
    return run_config_command("sdzero srt-prepare", __doc__.split("\n\n")[0], SRTConfig, run, argv)
