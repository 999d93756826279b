"""``sdzero eval``: avg@k and pass@k of a checkpoint on a list of benchmarks, with one engine start.

    sdzero eval --config examples/eval_qwen3_4b_paper.yaml model.path=outputs/distill/qwen3_4b/hf/step_000200

Each benchmark names a problem source and may set its own reward mode, k, pass@ list and sampling
overrides. Results go to ``output.dir``: ``results.json``, ``results.md`` (the table: avg@k, pass@k
with 95 % bootstrap intervals over problems) and one resume log per benchmark (``<name>.jsonl``), so
a killed run picks up where it stopped (see :mod:`megatron_sdzero.eval.suite`). The older
single-benchmark form (a top-level ``problems`` and ``output.report``) still works and also writes
its report.

``model.path`` is a Hugging Face directory (or hub name) or a Megatron checkpoint written by
``sdzero convert`` or a training run; a Megatron checkpoint is exported to HF first (into
``output.export_dir``, default ``<output dir>/hf``) and the rollout engine reads the export.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_sdzero.checks import check_model_path, check_output_dir
from megatron_sdzero.config import ConfigError, run_config_command, to_dict
from megatron_sdzero.data.formatting import ChatFormat, PromptConfig
from megatron_sdzero.data.problems import ProblemSource, load_problems
from megatron_sdzero.eval.evaluate import EvalOptions
from megatron_sdzero.eval.report import write_atomically, write_results
from megatron_sdzero.eval.selection import check_disjoint
from megatron_sdzero.eval.suite import (
    BenchmarkConfig,
    BenchmarkRun,
    ResumeLog,
    check_benchmarks,
    identity,
    run_benchmark,
)
from megatron_sdzero.rewards import RewardConfig, build_reward
from megatron_sdzero.rollout.base import ModelSource, RolloutConfig, SamplingParams, build_engine

SINGLE_BENCHMARK = "default"  # the name the single-benchmark form's benchmark gets


@dataclass
class EvalOutput:
    # results.json, results.md, <benchmark>.jsonl. None: the report's directory (single-benchmark
    # form), else outputs/eval/<last part of model.path>, so each checkpoint gets its own results.
    dir: Path | None = None
    report: Path | None = None  # the single-benchmark form's report.json (top-level scores)
    export_dir: Path | None = None  # where a Megatron checkpoint is exported; default <dir>/hf


@dataclass
class EvalConfig:
    model: ModelSource
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    problems: ProblemSource | None = None  # the single-benchmark form, instead of benchmarks
    prompt: PromptConfig = field(default_factory=PromptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, top_p=1.0))
    reward: RewardConfig = field(default_factory=RewardConfig)  # grader settings; mode: single form only
    eval: EvalOptions = field(default_factory=EvalOptions)  # defaults for every benchmark
    output: EvalOutput = field(default_factory=EvalOutput)
    # The benchmark that selects checkpoints: evaluated, checked to share no problem with the others,
    # and kept out of the table of reported numbers.
    validation: str | None = None

    def __post_init__(self) -> None:
        if (self.problems is None) == (not self.benchmarks):
            raise ConfigError(
                "eval: set either benchmarks (a list) or problems (a single benchmark), not both"
            )
        if self.problems is not None and self.reward.mode != self.problems.mode:
            raise ConfigError(
                f"reward.mode: {self.reward.mode!r} does not grade {self.problems.mode!r} problems"
            )
        check_benchmarks(self.suite, self.eval)
        if self.validation is not None and self.validation not in {b.name for b in self.suite}:
            raise ConfigError(f"validation: {self.validation!r} names none of the benchmarks")

    @property
    def suite(self) -> list[BenchmarkConfig]:
        if self.problems is not None:
            return [BenchmarkConfig(SINGLE_BENCHMARK, self.problems, reward_mode=self.reward.mode)]
        return self.benchmarks

    @property
    def output_dir(self) -> Path:
        if self.output.dir is not None:
            return self.output.dir
        if self.output.report is not None:
            return self.output.report.parent
        return Path("outputs/eval") / Path(str(self.model.path)).name

    @property
    def run_dir(self) -> Path:
        return self.output.report.parent


def is_megatron_checkpoint(path: Path) -> bool:
    from megatron_sdzero.conversion.megatron_io import MODEL_META, TRACKER

    return (path / TRACKER).is_file() or (path / MODEL_META).is_file() or (path / "metadata.json").is_file()


def hf_model_dir(config: EvalConfig) -> Path:
    """The HF directory the engine loads: the model path, or its export if it is a Megatron checkpoint."""
    return exported_hf_dir(Path(config.model.path), config.output.export_dir or config.output_dir / "hf")


def exported_hf_dir(path: Path, export_dir: Path) -> Path:
    """``path`` itself, or, when it is a Megatron checkpoint, its HF export written to ``export_dir``."""
    if not path.is_dir() or not is_megatron_checkpoint(path):
        return path
    from megatron_sdzero.conversion.convert import mcore_to_hf

    return mcore_to_hf(path, export_dir, overwrite=True)


def prepare(config: EvalConfig) -> list[BenchmarkRun]:
    """Every benchmark's problems and settings, loaded before the engine starts (bad input fails fast)."""
    runs = []
    for benchmark in config.suite:
        problems, report = load_problems(benchmark.problems)
        if not problems:
            raise ConfigError(f"benchmarks.{benchmark.name}: {report.source} holds no valid problems")
        options, sampling = benchmark.options(config.eval), benchmark.sampling_params(config.sampling)
        key = identity(
            str(config.model.path), benchmark, options, sampling, config.prompt, config.rollout.max_model_len
        )
        runs.append(BenchmarkRun(benchmark, problems, report, options, sampling, key))
    for validation in (r for r in runs if r.benchmark.name == config.validation):
        for other in (r for r in runs if r is not validation):
            check_disjoint(
                validation.benchmark.name, validation.problems, other.benchmark.name, other.problems
            )
    return runs


