"""``sdzero compare``: train every arm of a comparison from one model, select, evaluate, write results.json.

    sdzero compare --config examples/experiment/compare_smollm2_gym.yaml
    sdzero compare --config ... only=[grpo]          # one arm (the others are left as they are)
    sdzero compare-report outputs/compare/smollm2_gym/results.json

An arm is a list of stages, each an ``sdzero`` command a user would run by hand (``rft``, ``grpo``,
``sdft``, ``srt-collect``, ``sft``, ``distill``, ...) with its recipe and overrides. Strings may name
``{hf}``, ``{mcore}``, ``{family}`` (the starting model), ``{seed}``, ``{max_samples}`` (the shared
sample budget), ``{run}`` (this arm's directory for this seed), ``{shared}`` (a directory shared by
all arms for this seed: SD-Zero's Phase 1 lives there once for both SD-Zero arms) and ``{root}``.

After its stages, an arm is evaluated in one engine start (:func:`evaluate_candidates`): its start
model (step 0) and every checkpoint it saved are scored on the validation benchmark, the best one
(the earliest on a tie) is evaluated on the reported benchmarks, and the per-problem outcomes go to
``<run>/result.json``. The validation benchmark is never a reported number.

Resumable arm by arm: a run whose result.json says ``done`` is not touched again, a stage whose
``done`` file exists is skipped, every stage command resumes by itself, and so does the evaluation
(its logs are per problem). A failed arm is recorded as failed and the next arm runs; the command
exits 1 if any arm failed. ``results.json`` (docs/results.md) is rebuilt from the runs after each arm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from megatron_sdzero.config import ConfigError, load_config, run_config_command, to_dict
from megatron_sdzero.data.formatting import ControlPhrases

RESULT_FILE = "result.json"
RESULTS_FILE = "results.json"
ALGORITHMS = ("base", "rft", "grpo", "sdft", "sdzero")
PLACEHOLDER = re.compile(r"\{(hf|mcore|family|seed|max_samples|run|shared|root)\}")


@dataclass
class StageConfig:
    name: str
    command: list[str]  # an sdzero command and its arguments, e.g. [grpo, --config, X, "k=v"]
    done: str  # a file that exists once the stage has finished
    launcher: Literal["python", "torchrun"] = "python"  # torchrun: one rank per GPU of the node
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError(f"arms.stages.{self.name}.command: empty")


@dataclass
class ArmConfig:
    name: str
    algorithm: Literal["base", "rft", "grpo", "sdft", "sdzero"]
    label: str = ""
    stages: list[StageConfig] = field(default_factory=list)
    start: str = "{mcore}"  # the model at step 0: evaluated as the first candidate
    checkpoints: str | None = None  # the run directory holding the arm's iter_* checkpoints
    metrics: str | None = None  # its metrics.jsonl (samples_generated_total per step)
    budget: str | None = None  # its budget.json (what the arm spent, Phase 1 included)
    # Also measure generation and revision accuracy of every candidate on the validation problems
    # (answer, grade, append P_r, revise, grade): the paper's iterative self-evolution, over training.
    evolution: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"arms: name {self.name!r} must be letters, digits, '_', '.', '-'")
        if self.algorithm != "base" and not self.stages:
            raise ConfigError(f"arms.{self.name}: a {self.algorithm} arm needs stages")
        self.label = self.label or self.name


@dataclass
class StartModel:
    hf: str  # the HF directory every arm starts from (and the base arm is)
    mcore: str  # its Megatron conversion (sdzero convert hf-to-mcore)
    family: str


@dataclass
class CompareEval:
    recipe: str  # an `sdzero eval` recipe listing the validation and the reported benchmarks
    validation: str  # the benchmark that selects checkpoints
    overrides: list[str] = field(default_factory=list)
    phrases: ControlPhrases = field(default_factory=ControlPhrases)  # P_r for evolution (family defaults)
    revision_samples: int = 2  # first answers per validation problem for the evolution measurement


@dataclass
class CompareConfig:
    name: str
    model: StartModel
    eval: CompareEval
    arms: list[ArmConfig]
    max_samples: int  # the generated-sample budget every arm gets (its recipes must use {max_samples})
    seeds: list[int] = field(default_factory=lambda: [0])
    output_dir: str = "outputs/compare"
    reference_arms: list[str] = field(default_factory=lambda: ["base", "sdzero_sync"])
    only: list[str] | None = None  # run only these arms this time
    keep_checkpoints: bool = True  # False: an arm's checkpoints are removed once it is evaluated
    isolate_eval: bool = True  # evaluate in a subprocess (frees the engine's GPU memory for the next arm)
    python: str = sys.executable
    torchrun: list[str] = field(
        default_factory=lambda: ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    )

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"arms: names must be unique, repeated: {repeated}")
        for name in [*(self.only or []), *self.reference_arms]:
            if name not in names:
                raise ConfigError(f"{name!r} names none of the arms {names}")
        if self.max_samples < 1 or not self.seeds:
            raise ConfigError("max_samples must be >= 1 and seeds must list at least one seed")

    @property
    def root(self) -> Path:
        return Path(self.output_dir) / self.name


# --- one run: an arm at one seed ------------------------------------------------------------------


def substitute(text: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def run_values(config: CompareConfig, arm: ArmConfig, seed: int) -> dict[str, str]:
    root = config.root.resolve()
    return {
        "hf": config.model.hf, "mcore": config.model.mcore, "family": config.model.family,
        "seed": str(seed), "max_samples": str(config.max_samples), "root": str(root),
        "run": str(root / arm.name / f"seed{seed}"), "shared": str(root / "shared" / f"seed{seed}"),
    }  # fmt: skip


def run_stage(config: CompareConfig, stage: StageConfig, values: dict[str, str], log: Path) -> float:
    """Run one stage's command (output appended to ``log``); returns its wall seconds."""
    done = Path(substitute(stage.done, values))
    if done.exists():
        print(f"[compare]   {stage.name}: already done ({done})", flush=True)
        return 0.0
    argv = [substitute(a, values) for a in stage.command]
    launcher = [config.python, *config.torchrun] if stage.launcher == "torchrun" else [config.python]
    command = [*launcher, "-m", "megatron_sdzero.cli", *argv]
    env = {**os.environ, **{k: substitute(v, values) for k, v in stage.env.items()}}
    print(f"[compare]   {stage.name}: sdzero {' '.join(argv)}", flush=True)
    began = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        status = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - began
    if stop_requested():
        raise StopRequested(f"stage {stage.name} stopped on request after {seconds:.0f} s")
    if status != 0:
        raise StageFailed(
            f"stage {stage.name} exited with status {status} after {seconds:.0f} s: {_last_line(log)} "
            f"(log: {log})"
        )
    if not done.exists():
        raise StageFailed(f"stage {stage.name} finished but did not write {done}")
    print(f"[compare]   {stage.name}: {seconds:.0f} s", flush=True)
    return seconds


