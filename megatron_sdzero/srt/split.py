"""Dedupe and the seeded split of SRT tuples into the two SFT stages."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

# The fields of a stage1.jsonl / stage2.jsonl record besides "stage" (see docs/phase1.md).
STAGE_FIELDS = (
    "problem_id",
    "mode",
    "messages",
    "phrase",
    "init_correct",
    "y_init",
    "y_init_ids",
    "y_revised",
    "y_revised_ids",
)


@dataclass
class SplitConfig:
    stage2_size: int = 1000  # revision stage quota (reference script: 1000; its README: 2000)
    stage1_size: int = 4000  # generation stage quota
    seed: int = 0


def dedupe(records: Iterable[dict]) -> tuple[list[dict], int]:
    """First occurrence of each (x, y_init, y_revised) text triple; and how many were dropped."""
    seen: set[tuple[str, str, str]] = set()
    kept, duplicates = [], 0
    for record in records:
        key = (record["problem"], record["y_init"], record["y_revised"])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(record)
    return kept, duplicates


def split_stages(records: list[dict], config: SplitConfig) -> tuple[list[dict], list[dict]]:
    """(stage1, stage2). Stage 2 takes its quota first, correct-init tuples first, then incorrect-init
    ones; stage 1 takes the remaining incorrect-init tuples up to its quota. The result depends on the
    records and the seed only, not on the order the records came in."""
    ordered = sorted(records, key=_sort_key)
    correct = [r for r in ordered if r["init_correct"]]
    incorrect = [r for r in ordered if not r["init_correct"]]
    rng = random.Random(f"srt-split:{config.seed}")
    rng.shuffle(correct)
    rng.shuffle(incorrect)
    stage2 = correct[: config.stage2_size]
    from_incorrect = max(0, config.stage2_size - len(stage2))
    stage2 += incorrect[:from_incorrect]
    stage1 = incorrect[from_incorrect : from_incorrect + config.stage1_size]
    return stage1, stage2


def stage_record(record: dict, stage: int) -> dict:
    return {"stage": stage, **{key: record[key] for key in STAGE_FIELDS}}


def _sort_key(record: dict) -> tuple:
    return (
        record["problem_id"],
        record["init_index"],
        record["revision_index"],
        record["y_init"],
        record["y_revised"],
    )