def run_eval(config: EvalConfig, engine: Any = None, progress: Any = None) -> dict[str, Any]:
    """Evaluate every benchmark and write the results; ``engine``/``progress``: injected by tests."""
    started = time.perf_counter()
    runs = prepare(config)
    directory = config.output_dir
    check_output_dir(directory, "output.dir")
    if engine is None:
        check_model_path(config.model.path, "model.path")
    logs = [
        ResumeLog(directory / f"{run.benchmark.name}.jsonl", run.identity) for run in runs
    ]  # before the engine
    results: dict[str, Any] = {
        "model": str(config.model.path),
        "validation": config.validation,
        "benchmarks": {},
    }
    with ExitStack() as stack:
        if engine is None:
            engine = build_engine(ModelSource(hf_model_dir(config), config.model.family), config.rollout)
            stack.callback(engine.close)
        fmt = ChatFormat(engine.tokenizer)
        graders: dict[str, Any] = {}
        for run, log in zip(runs, logs, strict=True):
            mode = run.benchmark.mode
            if mode not in graders:
                graders[mode] = stack.enter_context(build_reward(_reward_config(config.reward, mode)))
            results["benchmarks"][run.benchmark.name] = run_benchmark(
                run, engine, graders[mode], fmt, config.prompt, log,
                token_limit=config.rollout.max_model_len, progress=progress,
            )  # fmt: skip
            results["seconds"] = round(time.perf_counter() - started, 3)
            results["config"] = to_dict(config)
            write_results(directory, results)  # after each benchmark: a partial table is still a table
    if config.problems is not None and config.output.report is not None:
        _write_single_report(config, runs[0], logs[0], results)
    return results


def _reward_config(reward: RewardConfig, mode: str) -> RewardConfig:
    return RewardConfig(mode=mode, math=reward.math, code=reward.code, ifeval=reward.ifeval)  # type: ignore[arg-type]


def _write_single_report(
    config: EvalConfig, run: BenchmarkRun, log: ResumeLog, results: dict[str, Any]
) -> None:
    """The single-benchmark form's report.json: top-level scores and the per-problem list."""
    summary = results["benchmarks"][SINGLE_BENCHMARK]
    problems = [asdict(log.finished[p.id]) for p in run.problems]
    report = {
        "model": results["model"],
        "source": summary["source"],
        "k": summary["k"],
        **{name: value for name, value in summary.items() if name.startswith(("avg@", "pass@"))},
        "ci95": summary["ci95"],
        "num_problems": summary["num_problems"],
        "tokens": round(sum(p["mean_tokens"] * p["samples"] for p in problems)),
        "generation_s": summary["generation_s"],
        "grading_s": summary["grading_s"],
        "problems": problems,
        "seconds": results["seconds"],
        "config": results["config"],
    }
    write_atomically(config.output.report, json.dumps(report, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    def run(config: EvalConfig) -> int:
        try:
            results = run_eval(config)
        except ConfigError as err:  # found while loading problems or resume logs: one line, no traceback
            print(f"sdzero eval: error: {err}", file=sys.stderr)
            return 2
        for name, summary in results["benchmarks"].items():
            scores = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith(("avg@", "pass@")))
            print(f"sdzero eval: {name}: {summary['num_problems']} problems, {scores}")
        print(f"sdzero eval: results in {config.output_dir / 'results.json'} and results.md")
        return 0

    argv = sys.argv[1:] if argv is None else argv
    return run_config_command("sdzero eval", __doc__.split("\n\n")[0], EvalConfig, run, argv)