class StageFailed(RuntimeError):
    pass


class StopRequested(RuntimeError):
    """$SDZERO_STOP_FILE exists (Slurm's warning before the time limit): the stage saved and exited."""


def stop_requested() -> bool:
    stop = os.environ.get("SDZERO_STOP_FILE")
    return bool(stop) and Path(stop).exists()


def candidates(arm: ArmConfig, values: dict[str, str]) -> list[tuple[int, str]]:
    """(step, model path): the start model, then every checkpoint the arm kept, oldest first."""
    found = [(0, substitute(arm.start, values))]
    if arm.checkpoints:
        root = Path(substitute(arm.checkpoints, values))
        steps = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit() and p.is_dir())
        found += [(step, str(root / f"iter_{step:07d}")) for step in steps if step > 0]
    return found


def samples_by_step(arm: ArmConfig, values: dict[str, str]) -> tuple[dict[int, int], dict[str, Any]]:
    """Generated samples spent when each step's checkpoint was written, and the arm's budget record."""
    budget: dict[str, Any] = {}
    if arm.budget and Path(substitute(arm.budget, values)).is_file():
        budget = json.loads(Path(substitute(arm.budget, values)).read_text())
    by_step = {0: int(budget.get("prior_samples", 0))}
    if arm.metrics and Path(substitute(arm.metrics, values)).is_file():
        for line in Path(substitute(arm.metrics, values)).read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if "iteration" in row and "samples_generated_total" in row:
                by_step[int(row["iteration"])] = int(row["samples_generated_total"])
    return by_step, budget


