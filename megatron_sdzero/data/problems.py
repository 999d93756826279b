"""Problems for Phase 1 and Phase 2: Hugging Face datasets, local JSON/JSONL, generated arithmetic,
or reasoning-gym generators (:mod:`megatron_sdzero.data.reasoning_gym`).

A math problem is a statement plus a gold answer; a code problem is a statement plus tests
(``[{"input": ..., "output": ...}, ...]``). A problem may carry a worked ``solution`` (a
demonstration for SDFT): OpenR1-Math's ``solution`` column, the arithmetic generator's worked steps,
or a reasoning-gym task's chain of thought. Every problem gets a stable id, a hash of its content, so
a resumed or sharded run recognises the same problem whatever order or file it came from.

Malformed rows are an error naming the file and row (``strict: true``, the default) or a counted
skip reported in :class:`LoadReport` (``strict: false``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_sdzero.config import ConfigError
from megatron_sdzero.data.benchmarks import ADAPTERS, BUILTINS, ProblemFiltered, builtin_rows
from megatron_sdzero.data.reasoning_gym import ReasoningGymSpec
from megatron_sdzero.errors import UserError

Mode = Literal["math", "code", "instruct"]  # instruct: free text with verifiable instructions (IFEval)

# Field names tried in order when the config names none (OpenR1-Math, codeforces-cots, plain files).
PROBLEM_FIELDS: dict[str, tuple[str, ...]] = {
    "math": ("problem", "question"),
    "code": ("prompt", "problem", "description"),
    "instruct": ("problem", "prompt"),
}
ANSWER_FIELDS: dict[str, tuple[str, ...]] = {
    "math": ("answer", "solution"),
    "code": ("tests", "official_tests", "test_cases", "examples"),
}


SOLUTION_FIELD = "solution"  # a demonstration, when the row has one and it is not the answer field


class ProblemFormatError(UserError, ValueError):
    """A row of a problem source is malformed (strict mode), or a source holds no problem at all."""


@dataclass(frozen=True)
class ArithmeticSpec:
    """Generated integer-answer problems (see :mod:`megatron_sdzero.data.arithmetic`)."""

    n: int = 200
    seed: int = 0
    difficulty: int = 1


SOURCE_KINDS = ("dataset", "path", "arithmetic", "reasoning_gym", "builtin")


@dataclass
class ProblemSource:
    """Where problems come from: exactly one of ``dataset``, ``path``, ``arithmetic``, ``reasoning_gym``."""

    dataset: str | None = None  # HF hub name (or a local dataset script/directory) for load_dataset
    path: Path | None = None  # .json (a list), .jsonl, .parquet, or a save_to_disk directory
    arithmetic: ArithmeticSpec | None = None
    reasoning_gym: ReasoningGymSpec | None = None  # math mode; graded by the task's own scorer
    builtin: str | None = None  # a benchmark a package ships: "humaneval" (code mode)
    subset: str | None = None  # HF config name, e.g. "solutions" for open-r1/codeforces-cots
    split: str = "train"
    mode: Mode = "math"
    problem_field: str | None = None  # None: the first present of PROBLEM_FIELDS[mode]
    answer_field: str | None = None  # None: the first present of ANSWER_FIELDS[mode]
    format: str | None = None  # a benchmark's row format (data/benchmarks.py: aime, livecodebench, ...)
    limit: int | None = None  # keep the first `limit` valid problems
    strict: bool = True

    def __post_init__(self) -> None:
        given = [name for name in SOURCE_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"problems: set exactly one of {', '.join(SOURCE_KINDS)} (got {given or 'none'})"
            )
        if self.builtin is not None:
            if self.builtin not in BUILTINS:
                raise ConfigError(f"problems.builtin: {self.builtin!r} is not one of {sorted(BUILTINS)}")
            self.format = self.format or BUILTINS[self.builtin]
        if self.format is not None:
            if self.format not in ADAPTERS:
                raise ConfigError(f"problems.format: {self.format!r} is not one of {sorted(ADAPTERS)}")
            if ADAPTERS[self.format][0] != self.mode:
                wanted = ADAPTERS[self.format][0]
                raise ConfigError(f"problems.mode: {self.format} problems are {wanted} mode")
        if self.reasoning_gym is not None and self.mode != "math":
            raise ConfigError("problems.mode: reasoning_gym problems are math mode (a final answer)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"problems.limit: must be positive, got {self.limit}")


@dataclass(frozen=True)
class Problem:
    id: str
    mode: Mode
    text: str
    answer: str | None = None  # math
    tests: tuple[dict[str, str], ...] | None = None  # code
    index: int = 0  # position in the source (0-based; a JSONL line number minus one), for reference only
    solution: str | None = None  # a worked solution (demonstration), when the source has one
    verifier: Mapping[str, Any] | None = None  # a reference of its own kind (reasoning-gym: how to regrade)

    @property
    def reference(self) -> Any:
        """What the grader compares against: the gold answer (math), the list of tests (code), or the
        problem's own verifier reference (reasoning-gym)."""
        if self.verifier is not None:
            return dict(self.verifier)
        return self.answer if self.mode == "math" else [dict(t) for t in self.tests or ()]


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    loaded: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)  # valid rows a benchmark format leaves out

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "loaded": self.loaded,
            "duplicates": self.duplicates,
            "skipped": dict(self.skipped),
            "filtered": dict(self.filtered),
        }


