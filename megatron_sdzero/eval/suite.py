"""A list of benchmarks evaluated with one engine, resumable problem by problem.

Each benchmark appends its finished problems to ``<output dir>/<name>.jsonl``: a first line holding
the config identity (what determines the samples: model, problem source, reward mode, k, seed,
sampling, prompt, token limit), then one line per finished problem with its per-sample correctness,
written and fsync'd after every batch. A rerun after a kill reads the log back, skips the finished
problems and samples only the rest; the samples of a problem depend on (seed, problem id) alone, so
the resumed result equals an uninterrupted one. A torn last line (the kill hit mid-write) is cut
off; a log written under another identity is refused with the keys that differ.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_sdzero.config import ConfigError, from_dict, to_dict
from megatron_sdzero.data.formatting import ChatFormat, PromptConfig
from megatron_sdzero.data.problems import LoadReport, Problem, ProblemSource
from megatron_sdzero.eval.evaluate import EvalOptions, ProblemResult, evaluate
from megatron_sdzero.eval.metrics import benchmark_scores, bootstrap_interval, per_problem_scores
from megatron_sdzero.rollout.base import RolloutEngine, SamplingParams

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
LOG_VERSION = 1


@dataclass
class BenchmarkConfig:
    """One benchmark of ``sdzero eval``; unset fields take the top-level ``eval`` / ``sampling``."""

    name: str  # names its log file and its row of the table: letters, digits, _ . -
    problems: ProblemSource
    reward_mode: Literal["math", "code", "instruct"] | None = None  # None: problems.mode
    k: int | None = None
    pass_at: list[int] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # overrides of the top-level sampling

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ConfigError(f"benchmarks: name {self.name!r} must be letters, digits, '_', '.', '-'")
        if self.reward_mode is not None and self.reward_mode != self.problems.mode:
            raise ConfigError(
                f"benchmarks.{self.name}.reward_mode: {self.reward_mode!r} does not grade "
                f"{self.problems.mode!r} problems"
            )

    @property
    def mode(self) -> str:
        return self.reward_mode or self.problems.mode

    def options(self, defaults: EvalOptions) -> EvalOptions:
        k = self.k or defaults.k
        pass_at = self.pass_at if self.pass_at is not None else [j for j in defaults.pass_at if j <= k]
        return EvalOptions(k=k, pass_at=pass_at, batch_size=defaults.batch_size, seed=defaults.seed)

    def sampling_params(self, defaults: SamplingParams) -> SamplingParams:
        return from_dict(
            SamplingParams, {**to_dict(defaults), **self.sampling}, prefix=f"{self.name}.sampling."
        )


def check_benchmarks(benchmarks: Sequence[BenchmarkConfig], defaults: EvalOptions) -> None:
    names = [b.name for b in benchmarks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"benchmarks: names must be unique, repeated: {repeated}")
    for benchmark in benchmarks:
        try:
            benchmark.options(defaults)
        except ConfigError as err:
            raise ConfigError(f"benchmarks.{benchmark.name}: {err}") from None


@dataclass
class BenchmarkRun:
    """What running one benchmark needs besides the engine and graders."""

    benchmark: BenchmarkConfig
    problems: list[Problem]
    load_report: LoadReport
    options: EvalOptions
    sampling: SamplingParams
    identity: dict[str, Any]


def identity(
    model: str, benchmark: BenchmarkConfig, options: EvalOptions, sampling: SamplingParams,
    prompt: PromptConfig, token_limit: int | None,
) -> dict[str, Any]:  # fmt: skip
    """Everything that decides a benchmark's samples and grades (not batch size or pass@ list)."""
    return {
        "version": LOG_VERSION,
        "model": model,
        "problems": to_dict(benchmark.problems),
        "reward_mode": benchmark.mode,
        "k": options.k,
        "seed": options.seed,
        "sampling": to_dict(sampling),
        "prompt": to_dict(prompt),
        "token_limit": token_limit,
    }