def run_arm(config: CompareConfig, arm: ArmConfig, seed: int) -> dict[str, Any]:
    values = run_values(config, arm, seed)
    run_dir = Path(values["run"])
    result_path = run_dir / RESULT_FILE
    previous = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if previous.get("status") == "done":
        print(f"[compare] {arm.name} seed {seed}: done earlier", flush=True)
        return previous
    seconds = float(previous.get("seconds", 0.0))
    print(f"[compare] {arm.name} seed {seed}: {len(arm.stages)} stage(s), then evaluation", flush=True)
    record: dict[str, Any] = {"seed": seed, "status": "pending"}
    try:
        for stage in arm.stages:
            seconds += run_stage(config, stage, values, run_dir / "stages.log")
            _write_json(result_path, {**record, "seconds": seconds})
        began = time.perf_counter()
        evaluation = evaluate_arm(config, arm, values, run_dir)
        seconds += time.perf_counter() - began
    except (StageFailed, ConfigError) as err:
        print(f"[compare] {arm.name} seed {seed}: FAILED: {err}", file=sys.stderr, flush=True)
        record = {**record, "status": "failed", "error": str(err), "seconds": seconds}
        _write_json(result_path, record)
        return record
    by_step, budget = samples_by_step(arm, values)
    total = int(budget.get("total_samples", 0))
    curve = [
        {"step": step, "samples": by_step.get(step, total), "validation": score}
        for step, score in evaluation["curve"]
    ]
    selected_step = evaluation["selected"]["step"]
    record = {
        **record, "status": "done", "samples_used": total, "seconds": round(seconds, 1),
        "questions_digest": budget.get("questions_digest"),
        "selected": {**evaluation["selected"], "validation": next(
            c["validation"] for c in curve if c["step"] == selected_step)},
        "curve": curve, "benchmarks": evaluation["benchmarks"],
    }  # fmt: skip
    if evaluation.get("evolution"):
        record["evolution"] = [
            {**point, "samples": by_step.get(point["step"], total)} for point in evaluation["evolution"]
        ]
    _write_json(result_path, record)
    if not config.keep_checkpoints and arm.checkpoints:
        for _, path in candidates(arm, values)[1:]:
            shutil.rmtree(path, ignore_errors=True)
    print(
        f"[compare] {arm.name} seed {seed}: selected step {selected_step} "
        f"(validation {record['selected']['validation']:.4f}), {total} samples, {seconds:.0f} s",
        flush=True,
    )
    return record


def evaluate_arm(
    config: CompareConfig, arm: ArmConfig, values: dict[str, str], run_dir: Path
) -> dict[str, Any]:
    spec = {
        "recipe": config.eval.recipe, "overrides": config.eval.overrides,
        "validation": config.eval.validation, "family": config.model.family,
        "candidates": candidates(arm, values), "output_dir": str(run_dir / "eval"),
        "evolution": arm.evolution, "phrases": to_dict(config.eval.phrases),
        "revision_samples": config.eval.revision_samples,
    }  # fmt: skip
    if not config.isolate_eval:
        return evaluate_candidates(spec)
    spec_path, out_path = run_dir / "eval_spec.json", run_dir / "eval" / "evaluation.json"
    _write_json(spec_path, spec)
    log = run_dir / "stages.log"
    start = log.stat().st_size if log.exists() else 0
    with log.open("a") as out:
        status = subprocess.run(
            [config.python, "-m", "megatron_sdzero.experiment.compare", str(spec_path)],
            stdout=out, stderr=subprocess.STDOUT,
        ).returncode  # fmt: skip
    with log.open("rb") as written:  # the evaluation's own progress lines, on the console too
        written.seek(start)
        for line in written.read().decode(errors="replace").splitlines():
            if line.startswith("[compare]"):
                print(line, flush=True)
    if status != 0:
        raise StageFailed(f"evaluation exited with status {status}: {_last_line(log)} (log: {log})")
    return json.loads(out_path.read_text())