def problem_id(mode: str, text: str, reference: Any) -> str:
    payload = json.dumps([mode, text, reference], sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def load_problems(source: ProblemSource) -> tuple[list[Problem], LoadReport]:
    """All valid, de-duplicated problems of a source, in source order."""
    report = LoadReport(source=describe(source))
    problems: list[Problem] = []
    seen: set[str] = set()
    for index, row in _rows(source):
        report.rows += 1
        try:
            problem = parse_row(row, index, source)
        except ProblemFiltered as why:  # valid, but the benchmark keeps it out of automatic grading
            report.filtered[str(why)] += 1
            continue
        except ProblemFormatError as err:
            if source.strict:
                raise ProblemFormatError(
                    f"{_where(source, index)}: {err}; fix the row, or set problems.strict=false to skip "
                    "malformed rows (they are counted in the run's report)"
                ) from None
            report.skipped[str(err).split(":")[0]] += 1
            continue
        if problem.id in seen:
            report.duplicates += 1
            continue
        seen.add(problem.id)
        problems.append(problem)
        if source.limit is not None and len(problems) >= source.limit:
            break
    report.loaded = len(problems)
    if not problems:
        raise ProblemFormatError(_no_problems(report))
    return problems, report


def normalised_text_hash(text: str) -> str:
    """A hash of a problem statement that ignores case, whitespace and trailing punctuation."""
    normal = " ".join(text.lower().split()).rstrip(" .?!")
    return hashlib.sha1(normal.encode()).hexdigest()[:16]


def drop_overlap(problems: Sequence[Problem], others: Iterable[Problem | str]) -> list[Problem]:
    """``problems`` minus those whose normalised statement appears among ``others`` (problems or texts)."""
    seen = {normalised_text_hash(o if isinstance(o, str) else o.text) for o in others}
    return [p for p in problems if normalised_text_hash(p.text) not in seen]


def _where(source: ProblemSource, index: int) -> str:
    """file:line for a JSONL row, the row index otherwise."""
    if source.path is not None and Path(source.path).suffix == ".jsonl":
        return f"{source.path}:{index + 1}"
    return f"{describe(source)}: row {index}"


def _no_problems(report: LoadReport) -> str:
    if not report.rows:
        return f"{report.source} holds no problems (it is empty); point problems at a file with problems"
    skipped = sum(report.skipped.values())
    reasons = ", ".join(f"{n} {reason}" for reason, n in report.skipped.most_common())
    return (
        f"{report.source}: none of its {report.rows} rows is a valid problem ({skipped} malformed: "
        f"{reasons}); check problems.mode and problems.problem_field/answer_field"
    )


def describe(source: ProblemSource) -> str:
    if source.builtin is not None:
        return f"builtin:{source.builtin}"
    if source.reasoning_gym is not None:
        g = source.reasoning_gym
        extra = f", config={g.config}" if g.config else ""
        return f"reasoning_gym({g.task}, seeds [{g.seed}, {g.seed + g.size}){extra})"
    if source.arithmetic is not None:
        a = source.arithmetic
        return f"arithmetic(n={a.n}, seed={a.seed}, difficulty={a.difficulty})"
    if source.path is not None:
        return str(source.path)
    subset = f"/{source.subset}" if source.subset else ""
    return f"{source.dataset}{subset}[{source.split}]"


def parse_row(row: Any, index: int, source: ProblemSource) -> Problem:
    """One row -> Problem; raises ProblemFormatError("<reason>: <detail>") when malformed."""
    if isinstance(row, _BadLine):
        raise ProblemFormatError(row.error)
    if not isinstance(row, Mapping):
        raise ProblemFormatError(f"not an object: got {type(row).__name__}")
    own_reference = source.reasoning_gym is not None or source.format is not None
    problem_field, answer_field = source.problem_field, source.answer_field
    if source.format is not None:
        row, problem_field, answer_field = _adapted(row, source.format), None, None
    verifier = row.get("reference") if own_reference else None
    text = _text_field(row, problem_field, PROBLEM_FIELDS[source.mode], "missing problem")
    if source.mode == "math":
        answer = _math_answer(row, answer_field)
        solution = _solution(row, answer_field or _pick(row, None, ANSWER_FIELDS["math"])[0])
        return Problem(
            problem_id("math", text, answer), "math", text, answer=answer, index=index, solution=solution,
            verifier=verifier,
        )  # fmt: skip
    if source.mode == "instruct":
        if verifier is None:
            raise ProblemFormatError("missing instructions: instruct problems come from format: ifeval")
        return Problem(
            problem_id("instruct", text, verifier), "instruct", text, index=index, verifier=verifier
        )
    tests = _code_tests(verifier if verifier is not None else row, answer_field)
    reference = verifier if verifier is not None else [dict(t) for t in tests]
    return Problem(
        problem_id("code", text, reference), "code", text, tests=tests, index=index,
        solution=_solution(row, answer_field or ""), verifier=verifier,
    )  # fmt: skip


def _adapted(row: Mapping, name: str) -> Mapping:
    from megatron_sdzero.data.benchmarks import ADAPTERS, RowFormatError

    try:
        return ADAPTERS[name][1](row)
    except RowFormatError as err:
        raise ProblemFormatError(str(err)) from None
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ProblemFiltered):
            raise
        raise ProblemFormatError(f"malformed {name} row: {type(err).__name__}: {err}") from None


