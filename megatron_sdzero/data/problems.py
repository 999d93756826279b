"""Problems for Phase 1 and Phase 2: Hugging Face datasets, local JSON/JSONL, or generated arithmetic.

A math problem is a statement plus a gold answer; a code problem is a statement plus tests
(``[{"input": ..., "output": ...}, ...]``). Every problem gets a stable id, a hash of its content, so
a resumed or sharded run recognises the same problem whatever order or file it came from.

Malformed rows are an error naming the file and row (``strict: true``, the default) or a counted
skip reported in :class:`LoadReport` (``strict: false``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_sdzero.config import ConfigError
from megatron_sdzero.errors import UserError

Mode = Literal["math", "code"]

# Field names tried in order when the config names none (OpenR1-Math, codeforces-cots, plain files).
PROBLEM_FIELDS: dict[str, tuple[str, ...]] = {
    "math": ("problem", "question"),
    "code": ("prompt", "problem", "description"),
}
ANSWER_FIELDS: dict[str, tuple[str, ...]] = {
    "math": ("answer", "solution"),
    "code": ("tests", "official_tests", "test_cases", "examples"),
}


class ProblemFormatError(UserError, ValueError):
    """A row of a problem source is malformed (strict mode), or a source holds no problem at all."""


@dataclass(frozen=True)
class ArithmeticSpec:
    """Generated integer-answer problems (see :mod:`megatron_sdzero.data.arithmetic`)."""

    n: int = 200
    seed: int = 0
    difficulty: int = 1


@dataclass
class ProblemSource:
    """Where problems come from: exactly one of ``dataset``, ``path`` or ``arithmetic``."""

    dataset: str | None = None  # HF hub name (or a local dataset script/directory) for load_dataset
    path: Path | None = None  # .json (a list), .jsonl, .parquet, or a save_to_disk directory
    arithmetic: ArithmeticSpec | None = None
    subset: str | None = None  # HF config name, e.g. "solutions" for open-r1/codeforces-cots
    split: str = "train"
    mode: Mode = "math"
    problem_field: str | None = None  # None: the first present of PROBLEM_FIELDS[mode]
    answer_field: str | None = None  # None: the first present of ANSWER_FIELDS[mode]
    limit: int | None = None  # keep the first `limit` valid problems
    strict: bool = True

    def __post_init__(self) -> None:
        given = [name for name in ("dataset", "path", "arithmetic") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"problems: set exactly one of dataset, path, arithmetic (got {given or 'none'})"
            )
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

    @property
    def reference(self) -> Any:
        """What the grader compares against: the gold answer (math) or the list of tests (code)."""
        return self.answer if self.mode == "math" else [dict(t) for t in self.tests or ()]


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    loaded: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "loaded": self.loaded,
            "duplicates": self.duplicates,
            "skipped": dict(self.skipped),
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
    text = _text_field(row, source.problem_field, PROBLEM_FIELDS[source.mode], "missing problem")
    if source.mode == "math":
        answer = _math_answer(row, source.answer_field)
        return Problem(problem_id("math", text, answer), "math", text, answer=answer, index=index)
    tests = _code_tests(row, source.answer_field)
    reference = [dict(t) for t in tests]
    return Problem(problem_id("code", text, reference), "code", text, tests=tests, index=index)


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
    if source.arithmetic is not None:
        from megatron_sdzero.data.arithmetic import make_arithmetic_problems

        a = source.arithmetic
        yield from enumerate(make_arithmetic_problems(a.n, a.seed, a.difficulty))
        return
    if source.path is not None:
        yield from _file_rows(Path(source.path), source.strict, source.split)
        return
    yield from enumerate(_hf_dataset(source))


def _file_rows(path: Path, strict: bool, split: str) -> Iterator[tuple[int, Any]]:
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
