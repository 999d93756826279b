"""Crash-safe, resumable storage of an SRT collection run.

A run directory holds::

    config.yaml      the resolved config of the first committed batch (a restart must match it)
    tuples.jsonl     kept (x, y_init, P_r, y_revised) tuples        append-only
    attempts.jsonl   every initial response and revision, graded    append-only
    state.json       committed byte sizes of both files, finished problem ids, counters
    summary.json     counts, accuracies and timings (rewritten at the end of a run)
    .lock            flock-ed while a process writes the directory (a second writer is refused)

A batch is committed in three steps: append its tuples, append its attempts (each followed by
flush + fsync), then replace state.json atomically (write a temporary file, fsync, rename). A
crash anywhere leaves the files at most one partial batch (maybe a torn line) longer than
state.json says; opening the directory cuts them back to the committed sizes, so the batch is
redone from scratch and nothing is lost or duplicated. config.yaml is written with the first commit,
so a start that fails before any batch (a wrong model path, say) does not pin the directory to its
mistaken settings.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_sdzero.config import ConfigError
from megatron_sdzero.errors import UserError

TUPLES = "tuples.jsonl"
ATTEMPTS = "attempts.jsonl"
STATE = "state.json"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
LOCK = ".lock"


class StoreError(UserError, RuntimeError):
    """A collection directory is damaged, not one, or in use by another process."""


@dataclass
class Counters:
    problems: int = 0
    init_attempts: int = 0
    init_correct: int = 0
    revision_attempts: int = 0
    revision_correct: int = 0
    tuples_kept: int = 0
    skipped_prompts: int = 0  # prompts with no room left under max_model_len
    tokens_generated: int = 0
    generation_s: float = 0.0
    grading_s: float = 0.0
    batches: int = 0

    def add(self, other: Counters) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def init_accuracy(self) -> float:
        return self.init_correct / self.init_attempts if self.init_attempts else 0.0

    @property
    def revised_accuracy(self) -> float:
        return self.revision_correct / self.revision_attempts if self.revision_attempts else 0.0

    def summary(self) -> dict[str, Any]:
        tokens_per_s = self.tokens_generated / self.generation_s if self.generation_s else 0.0
        return {
            **dataclasses.asdict(self),
            "init_accuracy": round(self.init_accuracy, 6),
            "revised_accuracy": round(self.revised_accuracy, 6),
            "tokens_per_s": round(tokens_per_s, 3),
        }


@dataclass
class State:
    tuples_bytes: int = 0
    attempts_bytes: int = 0
    done_ids: list[str] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)

    @classmethod
    def read(cls, path: Path) -> State:
        raw = json.loads(path.read_text())
        return cls(
            tuples_bytes=raw["tuples_bytes"],
            attempts_bytes=raw["attempts_bytes"],
            done_ids=list(raw["done_ids"]),
            counters=Counters(**raw["counters"]),
        )


class CollectionStore:
    """The run directory; ``open`` resumes from the last committed batch."""

    def __init__(
        self, root: Path, state: State, lock: Any = None, identity: dict[str, Any] | None = None
    ) -> None:
        self.root = root
        self.state = state
        self.done_ids = set(state.done_ids)
        self._lock = lock  # held (an open file with an flock) while this process writes the run
        self._identity = identity  # written to config.yaml with the first commit

    @classmethod
    def open(cls, root: str | Path, identity: dict[str, Any]) -> CollectionStore:
        """Create or resume a run; ``identity`` is the part of the config a restart must repeat."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        lock = _lock(root / LOCK)
        _check_identity(root / CONFIG, identity)
        state = State.read(root / STATE) if (root / STATE).exists() else State()
        _cut_back(root / TUPLES, state.tuples_bytes)
        _cut_back(root / ATTEMPTS, state.attempts_bytes)
        return cls(root, state, lock, identity)

    def close(self) -> None:
        """Release the directory lock (a killed process releases it too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> CollectionStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def counters(self) -> Counters:
        return self.state.counters

    def commit(
        self, problem_ids: Iterable[str], tuples: list[dict], attempts: list[dict], counters: Counters
    ) -> None:
        if self._identity is not None and not (self.root / CONFIG).exists():
            _write_identity(self.root / CONFIG, self._identity)
        tuples_bytes = append_jsonl(self.root / TUPLES, tuples)
        attempts_bytes = append_jsonl(self.root / ATTEMPTS, attempts)
        new_ids = [i for i in problem_ids if i not in self.done_ids]
        self.state.done_ids.extend(new_ids)
        self.done_ids.update(new_ids)
        self.state.tuples_bytes, self.state.attempts_bytes = tuples_bytes, attempts_bytes
        self.state.counters.add(counters)
        write_json_atomic(self.root / STATE, dataclasses.asdict(self.state))

    def tuples(self) -> Iterator[dict]:
        return read_jsonl(self.root / TUPLES, self.state.tuples_bytes)

    def attempts(self) -> Iterator[dict]:
        return read_jsonl(self.root / ATTEMPTS, self.state.attempts_bytes)

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        summary = {**self.counters.summary(), **extra}
        write_json_atomic(self.root / SUMMARY, summary)
        return summary


def open_committed(root: str | Path) -> CollectionStore:
    """A finished or interrupted run directory, read-only: only what was committed."""
    root = Path(root)
    if not (root / STATE).exists():
        raise StoreError(
            f"{root} is not a collection directory (no {STATE}): give the output_dir of an srt-collect run"
        )
    return CollectionStore(root, State.read(root / STATE))


def append_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Append records (one JSON object a line), flush and fsync; returns the new file size."""
    with path.open("ab") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def read_jsonl(path: Path, limit_bytes: int | None = None) -> Iterator[dict]:
    """Records of a JSONL file, up to ``limit_bytes`` (the committed size) when given."""
    if not path.exists():
        return
    with path.open("rb") as f:
        data = f.read(limit_bytes) if limit_bytes is not None else f.read()
    for number, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise StoreError(
                    f"{path}:{number}: a torn or corrupt line ({err}); remove or repair that line "
                    "(a collection directory is repaired by reopening it with srt-collect)"
                ) from None


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: Path) -> Any:
    """An exclusive lock on the run directory: two writers would interleave their batches."""
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreError(
            f"another process is writing {path.parent} (it holds {path}); wait for it or stop it"
        ) from None
    except OSError as err:  # a filesystem without flock support: go on unlocked
        warnings.warn(
            f"cannot lock {path} ({err}); make sure only one srt-collect writes there", stacklevel=3
        )
    return handle


def _cut_back(path: Path, committed: int) -> None:
    size = path.stat().st_size if path.exists() else 0
    if size < committed:
        raise StoreError(
            f"{path} has {size} bytes but {committed} were committed: it was cut or replaced; restore it "
            "or start a new collect.output_dir"
        )
    if size > committed or not path.exists():
        with path.open("ab") as f:
            f.truncate(committed)
            os.fsync(f.fileno())


def _write_identity(path: Path, identity: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(identity, sort_keys=False))
    os.replace(tmp, path)


def _check_identity(path: Path, identity: dict[str, Any]) -> None:
    if not path.exists():
        return
    recorded = yaml.safe_load(path.read_text()) or {}
    changed = sorted(_differences(recorded, identity))
    if changed:
        raise ConfigError(
            f"{path.parent} was started with a different config ({', '.join(changed)}); "
            "restart with the same settings, or use a new collect.output_dir"
        )


def _differences(old: Any, new: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in set(old) | set(new):
            yield from _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip(".")