def _names(configured: str | None, candidates: tuple[str, ...]) -> tuple[str, ...]:
    return (configured,) if configured else candidates


def _pick(row: Mapping, configured: str | None, candidates: tuple[str, ...]) -> tuple[str, Any]:
    names = _names(configured, candidates)
    for name in names:
        value = row.get(name)
        if value is not None and value != "" and value != []:
            return name, value
    return names[0], None


def _text_field(row: Mapping, configured: str | None, candidates: tuple[str, ...], reason: str) -> str:
    name, value = _pick(row, configured, candidates)
    if value is None:
        raise ProblemFormatError(f"{reason}: no non-empty field among {list(_names(configured, candidates))}")
    if not isinstance(value, str) or not value.strip():
        raise ProblemFormatError(f"{reason}: field {name!r} is not a non-empty string")
    return value


def _math_answer(row: Mapping, configured: str | None) -> str:
    name, value = _pick(row, configured, ANSWER_FIELDS["math"])
    if value is None:
        fields = list(_names(configured, ANSWER_FIELDS["math"]))
        raise ProblemFormatError(f"missing answer: no non-empty field among {fields}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ProblemFormatError(f"malformed answer: field {name!r} holds {type(value).__name__}")
    answer = str(value).strip()
    if not answer:
        raise ProblemFormatError(f"missing answer: field {name!r} is blank")
    return answer


def _solution(row: Mapping, answer_field: str) -> str | None:
    value = row.get(SOLUTION_FIELD)
    if SOLUTION_FIELD == answer_field or not isinstance(value, str) or not value.strip():
        return None
    return value


def _code_tests(row: Mapping, configured: str | None) -> tuple[dict[str, str], ...]:
    name, value = _pick(row, configured, ANSWER_FIELDS["code"])
    if value is None:
        fields = list(_names(configured, ANSWER_FIELDS["code"]))
        raise ProblemFormatError(f"missing tests: no non-empty field among {fields}")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ProblemFormatError(f"malformed tests: field {name!r} is a string but not JSON") from None
    if isinstance(value, Mapping) and isinstance(value.get("inputs"), list):  # {"inputs": [], "outputs": []}
        outputs = value.get("outputs")
        if not isinstance(outputs, list) or len(outputs) != len(value["inputs"]):
            raise ProblemFormatError(f"malformed tests: field {name!r} needs as many outputs as inputs")
        value = [{"input": i, "output": o} for i, o in zip(value["inputs"], outputs, strict=True)]
    if not isinstance(value, list) or not value:
        raise ProblemFormatError(f"malformed tests: field {name!r} is not a non-empty list")
    tests = []
    for i, test in enumerate(value):
        if (
            not isinstance(test, Mapping)
            or not isinstance(test.get("input"), str)
            or not isinstance(test.get("output"), str)
        ):
            raise ProblemFormatError(f"malformed tests: {name}[{i}] needs string 'input' and 'output'")
        tests.append({"input": test["input"], "output": test["output"]})
    return tuple(tests)


def _rows(source: ProblemSource) -> Iterator[tuple[int, Any]]:
    if source.builtin is not None:
        yield from enumerate(builtin_rows(source.builtin))
        return
    if source.reasoning_gym is not None:
        from megatron_sdzero.data.reasoning_gym import gym_rows

        yield from enumerate(gym_rows(source.reasoning_gym))
        return
    if source.arithmetic is not None:
        from megatron_sdzero.data.arithmetic import make_arithmetic_problems

        a = source.arithmetic
        yield from enumerate(make_arithmetic_problems(a.n, a.seed, a.difficulty))
        return
    if source.path is not None:
        yield from file_rows(Path(source.path), source.strict, source.split)
        return
    yield from enumerate(_hf_dataset(source))


def file_rows(path: Path, strict: bool, split: str) -> Iterator[tuple[int, Any]]:
    if not path.exists():
        raise ConfigError(f"problems.path: {path} does not exist")
    if path.is_dir() or path.suffix in (".parquet", ".arrow", ".csv"):
        yield from enumerate(_local_dataset(path, split))
        return
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path, strict)
        return
    if path.suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, list):
            raise ProblemFormatError(f"{path}: a .json problem file must hold a list of objects")
        yield from enumerate(data)
        return
    raise ConfigError(f"problems.path: {path}: expected .json, .jsonl, .parquet, .csv or a dataset directory")