class ResumeLog:
    """The append-only JSONL of one benchmark's finished problems."""

    def __init__(self, path: Path, expected: dict[str, Any]) -> None:
        self.path = path
        self.finished: dict[str, ProblemResult] = {}
        records = self._complete_records() if path.exists() else []
        if not records:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w") as f:
                f.write(json.dumps({"identity": expected}) + "\n")
                _sync(f)
            return
        found = records[0].get("identity") if isinstance(records[0], dict) else None
        if found is None:
            raise ConfigError(f"{path}: no identity line; not a resume log of sdzero eval")
        if found != expected:
            differ = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            raise ConfigError(
                f"{path}: written by a different eval config (differs in {differ}); use another "
                "output.dir, or delete the file to start this benchmark over"
            )
        for record in records[1:]:
            result = ProblemResult(**record)
            self.finished[result.id] = result

    def _complete_records(self) -> list[Any]:
        """The log's newline-terminated lines; an unterminated tail (torn by a kill) is cut off the file."""
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with self.path.open("r+b") as f:
                f.truncate(end)
                _sync(f)
        records = []
        for number, line in enumerate(data[:end].splitlines()):
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConfigError(
                    f"{self.path}: line {number + 1} is not JSON; delete the file to start over"
                ) from None
        return records

    def append(self, results: Sequence[ProblemResult]) -> None:
        with self.path.open("a") as f:
            f.write("".join(json.dumps(asdict(r)) + "\n" for r in results))
            _sync(f)
        for result in results:
            self.finished[result.id] = result


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def run_benchmark(
    run: BenchmarkRun,
    engine: RolloutEngine,
    grader: Any,
    fmt: ChatFormat,
    prompt: PromptConfig,
    log: ResumeLog,
    token_limit: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the problems not yet in the log, then score all of them; returns the summary."""
    resumed = sum(p.id in log.finished for p in run.problems)
    todo = [p for p in run.problems if p.id not in log.finished]
    bar = _progress_bar(run.benchmark.name, len(run.problems), resumed, progress)
    tokens = generation_s = grading_s = 0.0
    try:
        if todo:

            def record(batch: list[ProblemResult]) -> None:
                log.append(batch)
                bar.update(len(batch))

            report = evaluate(
                todo, engine, grader, fmt, run.sampling, run.options, prompt,
                token_limit=token_limit, on_batch=record,
            )  # fmt: skip
            tokens, generation_s, grading_s = report.tokens, report.generation_s, report.grading_s
    finally:
        bar.close()
    results = [log.finished[p.id] for p in run.problems]
    return summarize(run, results, resumed) | {
        "tokens_this_run": int(tokens),
        "generation_s": round(generation_s, 3),
        "grading_s": round(grading_s, 3),
        "log": str(log.path),
    }


def summarize(run: BenchmarkRun, results: Sequence[ProblemResult], resumed: int) -> dict[str, Any]:
    """Scores with 95 % bootstrap intervals over problems (seeded by the eval seed)."""
    options = run.options
    correct = [r.correct for r in results]
    scores = benchmark_scores(correct, options.k, options.pass_at)
    intervals = {
        name: list(bootstrap_interval(values, seed=options.seed))
        for name, values in per_problem_scores(correct, options.k, options.pass_at).items()
    }
    return {
        **scores,
        "ci95": intervals,
        "k": options.k,
        "num_problems": len(results),
        "resumed_problems": resumed,
        "mean_tokens": round(sum(r.mean_tokens for r in results) / len(results), 2),
        "cut_off_samples": sum(r.cut_off for r in results),
        "source": run.load_report.as_dict(),
        "reward_mode": run.benchmark.mode,
    }


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(name: str, total: int, done: int, progress: Callable[..., Any] | None) -> Any:
    """tqdm on a terminal, nothing otherwise (or the bar factory a caller passes)."""
    if progress is not None:
        return progress(total=total, initial=done, desc=name)
    if not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=name, unit="problem", dynamic_ncols=True)