def _last_line(log: Path) -> str:
    return next((line.strip() for line in reversed(log.read_text().splitlines()) if line.strip()), "")[:300]


# --- evaluation: validation on every candidate, the reported benchmarks on the best ---------------


def evaluate_candidates(spec: dict[str, Any]) -> dict[str, Any]:
    """Score every candidate on the validation benchmark with one engine, then the best one on the rest."""
    from megatron_sdzero.eval.run import EvalConfig, EvalOutput, exported_hf_dir, run_eval
    from megatron_sdzero.rollout.base import ModelSource, build_engine

    base = load_config(EvalConfig, spec["recipe"], spec["overrides"])
    validation = spec["validation"]
    check = [b for b in base.suite if b.name == validation]
    reported = [b for b in base.suite if b.name != validation]
    if not check or not reported:
        raise ConfigError(
            f"{spec['recipe']}: needs the validation benchmark {validation!r} and at least one other"
        )
    out = Path(spec["output_dir"])
    engine, exports = None, []

    def evaluate(step: int, path: str, benchmarks: list, where: Path) -> dict[str, Any]:
        nonlocal engine
        hf = exported_hf_dir(Path(path), out / "hf" / f"step_{step:07d}")
        if hf != Path(path):
            exports.append(hf)
        if engine is None:
            engine = build_engine(ModelSource(hf, spec["family"]), base.rollout)
        else:
            engine.reload(hf)
        model = ModelSource(path, spec["family"])
        output = EvalOutput(dir=where)
        config = replace(base, model=model, benchmarks=benchmarks, validation=None, output=output)
        return run_eval(config, engine=engine)["benchmarks"]

    try:
        curve, evolution = [], []
        for step, path in spec["candidates"]:
            summary = evaluate(step, path, check, out / f"step_{step:07d}")[validation]
            curve.append((step, summary[f"avg@{summary['k']}"]))
            print(f"[compare]   validation at step {step}: {curve[-1][1]:.4f}", flush=True)
            if spec.get("evolution"):
                evolution.append({"step": step, **self_revision(engine, base, check[0], spec)})
                print(f"[compare]   evolution at step {step}: {evolution[-1]}", flush=True)
        best_step, _ = max(curve, key=lambda c: (c[1], -c[0]))  # the earliest of the best
        best_path = dict((s, p) for s, p in spec["candidates"])[best_step]
        evaluate(best_step, best_path, reported, out / "selected")
    finally:
        if engine is not None:
            engine.close()
        for export in exports:
            shutil.rmtree(export, ignore_errors=True)
    result = {
        "curve": curve,
        "evolution": evolution,
        "selected": {"checkpoint": best_path, "step": best_step},
        "benchmarks": {b.name: outcomes(out / "selected" / f"{b.name}.jsonl") for b in reported},
    }
    _write_json(out / "evaluation.json", result)
    return result


def self_revision(engine: Any, base: Any, benchmark: Any, spec: dict[str, Any]) -> dict[str, float]:
    """Generation and revision accuracy of the engine's weights on the validation problems: Phase 1's
    collection (every first answer revised, with the phrase its grade selects), counted, not kept."""
    from megatron_sdzero.data.formatting import ChatFormat, resolve_phrases
    from megatron_sdzero.data.problems import load_problems
    from megatron_sdzero.rewards import RewardConfig, build_reward
    from megatron_sdzero.srt.collector import CollectConfig, Collector

    problems, _ = load_problems(benchmark.problems)
    phrases = resolve_phrases(spec["family"], ControlPhrases(**spec["phrases"]))
    collect = CollectConfig(
        num_responses=spec["revision_samples"], num_revisions=1, revise_correct=True, progress=False
    )
    sampling = benchmark.sampling_params(base.sampling)
    reward = RewardConfig(mode=benchmark.mode, math=base.reward.math, code=base.reward.code)
    with build_reward(reward) as grader:
        collector = Collector(
            engine, grader, ChatFormat(engine.tokenizer), phrases, sampling, collect, base.prompt,
            max_model_len=base.rollout.max_model_len,
        )  # fmt: skip
        counters = collector.run_batch(problems).counters
    return {"generation": counters.init_accuracy, "revision": counters.revised_accuracy}


