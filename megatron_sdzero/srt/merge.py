"""Merge the run directories of sharded ``srt-collect`` jobs into one, without duplicates.

    sdzero srt-merge inputs=[runs/srt/shard0,runs/srt/shard1] output_dir=runs/srt/merged

Only committed records are read (what each shard's state.json vouches for), so a shard still running
or killed mid-batch contributes exactly its finished batches. Tuples are keyed by (problem id, init
index, revision index) and attempts by (problem id, kind, init index, revision index): a shard
listed twice, or two shards that overlap, add nothing twice. The shards must come from the same
recipe apart from shard_index and target. The output is itself a collection directory (state.json,
tuples.jsonl, attempts.jsonl, summary.json), so srt-prepare reads it like any other.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_sdzero.config import ConfigError, run_config_command
from megatron_sdzero.runtime.quiet import LOG_NAME
from megatron_sdzero.srt.store import (
    ATTEMPTS,
    CONFIG,
    LOCK,
    STATE,
    SUMMARY,
    TUPLES,
    CollectionStore,
    Counters,
    State,
    append_jsonl,
    open_committed,
    write_json_atomic,
)


@dataclass
class MergeConfig:
    inputs: list[Path] = field(default_factory=list)
    output_dir: Path = Path("outputs/srt/merged")
    target: int | None = None  # keep at most this many tuples (shard order, then collection order)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


def tuple_key(record: dict) -> tuple:
    return (record["problem_id"], record["init_index"], record["revision_index"])


def attempt_key(record: dict) -> tuple:
    return (record["problem_id"], record["kind"], record.get("init_index"), record.get("revision_index"))


def merge(config: MergeConfig) -> dict[str, Any]:
    if not config.inputs:
        raise ConfigError("inputs: give the shard directories to merge")
    shards = [open_committed(path) for path in config.inputs]
    identity = _common_identity(shards)
    out = Path(config.output_dir)
    if out.resolve() in {s.root.resolve() for s in shards}:
        raise ConfigError(f"output_dir: {out} is one of the inputs; merge into a new directory")
    _clear_previous_merge(out)
    out.mkdir(parents=True)
    tuples = list(_unique((t for s in shards for t in s.tuples()), tuple_key))
    if config.target is not None:
        tuples = tuples[: config.target]
    attempts = list(_unique((a for s in shards for a in s.attempts()), attempt_key))
    state = State(
        tuples_bytes=append_jsonl(out / TUPLES, tuples),
        attempts_bytes=append_jsonl(out / ATTEMPTS, attempts),
        done_ids=sorted({i for s in shards for i in s.state.done_ids}),
        counters=_merged_counters(shards, len(tuples)),
    )
    (out / CONFIG).write_text(yaml.safe_dump(identity, sort_keys=False))
    write_json_atomic(out / STATE, dataclasses.asdict(state))
    store = CollectionStore(out, state)
    return store.write_summary(
        {
            "merged_from": [str(s.root) for s in shards],
            "problems_done": len(state.done_ids),
            "target": config.target,
        }
    )


def _clear_previous_merge(out: Path) -> None:
    """A merge is a pure function of its inputs, so an earlier merge (even a partial one) is rebuilt."""
    if not out.exists():
        return
    ours = {TUPLES, ATTEMPTS, STATE, CONFIG, SUMMARY, LOCK, f"{STATE}.tmp", f"{SUMMARY}.tmp", "sft", LOG_NAME}
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in ours)
    if foreign:
        raise ConfigError(
            f"output_dir: {out} holds {foreign[:3]}, which no merge wrote; choose a new directory"
        )
    shutil.rmtree(out)


def _unique(records: Iterable[dict], key: Any) -> Iterable[dict]:
    seen: set = set()
    for record in records:
        k = key(record)
        if k not in seen:
            seen.add(k)
            yield record


def _merged_counters(shards: Sequence[CollectionStore], tuples_kept: int) -> Counters:
    """Summed counters; a directory listed twice counts once."""
    total = Counters()
    for root in {s.root.resolve(): s for s in shards}.values():
        total.add(root.counters)
    total.tuples_kept = tuples_kept
    return total


def _common_identity(shards: Sequence[CollectionStore]) -> dict[str, Any]:
    identities = []
    for shard in shards:
        values = yaml.safe_load((shard.root / CONFIG).read_text()) or {}
        values.get("collect", {}).pop("shard_index", None)
        identities.append(values)
    for shard, identity in zip(shards[1:], identities[1:], strict=True):
        if identity != identities[0]:
            raise ConfigError(f"{shard.root} was collected with a different recipe than {shards[0].root}")
    return identities[0]


def main(argv: Sequence[str] | None = None) -> int:
    def run(config: MergeConfig) -> int:
        s = merge(config)
        print(
            f"srt-merge: {len(s['merged_from'])} shards -> {s['tuples_kept']} tuples in {config.output_dir}"
        )
        return 0

    argv = sys.argv[1:] if argv is None else argv
    return run_config_command("sdzero srt-merge", __doc__.split("\n\n")[0], MergeConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
