"""The interface every reward shares: grade a batch of responses against their references."""

from __future__ import annotations

import abc
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self


@dataclass(frozen=True)
class RewardResult:
    score: float
    """1.0 if the response is verified correct, else 0.0."""
    reason: str
    """Why: "correct"/"passed", or the failure ("no_answer", "timeout", "wrong_answer", ...)."""
    extracted: str
    """What was graded: the extracted final answer (math) or the code block (code); "" if none."""
    seconds: float
    """Wall time spent grading this item (math: in its worker; code: compile and tests)."""
    detail: str = ""
    """Free-form diagnostics, e.g. the failing test or the compiler's first error lines."""


@dataclass(frozen=True)
class GradedBatch:
    results: list[RewardResult]
    seconds: float
    """Wall time for the whole batch."""

    @property
    def scores(self) -> list[float]:
        return [result.score for result in self.results]

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.results) if self.results else 0.0


class Reward(abc.ABC):
    """A verifier r(y, a) in {0, 1}, batched. Use as a context manager or call ``close()``."""

    mode: str

    @abc.abstractmethod
    def _grade_all(self, responses: list[str], answers: list[Any]) -> list[RewardResult]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases worker processes; the reward cannot be used afterwards."""

    def grade_batch(self, responses: Sequence[str | bytes], answers: Sequence[Any]) -> GradedBatch:
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        started = time.monotonic()
        results = self._grade_all([as_text(response) for response in responses], list(answers))
        return GradedBatch(results=results, seconds=time.monotonic() - started)

    def score_batch(self, responses: Sequence[str | bytes], answers: Sequence[Any]) -> list[float]:
        return self.grade_batch(responses, answers).scores

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: best effort only
            pass


def as_text(response: str | bytes) -> str:
    """Valid UTF-8 text: undecodable bytes and lone surrogates become U+FFFD."""
    if isinstance(response, bytes | bytearray):
        return bytes(response).decode("utf-8", errors="replace")
    if not isinstance(response, str):
        raise TypeError(f"a response must be str or bytes, not {type(response).__name__}")
    try:
        response.encode("utf-8")
    except UnicodeEncodeError:
        return response.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
    return response


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def require_positive(config: object, section: str, names: Sequence[str]) -> None:
    from megatron_sdzero.config import ConfigError

    for name in names:
        if not getattr(config, name) > 0:
            raise ConfigError(f"{section}.{name}: must be > 0, got {getattr(config, name)!r}")


def require_non_negative(config: object, section: str, names: Sequence[str]) -> None:
    from megatron_sdzero.config import ConfigError

    for name in names:
        if getattr(config, name) < 0:
            raise ConfigError(f"{section}.{name}: must be >= 0, got {getattr(config, name)!r}")