class _BadLine:
    """A JSONL line that did not parse; parse_row reports it as malformed ("<reason>: <detail>")."""

    def __init__(self, error: str) -> None:
        self.error = error


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ProblemFormatError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise ProblemFormatError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); fix it there") from None


def _jsonl_rows(path: Path, strict: bool) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for index, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                yield index, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                if isinstance(err, UnicodeDecodeError):
                    reason = f"not utf-8: byte {err.start} of the line"
                else:
                    reason = f"invalid json: {err.msg}"
                if strict:
                    raise ProblemFormatError(
                        f"{path}:{index + 1}: {reason}; fix the line, or set problems.strict=false to "
                        "skip malformed rows"
                    ) from None
                yield index, _BadLine(reason)


def _local_dataset(path: Path, split: str) -> Iterable[Any]:
    import datasets

    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():  # save_to_disk
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(str(path), split=split)  # a directory of data files
    builder = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}[path.suffix]
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _hf_dataset(source: ProblemSource) -> Iterable[Any]:
    import datasets

    try:
        return datasets.load_dataset(source.dataset, source.subset, split=source.split)
    except (FileNotFoundError, ConnectionError, OSError) as err:
        raise ConfigError(
            f"problems.dataset: cannot load {describe(source)} ({err}). Offline? Pre-download it into the HF "
            "cache (HF_HOME) on a machine with internet, or point problems.path at a local copy."
        ) from err