def outcomes(log: Path) -> dict[str, Any]:
    """A benchmark's per-problem, per-sample 0/1 from its eval resume log."""
    rows = [json.loads(line) for line in log.read_text().splitlines()[1:] if line.strip()]
    ks = {len(r["outcomes"]) for r in rows}
    if len(ks) != 1:
        raise ConfigError(f"{log}: problems have different sample counts {sorted(ks)}")
    return {"k": ks.pop(), "ids": [r["id"] for r in rows], "outcomes": [r["outcomes"] for r in rows]}


# --- the whole comparison ---------------------------------------------------------------------------


def results(config: CompareConfig) -> dict[str, Any]:
    """results.json (schema: docs/results.md) from every run's result.json."""
    from megatron_sdzero.eval.run import EvalConfig

    eval_config = load_config(EvalConfig, config.eval.recipe, config.eval.overrides)
    arms = {}
    for arm in config.arms:
        runs = []
        for seed in config.seeds:
            path = Path(run_values(config, arm, seed)["run"]) / RESULT_FILE
            pending = {"seed": seed, "status": "pending"}
            runs.append(json.loads(path.read_text()) if path.is_file() else pending)
        arms[arm.name] = {"algorithm": arm.algorithm, "label": arm.label, "runs": runs}
    reported = [b for b in eval_config.suite if b.name != config.eval.validation]
    return {
        "version": 1, "name": config.name, "model": config.model.hf,
        "budget": {"max_samples": config.max_samples}, "validation": config.eval.validation,
        "benchmarks": {
            b.name: {"k": b.options(eval_config.eval).k, "description": _describe(b)} for b in reported
        },
        "reference_arms": config.reference_arms, "arms": arms, "config": to_dict(config),
    }  # fmt: skip


def _describe(benchmark: Any) -> str:
    source = to_dict(benchmark.problems)
    return json.dumps({k: v for k, v in source.items() if v not in (None, {}, [])}, sort_keys=True)


def run_compare(config: CompareConfig) -> int:
    config.root.mkdir(parents=True, exist_ok=True)
    _write_json(config.root / "compare_config.json", to_dict(config))
    chosen = [a for a in config.arms if config.only is None or a.name in config.only]
    failed = []
    for arm in chosen:
        for seed in config.seeds:
            try:
                if run_arm(config, arm, seed)["status"] != "done":
                    failed.append(f"{arm.name}/seed{seed}")
            except StopRequested as err:
                print(f"[compare] {arm.name} seed {seed}: {err}; rerun to continue", flush=True)
                return 0
            finally:
                _write_json(config.root / RESULTS_FILE, results(config))
    digests = {
        run.get("questions_digest")
        for arm in results(config)["arms"].values() for run in arm["runs"] if run.get("questions_digest")
    }  # fmt: skip
    if len(digests) > 1:
        print(f"[compare] warning: the arms trained on different question sets {sorted(digests)}", flush=True)
    where = config.root / RESULTS_FILE
    print(f"[compare] results in {where}; render: sdzero compare-report {where}", flush=True)
    if failed:
        print(f"[compare] failed: {', '.join(failed)} (rerun to retry them)", file=sys.stderr)
        return 1
    return 0


def _write_json(path: Path, value: Any) -> None:
    from megatron_sdzero.eval.report import write_atomically

    write_atomically(path, json.dumps(value, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_config_command("sdzero compare", __doc__.split("\n\n")[0], CompareConfig, run_compare, argv)


if __name__ == "__main__":  # the isolated evaluation of one run: python -m ... SPEC.json
    evaluate_candidates(json.loads(Path(sys.argv[1]).read_text()))
