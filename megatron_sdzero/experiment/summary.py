"""``sdzero compare-report RESULTS_JSON``: the table and plots of a ``sdzero compare`` run.

    sdzero compare-report outputs/compare/smollm2/results.json     # -> summary.md, *.png beside it

From ``results.json`` (schema version 1, written by ``sdzero compare``): per arm and benchmark avg@k
and pass@k with 95 % bootstrap intervals over problems; every arm against each reference arm as a
paired difference (the same problems resampled for both arms); GPU minutes per arm; the goal check
(SD-Zero at least +10 % relative avg@k over base and above RFT, GRPO and SDFT, each paired interval
excluding 0), answered yes or no per benchmark. With several training seeds a problem's score is the
mean over the seeds that finished, so the interval still resamples problems. Writes ``summary.md``,
``accuracy.png``, ``samples.png`` and ``evolution.png`` (the last two only when the runs recorded the
curves) and prints the tables. docs/results.md says what each number means.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_sdzero.errors import UserError, run_reporting_user_errors
from megatron_sdzero.eval.metrics import avg_at_k, bootstrap_interval, paired_bootstrap, pass_at_k

SCHEMA_VERSION = 1
ALGORITHMS = ("base", "rft", "grpo", "sdft", "sdzero")
BASELINES = ("rft", "grpo", "sdft")  # SD-Zero must beat each of these for the goal
STATUSES = ("done", "failed", "pending")
GOAL_RELATIVE_GAIN = 10.0  # percent of base's avg@k
METRICS = ("avg", "pass")  # per-problem avg@k and pass@k
SUMMARY_FILE = "summary.md"
LINESTYLES = ("-", "--", ":", "-.")  # one per training seed of an arm


class SummaryError(UserError):
    """results.json cannot be summarised."""


# --- results.json ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    k: int
    description: str


@dataclass(frozen=True)
class BenchmarkOutcomes:
    """One run's samples on one benchmark: ``outcomes[i]`` are problem ``ids[i]``'s k graded samples."""

    k: int
    ids: list[str]
    outcomes: list[list[int]]


@dataclass(frozen=True)
class Run:
    seed: int
    status: str
    samples_used: int | None
    seconds: float | None
    selected: dict[str, Any]
    curve: list[dict[str, float]]
    evolution: list[dict[str, float]]
    benchmarks: dict[str, BenchmarkOutcomes]


@dataclass(frozen=True)
class Arm:
    name: str
    algorithm: str
    label: str
    runs: list[Run]

    @property
    def done(self) -> list[Run]:
        return [run for run in self.runs if run.status == "done"]

    def status_counts(self) -> str:
        counts = [(s, sum(run.status == s for run in self.runs)) for s in STATUSES]
        return ", ".join(f"{n} {s}" for s, n in counts if n) or "no runs"


@dataclass(frozen=True)
class Results:
    name: str
    model: str
    max_samples: int
    validation: str | None
    benchmarks: dict[str, BenchmarkSpec]
    reference_arms: list[str]
    arms: dict[str, Arm]
    localization: Mapping[str, Any] | None = None


NUMBER = (int, float)


def _get(obj: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], where: str = "") -> Any:
    """``obj[key]``, checked to be of ``kinds`` (a bool is never taken for a number); ``where`` is the
    object's path in the file ("" for the top level)."""
    if key not in obj:
        raise SummaryError(f"results.json: {where or 'the top level'} has no {key!r}")
    value = obj[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    number_wanted = any(k in (int, float) for k in kinds)
    if not isinstance(value, kinds) or (isinstance(value, bool) and number_wanted and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        path = f"{where}.{key}" if where else key
        raise SummaryError(f"results.json: {path} must be {names}, got {json.dumps(value)[:60]}")
    return value


def _points(raw: Any, keys: Sequence[str], where: str) -> list[dict[str, float]]:
    if not isinstance(raw, list):
        raise SummaryError(f"results.json: {where} must be a list")
    points = []
    for i, point in enumerate(raw):
        if not isinstance(point, dict):
            raise SummaryError(f"results.json: {where}[{i}] must be an object")
        points.append({key: float(_get(point, key, NUMBER, f"{where}[{i}]")) for key in keys})
    return points


def _outcomes(raw: Any, k: int, where: str) -> BenchmarkOutcomes:
    if not isinstance(raw, dict):
        raise SummaryError(f"results.json: {where} must be an object")
    run_k = _get(raw, "k", int, where)
    if run_k != k:
        raise SummaryError(f"results.json: {where} was sampled with k={run_k}, the benchmark says k={k}")
    ids = _get(raw, "ids", list, where)
    outcomes = _get(raw, "outcomes", list, where)
    if len(ids) != len(outcomes) or not ids:
        raise SummaryError(
            f"results.json: {where} needs one outcomes row per id, got {len(ids)} ids, {len(outcomes)} rows"
        )
    if len(set(map(str, ids))) != len(ids):
        raise SummaryError(f"results.json: {where}.ids holds a problem id twice")
    for i, row in enumerate(outcomes):
        if not isinstance(row, list) or len(row) != k or any(v not in (0, 1) for v in row):
            raise SummaryError(f"results.json: {where}.outcomes[{i}] must be {k} values, each 0 or 1")
    return BenchmarkOutcomes(k, [str(i) for i in ids], [[int(v) for v in row] for row in outcomes])


def _run(raw: Any, benchmarks: Mapping[str, BenchmarkSpec], where: str) -> Run:
    """One run; a failed or pending run needs only its seed and status (it is not scored)."""
    if not isinstance(raw, dict):
        raise SummaryError(f"results.json: {where} must be an object")
    seed = _get(raw, "seed", int, where)
    status = _get(raw, "status", str, where)
    if status not in STATUSES:
        raise SummaryError(
            f"results.json: {where}.status must be one of {', '.join(STATUSES)}, got {status!r}"
        )
    done = status == "done"
    optional = {key: key in raw or done for key in ("samples_used", "seconds", "selected", "curve")}
    samples = _get(raw, "samples_used", int, where) if optional["samples_used"] else None
    seconds = float(_get(raw, "seconds", NUMBER, where)) if optional["seconds"] else None
    selected: dict[str, Any] = {}
    if optional["selected"]:
        raw_selected = _get(raw, "selected", dict, where)
        for key, kinds in (
            ("checkpoint", (str, type(None))),
            ("step", (int, type(None))),
            ("validation", (*NUMBER, type(None))),
        ):
            selected[key] = _get(raw_selected, key, kinds, f"{where}.selected")
    curve = (
        _points(raw["curve"], ("step", "samples", "validation"), f"{where}.curve")
        if optional["curve"]
        else []
    )
    evolution_keys = ("step", "samples", "generation", "revision")
    evolution = _points(raw["evolution"], evolution_keys, f"{where}.evolution") if "evolution" in raw else []
    outcomes: dict[str, BenchmarkOutcomes] = {}
    if done:
        raw_benchmarks = _get(raw, "benchmarks", dict, where)
        for name, spec in benchmarks.items():
            if name not in raw_benchmarks:
                raise SummaryError(f"results.json: {where} (done) has no outcomes for benchmark {name!r}")
            outcomes[name] = _outcomes(raw_benchmarks[name], spec.k, f"{where}.benchmarks.{name}")
    return Run(seed, status, samples, seconds, selected, curve, evolution, outcomes)


def parse_results(data: Any) -> Results:
    """Check a parsed results.json against schema version 1; any violation is one-line SummaryError."""
    if not isinstance(data, dict):
        raise SummaryError("results.json: the top level must be an object")
    version = _get(data, "version", int)
    if version != SCHEMA_VERSION:
        raise SummaryError(
            f"results.json: schema version {version} is not supported (this tool reads {SCHEMA_VERSION})"
        )
    validation = _get(data, "validation", (str, type(None)))
    benchmarks: dict[str, BenchmarkSpec] = {}
    for name, raw in _get(data, "benchmarks", dict).items():
        where = f"benchmarks.{name}"
        if not isinstance(raw, dict):
            raise SummaryError(f"results.json: {where} must be an object")
        k = _get(raw, "k", int, where)
        if k < 1:
            raise SummaryError(f"results.json: {where}.k must be at least 1, got {k}")
        benchmarks[name] = BenchmarkSpec(name, k, _get(raw, "description", str, where))
    if not benchmarks:
        raise SummaryError("results.json: benchmarks is empty; there is nothing to report")
    if validation in benchmarks:
        raise SummaryError(
            f"results.json: the validation benchmark {validation!r} selected checkpoints; "
            "it cannot also be a reported benchmark"
        )
    arms: dict[str, Arm] = {}
    for name, raw in _get(data, "arms", dict).items():
        where = f"arms.{name}"
        if not isinstance(raw, dict):
            raise SummaryError(f"results.json: {where} must be an object")
        algorithm = _get(raw, "algorithm", str, where)
        if algorithm not in ALGORITHMS:
            raise SummaryError(
                f"results.json: {where}.algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}"
            )
        runs = [
            _run(r, benchmarks, f"{where}.runs[{i}]") for i, r in enumerate(_get(raw, "runs", list, where))
        ]
        arms[name] = Arm(name, algorithm, _get(raw, "label", str, where), runs)
    references = _get(data, "reference_arms", list)
    for ref in references:
        if ref not in arms:
            raise SummaryError(
                f"results.json: reference arm {ref!r} is not among the arms ({', '.join(arms)})"
            )
    localization = data.get("localization")
    return Results(
        name=_get(data, "name", str),
        model=_get(data, "model", str),
        max_samples=_get(_get(data, "budget", dict), "max_samples", int, "budget"),
        validation=validation,
        benchmarks=benchmarks,
        reference_arms=[str(ref) for ref in references],
        arms=arms,
        localization=localization if isinstance(localization, dict) else None,
    )


def load_results(path: Path) -> Results:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SummaryError(f"{path} is not JSON ({' '.join(str(err).split())})") from None
    return parse_results(data)


# --- scores ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    mean: float
    ci: tuple[float, float]


@dataclass(frozen=True)
class ArmScore:
    """One arm on one benchmark: per-problem scores (mean over its done seeds) in a shared id order."""

    arm: str
    seeds: int
    per_problem: dict[str, np.ndarray]  # "avg" / "pass" -> one value per problem
    scores: dict[str, Score]


@dataclass(frozen=True)
class Difference:
    """``arm - reference`` of one metric, paired over problems."""

    arm: str
    reference: str
    metric: str
    mean: float
    ci: tuple[float, float]
    relative: float | None  # percent of the reference's mean; None when that mean is 0

    @property
    def excludes_zero(self) -> bool:
        return self.ci[0] > 0 or self.ci[1] < 0


def problem_order(results: Results, benchmark: str) -> list[str]:
    """The problem ids of ``benchmark``, in the order of the first done run; every done run of every
    arm must hold the same set (they are reordered to this order), else a one-line error."""
    order: list[str] | None = None
    first = ""
    for arm in results.arms.values():
        for run in arm.done:
            ids = run.benchmarks[benchmark].ids
            here = f"arm {arm.name!r} seed {run.seed}"
            if order is None:
                order, first = ids, here
            elif set(ids) != set(order):
                missing, extra = set(order) - set(ids), set(ids) - set(order)
                example = sorted(missing or extra)[0]
                raise SummaryError(
                    f"results.json: benchmark {benchmark!r}: {here} holds other problems than {first} "
                    f"({len(missing)} missing, {len(extra)} extra, e.g. {example!r})"
                )
    return order or []


def run_problem_scores(outcomes: BenchmarkOutcomes, order: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-problem avg@k and pass@k of one run, in ``order``."""
    row_of = dict(zip(outcomes.ids, outcomes.outcomes, strict=True))
    k = outcomes.k  # every problem holds exactly k samples (checked on load)
    correct = [sum(row_of[i]) for i in order]
    return {
        "avg": np.array([avg_at_k(k, c) for c in correct]),
        "pass": np.array([pass_at_k(k, c, k) for c in correct]),
    }


def score_arm(arm: Arm, benchmark: str, order: Sequence[str], seed: int = 0) -> ArmScore | None:
    """The arm's per-problem means over its done seeds and their bootstrap intervals; None if none is done."""
    runs = arm.done
    if not runs:
        return None
    per_seed = [run_problem_scores(run.benchmarks[benchmark], order) for run in runs]
    per_problem = {m: np.mean([scores[m] for scores in per_seed], axis=0) for m in METRICS}
    scores = {
        m: Score(float(values.mean()), bootstrap_interval(values.tolist(), seed=seed))
        for m, values in per_problem.items()
    }
    return ArmScore(arm.name, len(runs), per_problem, scores)


def paired_difference(arm: ArmScore, reference: ArmScore, metric: str, seed: int = 0) -> Difference:
    a, b = arm.per_problem[metric], reference.per_problem[metric]
    mean = float((a - b).mean())
    ref_mean = float(b.mean())
    relative = 100 * mean / ref_mean if ref_mean != 0 else None
    ci = paired_bootstrap(a.tolist(), b.tolist(), seed=seed)
    return Difference(arm.arm, reference.arm, metric, mean, ci, relative)


@dataclass(frozen=True)
class Goal:
    """The goal on one benchmark: met or not, and each criterion with its numbers."""

    benchmark: str
    met: bool
    reasons: list[str]


@dataclass
class Summary:
    results: Results
    scores: dict[str, dict[str, ArmScore]] = field(default_factory=dict)  # benchmark -> arm -> score
    differences: dict[tuple[str, str, str, str], Difference] = field(
        default_factory=dict
    )  # (bench, arm, ref, metric)
    goals: list[Goal] = field(default_factory=list)

    @property
    def missing(self) -> list[Arm]:
        return [arm for arm in self.results.arms.values() if not arm.done]

    def difference(self, benchmark: str, arm: str, reference: str, metric: str = "avg") -> Difference | None:
        return self.differences.get((benchmark, arm, reference, metric))


def summarise(results: Results) -> Summary:
    summary = Summary(results)
    for benchmark in results.benchmarks:
        order = problem_order(results, benchmark)
        scored = {name: score_arm(arm, benchmark, order) for name, arm in results.arms.items()}
        summary.scores[benchmark] = {name: score for name, score in scored.items() if score is not None}
        for ref in results.reference_arms:
            ref_score = summary.scores[benchmark].get(ref)
            if ref_score is None:
                continue
            for name, score in summary.scores[benchmark].items():
                if name == ref:
                    continue
                for metric in METRICS:
                    summary.differences[benchmark, name, ref, metric] = paired_difference(
                        score, ref_score, metric
                    )
    summary.goals = [goal_check(summary, benchmark) for benchmark in results.benchmarks]
    return summary


def goal_check(summary: Summary, benchmark: str) -> Goal:
    """SD-Zero (reference_arms[1]) vs base (reference_arms[0]): at least +GOAL_RELATIVE_GAIN % relative
    avg@k with the paired interval above 0; vs every RFT, GRPO and SDFT arm: the paired interval above 0."""
    results = summary.results
    if len(results.reference_arms) < 2:
        return Goal(benchmark, False, ["reference_arms names no SD-Zero arm (needs [base, sdzero])"])
    base, sdzero = results.reference_arms[:2]
    if results.arms[sdzero].algorithm != "sdzero":
        kind = results.arms[sdzero].algorithm
        return Goal(benchmark, False, [f"reference arm {sdzero!r} is a {kind} arm, not SD-Zero"])
    scores = summary.scores[benchmark]
    if sdzero not in scores:
        return Goal(benchmark, False, [f"SD-Zero arm {sdzero!r} has no done run"])
    met, reasons = True, []
    if base not in scores:
        met = False
        reasons.append(f"base arm {base!r} has no done run")
    else:
        diff = summary.difference(benchmark, sdzero, base)
        assert diff is not None
        gain_ok = diff.relative is not None and diff.relative >= GOAL_RELATIVE_GAIN
        above = diff.ci[0] > 0
        met &= gain_ok and above
        relative = "undefined (base avg@k is 0)" if diff.relative is None else f"{diff.relative:+.1f} %"
        reasons.append(
            f"vs {base}: relative {relative} ({'meets' if gain_ok else 'below'} +{GOAL_RELATIVE_GAIN:g} %), "
            + _above_zero(diff)
        )
    for algorithm in BASELINES:
        arms = [arm for arm in results.arms.values() if arm.algorithm == algorithm]
        if not any(arm.name in scores for arm in arms):
            met = False
            reasons.append(f"no done {algorithm} run to compare with")
        for arm in arms:
            if arm.name not in scores or arm.name == sdzero:
                continue
            diff = _reverse(summary, benchmark, sdzero, arm.name)
            above = diff.ci[0] > 0
            met &= above
            reasons.append(f"vs {arm.name}: " + _above_zero(diff))
    return Goal(benchmark, met, reasons)


def _above_zero(diff: Difference) -> str:
    verdict = "above 0" if diff.ci[0] > 0 else "interval does not lie above 0"
    return f"Δ {_pp(diff.mean)} {_interval(diff.ci)} ({verdict})"


def _reverse(summary: Summary, benchmark: str, sdzero: str, other: str) -> Difference:
    """SD-Zero minus ``other`` (summarise computes every arm minus each reference)."""
    diff = summary.difference(benchmark, other, sdzero)
    assert diff is not None
    return Difference(sdzero, other, diff.metric, 0.0 - diff.mean, (0.0 - diff.ci[1], 0.0 - diff.ci[0]), None)


# --- markdown ----------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _pp(value: float) -> str:
    return f"{100 * value:+.1f} pp"


def _interval(ci: tuple[float, float], signed: bool = True) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return "[" + ", ".join(fmt.format(100 * v) for v in ci) + "]"


def _score_cell(score: Score) -> str:
    return f"{_pct(score.mean)} {_interval(score.ci, signed=False)}"


def _difference_cell(diff: Difference | None) -> str:
    if diff is None:
        return "—"
    relative = "" if diff.relative is None else f", {diff.relative:+.1f} %"
    return f"{_pp(diff.mean)} {_interval(diff.ci)}{relative}{' *' if diff.excludes_zero else ''}"


def _samples_cell(arm: Arm, budget: int) -> str:
    used = sorted({run.samples_used for run in arm.done if run.samples_used is not None})
    if not used:
        return "—"
    cell = f"{used[0]:,}" if len(used) == 1 else f"{used[0]:,}–{used[-1]:,}"
    return cell + (f" (over budget {budget:,})" if used[-1] > budget else "")


def _seeds_cell(arm: Arm) -> str:
    failed = sum(run.status == "failed" for run in arm.runs)
    return f"{len(arm.done)}" + (f" ({failed} failed)" if failed else "")


def benchmark_table(summary: Summary, benchmark: str) -> list[str]:
    results = summary.results
    k = results.benchmarks[benchmark].k
    refs = [results.arms[ref] for ref in results.reference_arms]
    header = ["arm", "seeds", "samples used", f"avg@{k} [95% CI]", f"pass@{k} [95% CI]"]
    header += [f"Δ avg@{k} vs {ref.label} [CI]" for ref in refs]
    header += [f"Δ pass@{k} vs {ref.label} [CI]" for ref in refs]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|" + "---:|" * (len(header) - 3)]
    for name, score in summary.scores[benchmark].items():
        arm = results.arms[name]
        cells = [arm.label, _seeds_cell(arm), _samples_cell(arm, results.max_samples)]
        cells += [_score_cell(score.scores["avg"]), _score_cell(score.scores["pass"])]
        for metric in METRICS:
            cells += [_difference_cell(summary.difference(benchmark, name, ref.name, metric)) for ref in refs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _missing_line(summary: Summary) -> list[str]:
    if not summary.missing:
        return []
    listed = ", ".join(f"{arm.label} ({arm.status_counts()})" for arm in summary.missing)
    return ["", f"Missing (no done run, not scored): {listed}."]


def gpu_table(results: Results) -> list[str]:
    lines = ["| arm | runs | GPU minutes (all runs) | per done run |", "|---|---|---:|---:|"]
    for arm in results.arms.values():
        spent = [run.seconds for run in arm.runs if run.seconds is not None]
        done = [run.seconds for run in arm.done if run.seconds is not None]
        total = f"{sum(spent) / 60:.1f}" if spent else "—"
        per_run = f"{sum(done) / 60 / len(done):.1f}" if done else "—"
        lines.append(f"| {arm.label} | {arm.status_counts()} | {total} | {per_run} |")
    return lines


def selection_table(results: Results) -> list[str]:
    lines = ["| arm | seed | step | checkpoint | validation |", "|---|---:|---:|---|---:|"]
    for arm in results.arms.values():
        for run in arm.done:
            sel = run.selected
            value = "—" if sel.get("validation") is None else _pct(sel["validation"])
            step = "—" if sel.get("step") is None else str(sel["step"])
            lines.append(f"| {arm.label} | {run.seed} | {step} | {sel.get('checkpoint') or '—'} | {value} |")
    return lines


def goal_lines(summary: Summary) -> list[str]:
    results = summary.results
    if len(results.reference_arms) < 2:
        return [
            "Overall: **no**: reference_arms does not name the base arm and the SD-Zero arm (in that order)."
        ]
    base, sdzero = results.reference_arms[:2]
    lines = [
        f"Goal: SD-Zero (`{sdzero}`) at least +{GOAL_RELATIVE_GAIN:g} % relative avg@k over `{base}` "
        f"and above every {', '.join(BASELINES)} arm, each paired 95 % interval of the difference above 0.",
        "",
    ]
    for goal in summary.goals:
        lines.append(
            f"- {goal.benchmark}: **{'yes' if goal.met else 'no'}**. " + "; ".join(goal.reasons) + "."
        )
    met = sum(goal.met for goal in summary.goals)
    overall = "yes" if met == len(summary.goals) else "no"
    lines += ["", f"Overall: **{overall}** (met on {met} of {len(summary.goals)} benchmarks)."]
    return lines


def _headline(group: Mapping[str, Any], metric: str) -> tuple[float | None, Any]:
    """A localization headline number and its interval, from any of the shapes it may be written in."""
    raw = group.get(metric)
    ci = None
    if isinstance(raw, dict):
        ci = raw.get("ci95")
        raw = next((raw[key] for key in ("mean", "value", "share") if key in raw), None)
    intervals = group.get("ci95")
    if ci is None and isinstance(intervals, dict):
        ci = intervals.get(metric)
    if ci is None:
        ci = group.get(f"{metric}_ci95")
    value = float(raw) if isinstance(raw, NUMBER) and not isinstance(raw, bool) else None
    valid_ci = isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, NUMBER) for v in ci)
    return value, (tuple(float(v) for v in ci) if valid_ci else None)


def localization_lines(localization: Mapping[str, Any] | None) -> list[str]:
    """Headline shares of the self-localization analysis, as far as results.json holds them."""
    if not localization:
        return []
    rows = []
    for group in ("wrong", "correct"):
        if not isinstance(localization.get(group), dict):
            continue
        cells = []
        for metric in ("divergence_share", "token_share"):
            value, ci = _headline(localization[group], metric)
            cells.append(
                "—" if value is None else _pct(value) + (f" {_interval(ci, signed=False)}" if ci else "")
            )
        if any(cell != "—" for cell in cells):
            rows.append(f"| {group} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "## Token-level self-localization",
        "",
        "Share of each sequence's teacher-student divergence on the tokens that differ from a verified "
        "revision, against their share of the tokens (percent; correct answers are the control).",
        "",
        "| answers | divergence share [95% CI] | token share [95% CI] |",
        "|---|---:|---:|",
        *rows,
        "",
    ]


def render_markdown(summary: Summary, pngs: Sequence[Path] = ()) -> str:
    results = summary.results
    lines = [
        f"# {results.name}",
        "",
        f"Model `{results.model}`, budget {results.max_samples:,} generated samples per arm. "
        "Scores in percent; [95 % bootstrap interval over problems]; a problem's score is the mean "
        "over the arm's done seeds. "
        "Δ: paired difference in percentage points [95 % paired bootstrap interval], relative change in % "
        "of the reference's mean; * marks an interval that excludes 0.",
    ]
    if results.validation:
        lines.append(f"Checkpoints were selected on `{results.validation}`, which is not reported here.")
    for name, spec in results.benchmarks.items():
        problems = next((len(s.per_problem["avg"]) for s in summary.scores[name].values()), 0)
        lines += ["", f"## {name} ({problems} problems, k = {spec.k})", ""]
        if spec.description:
            lines += [spec.description, ""]
        lines += benchmark_table(summary, name)
    lines += _missing_line(summary)
    lines += ["", "## GPU minutes per arm", "", "Wall time of the arm's stages on the machine.", ""]
    lines += gpu_table(results)
    if any(arm.done for arm in results.arms.values()):
        lines += ["", f"## Checkpoint selection ({results.validation or 'no validation set'})", ""]
        lines += selection_table(results)
    lines += ["", "## Goal check", ""] + goal_lines(summary) + [""]
    lines += localization_lines(results.localization)
    if pngs:
        lines += ["## Plots", ""] + [f"![{png.stem}]({png.name})" for png in pngs] + [""]
    return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------------------


def _colors(results: Results) -> dict[str, Any]:
    from megatron_sdzero.report import _pyplot

    cmap = _pyplot().get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(results.arms)}


def accuracy_plot(summary: Summary, path: Path) -> Path:
    """avg@k per arm with its 95 % interval, one panel per benchmark."""
    from megatron_sdzero.report import _pyplot, save_figure

    plt = _pyplot()
    results, colors = summary.results, _colors(summary.results)
    fig, axes = plt.subplots(
        1, len(results.benchmarks), figsize=(4.5 * len(results.benchmarks), 4.5), squeeze=False
    )
    for ax, (name, spec) in zip(axes[0], results.benchmarks.items(), strict=True):
        scored = summary.scores[name]
        labels = [results.arms[arm].label for arm in scored]
        means = [100 * s.scores["avg"].mean for s in scored.values()]
        errors = [
            [100 * (s.scores["avg"].mean - s.scores["avg"].ci[0]) for s in scored.values()],
            [100 * (s.scores["avg"].ci[1] - s.scores["avg"].mean) for s in scored.values()],
        ]
        ax.bar(range(len(means)), means, yerr=errors, capsize=4, color=[colors[arm] for arm in scored])
        ax.set_xticks(range(len(means)), labels, rotation=30, ha="right")
        ax.set(title=name, ylabel=f"avg@{spec.k} (%)")
        ax.grid(axis="y", alpha=0.3)
    if summary.missing:
        fig.text(0.01, 0.01, "missing: " + ", ".join(arm.label for arm in summary.missing), fontsize=8)
    return save_figure(fig, path)


def samples_plot(summary: Summary, path: Path) -> Path | None:
    """Validation accuracy over generated samples used, one line per done run; None without curves."""
    results = summary.results
    runs = [(arm, run) for arm in results.arms.values() for run in arm.done if run.curve]
    if not runs:
        return None
    from megatron_sdzero.report import _pyplot, save_figure

    plt, colors = _pyplot(), _colors(results)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    seen: dict[str, int] = {}  # arm -> runs drawn so far: the first is labelled, each seed has its style
    for arm, run in runs:
        number = seen.get(arm.name, 0)
        seen[arm.name] = number + 1
        label = arm.label if number == 0 else None
        xs = [p["samples"] for p in run.curve]
        ys = [100 * p["validation"] for p in run.curve]
        style = LINESTYLES[number % len(LINESTYLES)]
        ax.plot(
            xs, ys, marker="o" if len(xs) < 30 else None, color=colors[arm.name], linestyle=style, label=label
        )
    ax.axvline(results.max_samples, color="grey", linestyle=":", label="budget")
    ax.set(
        title=f"validation ({results.validation or 'unnamed'}) over samples used",
        xlabel="generated samples",
        ylabel="accuracy (%)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def evolution_plot(summary: Summary, path: Path) -> Path | None:
    """Generation and revision accuracy over training steps, one panel per arm that recorded them."""
    arms = [arm for arm in summary.results.arms.values() if any(run.evolution for run in arm.done)]
    if not arms:
        return None
    from megatron_sdzero.report import _pyplot, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(arms), figsize=(5 * len(arms), 4.5), squeeze=False, sharey=True)
    for ax, arm in zip(axes[0], arms, strict=True):
        for number, run in enumerate(arm.done):
            steps = [p["step"] for p in run.evolution]
            style = LINESTYLES[number % len(LINESTYLES)]
            for key, color in (("generation", "tab:blue"), ("revision", "tab:orange")):
                ax.plot(
                    steps,
                    [100 * p[key] for p in run.evolution],
                    color=color,
                    linestyle=style,
                    marker="o" if len(steps) < 30 else None,
                    label=f"{key} (seed {run.seed})",
                )
        ax.set(title=arm.label, xlabel="step", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_summary(summary: Summary, out: Path) -> tuple[Path, list[Path], list[str]]:
    """summary.md and the PNGs in ``out``; returns them and a note per plot skipped."""
    from megatron_sdzero.eval.report import write_atomically

    out.mkdir(parents=True, exist_ok=True)
    pngs, notes = [accuracy_plot(summary, out / "accuracy.png")], []
    for plot, name, why in (
        (samples_plot, "samples.png", "no done run recorded a validation curve"),
        (evolution_plot, "evolution.png", "no done run recorded generation/revision accuracy"),
    ):
        written = plot(summary, out / name)
        if written is None:
            notes.append(f"{name} skipped: {why}")
        else:
            pngs.append(written)
    markdown = out / SUMMARY_FILE
    write_atomically(markdown, render_markdown(summary, pngs))
    return markdown, pngs, notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdzero compare-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results.json of a `sdzero compare` run")
    parser.add_argument(
        "--out", type=Path, help="where summary.md and the PNGs go (default: beside RESULTS_JSON)"
    )
    args = parser.parse_args(list(argv or []))

    def run() -> int:
        summary = summarise(load_results(args.results))
        markdown, pngs, notes = write_summary(summary, args.out or args.results.parent)
        print(render_markdown(summary))
        for note in notes:
            print(f"note: {note}")
        print(f"sdzero compare-report: {markdown} and {len(pngs)} PNG(s): " + ", ".join(p.name for p in pngs))
        return 0

    return run_reporting_user_errors("sdzero compare-report", run)
