"""Cleaning of collected responses before SFT: degenerate repeated tails and sycophantic openers."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from megatron_sdzero.data.formatting import ChatFormat

DEFAULT_OPENERS = [
    "You're absolutely right",
    "You are absolutely right",
    "You're right",
    "You are right",
    "You're correct",
    "You are correct",
    "Good catch",
    "Great catch",
    "Nice catch",
    "Thanks for pointing",
    "Thank you for pointing",
    "Thanks for catching",
    "Thank you for catching",
    "My apologies",
    "I apologize",
    "Apologies",
    "Sorry",
]


@dataclass
class CleaningConfig:
    trim_repeats: bool = True
    min_repeats: int = 3  # a tail counts as degenerate when one period repeats this many times...
    min_tail_tokens: int = 64  # ...and the repeated stretch is at least this long (tokens)
    max_period: int = 512  # longest period (tokens) looked for
    strip_openers: bool = True
    openers: list[str] = field(default_factory=lambda: list(DEFAULT_OPENERS))


def trim_repeated_tail[S: (str, list[int])](
    seq: S, min_repeats: int = 3, min_tail: int = 64, max_period: int = 512
) -> S:
    """Cut a periodic tail (a loop the model fell into) down to one copy of its period.

    The tail is the longest suffix in which seq[i] == seq[i - p] for some period p; it is trimmed
    when it spans at least ``min_repeats`` periods and ``min_tail`` elements. A final partial copy
    (generation stopped mid-loop) counts. Works on token ids or on text (characters).
    """
    arr = _as_array(seq)
    n = len(arr)
    best_run = 0
    for period in range(1, min(max_period, n // max(min_repeats, 1)) + 1):
        if not np.array_equal(arr[n - period :], arr[n - 2 * period : n - period]):
            continue  # cheap rejection: the last two periods already differ
        run = _trailing_true(arr[period:] == arr[:-period])  # elements equal to the one a period back
        span = run + period
        if span >= min_repeats * period and span >= min_tail and run > best_run:
            best_run = run
    return seq[: n - best_run] if best_run else seq


def _as_array(seq: Sequence) -> np.ndarray:
    if isinstance(seq, str):
        return np.frombuffer(seq.encode("utf-32-le"), dtype=np.uint32)
    return np.asarray(seq, dtype=np.int64)


def _trailing_true(flags: np.ndarray) -> int:
    false_at = np.flatnonzero(~flags)
    return len(flags) - (int(false_at[-1]) + 1) if len(false_at) else len(flags)


def opener_pattern(openers: Sequence[str]) -> re.Pattern[str] | None:
    if not openers:
        return None
    alternatives = "|".join(re.escape(o).replace("'", "['’]") for o in sorted(openers, key=len, reverse=True))
    return re.compile(rf"\s*(?:{alternatives})\b", re.IGNORECASE)


def strip_openers(text: str, pattern: re.Pattern[str] | None) -> str:
    """Drop leading sycophantic sentences ("You're absolutely right! ...") from a revision.

    The whole first sentence goes, unless it carries the final answer (``\\boxed`` or a code
    fence); then only the opener phrase and its punctuation go.
    """
    if pattern is None:
        return text
    while match := pattern.match(text):
        sentence = re.match(r"[^\n.!?]*[.!?]*\s*", text[match.end() :])
        end = match.end() + sentence.end()
        if "\\boxed" in text[:end] or "```" in text[:end]:
            end = match.end() + re.match(r"[\s,;:.!—–-]*", text[match.end() :]).end()
        text = text[end:]
    return text


class Cleaner:
    """Applies a CleaningConfig to collected tuples, keeping token ids and text in step."""

    def __init__(self, fmt: ChatFormat, config: CleaningConfig) -> None:
        self.fmt, self.config = fmt, config
        self.pattern = opener_pattern(config.openers) if config.strip_openers else None
        self.stats: Counter[str] = Counter()

    def clean(self, record: dict) -> dict | None:
        """A cleaned copy of a tuple, or None when its revision is empty after cleaning."""
        record = dict(record)
        if self.config.trim_repeats:
            self._trim(record, "y_init")
            self._trim(record, "y_revised")
        self._strip(record)
        if not self.fmt.body(record["y_revised_ids"]) or not record["y_revised"].strip():
            self.stats["dropped_empty_revision"] += 1
            return None
        return record

    def _trim(self, record: dict, key: str) -> None:
        """Trim on token ids (exact); the text is re-decoded from the trimmed ids."""
        ids = record[f"{key}_ids"]
        body = self.fmt.body(ids)
        c = self.config
        trimmed = trim_repeated_tail(body, c.min_repeats, c.min_tail_tokens, c.max_period)
        if len(trimmed) < len(body):
            record[f"{key}_ids"] = trimmed + ids[len(body) :]
            record[key] = self.fmt.tokenizer.decode(record[f"{key}_ids"], skip_special_tokens=True)
            self.stats[f"trimmed_{key}"] += 1

    def _strip(self, record: dict) -> None:
        """Strip on text; a changed revision is re-tokenized (its end-of-turn id, if any, kept)."""
        text = strip_openers(record["y_revised"], self.pattern)
        if text != record["y_revised"]:
            ids = record["y_revised_ids"]
            tail = ids[len(self.fmt.body(ids)) :]
            record["y_revised_ids"] = self.fmt.tokenizer(text, add_special_tokens=False)["input_ids"] + tail
            record["y_revised"] = text
            self.stats["stripped_opener"] += 1
