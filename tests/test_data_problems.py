"""Problem sources: local JSON/JSONL/parquet/dataset dirs, strictness, stable ids, generated arithmetic."""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

import pytest

from megatron_sdzero.config import ConfigError, from_dict
from megatron_sdzero.data.arithmetic import make_arithmetic_problems, write_arithmetic_problems
from megatron_sdzero.data.problems import (
    ArithmeticSpec,
    ProblemFormatError,
    ProblemSource,
    load_problems,
)

MATH_ROWS = [
    {"problem": "What is 1 + 1?", "answer": "2"},
    {"question": "What is 2 + 2?", "solution": "The sum is \\boxed{4}."},
    {"problem": "What is 3 + 3?", "answer": 6},
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_local_json_and_jsonl_give_the_same_problems_with_stable_ids(tmp_path: Path) -> None:
    as_jsonl, report = load_problems(ProblemSource(path=_jsonl(tmp_path / "p.jsonl", MATH_ROWS)))
    (tmp_path / "p.json").write_text(json.dumps(MATH_ROWS))
    as_json, _ = load_problems(ProblemSource(path=tmp_path / "p.json"))
    assert as_jsonl == as_json
    assert [p.text for p in as_jsonl] == ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"]
    assert [p.answer for p in as_jsonl] == ["2", "The sum is \\boxed{4}.", "6"]
    assert report.rows == report.loaded == 3
    # The id is a function of the content, not of the position: reordering keeps every id.
    reordered, _ = load_problems(ProblemSource(path=_jsonl(tmp_path / "r.jsonl", MATH_ROWS[::-1])))
    assert {p.id: p.text for p in reordered} == {p.id: p.text for p in as_jsonl}
    assert len({p.id for p in as_jsonl}) == 3


def test_malformed_rows_are_an_error_or_a_counted_skip(tmp_path: Path) -> None:
    rows = [
        *MATH_ROWS,
        {"problem": "No answer here"},
        {"answer": "5"},
        "{not json",
        [1, 2],
        {"problem": " ", "answer": "1"},
    ]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ProblemFormatError, match=r"bad.jsonl:4: missing answer"):
        load_problems(ProblemSource(path=path))
    problems, report = load_problems(ProblemSource(path=path, strict=False))
    assert len(problems) == 3 and report.rows == 8
    assert dict(report.skipped) == {
        "missing answer": 1,
        "missing problem": 2,
        "invalid json": 1,
        "not an object": 1,
    }


def test_duplicates_limit_and_configured_fields(tmp_path: Path) -> None:
    rows = [{"q": "A?", "a": "1"}, {"q": "A?", "a": "1"}, {"q": "B?", "a": "2"}, {"q": "C?", "a": "3"}]
    path = _jsonl(tmp_path / "custom.jsonl", rows)
    problems, report = load_problems(ProblemSource(path=path, problem_field="q", answer_field="a", limit=2))
    assert [p.text for p in problems] == ["A?", "B?"] and report.duplicates == 1
    with pytest.raises(ProblemFormatError, match="missing problem"):
        load_problems(ProblemSource(path=path))  # default field names do not match this file


def test_code_problems_read_tests_in_either_layout(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Echo the input.", "tests": [{"input": "1\n", "output": "1\n"}]},
        {"prompt": "Double it.", "official_tests": {"inputs": ["2\n"], "outputs": ["4\n"]}},
        {"prompt": "Stringly typed.", "tests": json.dumps([{"input": "x", "output": "x"}])},
        {"prompt": "Broken.", "tests": [{"input": "1"}]},
    ]
    path = _jsonl(tmp_path / "code.jsonl", rows)
    problems, report = load_problems(ProblemSource(path=path, mode="code", strict=False))
    assert [p.reference for p in problems] == [
        [{"input": "1\n", "output": "1\n"}],
        [{"input": "2\n", "output": "4\n"}],
        [{"input": "x", "output": "x"}],
    ]
    assert dict(report.skipped) == {"malformed tests": 1}
    assert all(p.answer is None and p.mode == "code" for p in problems)


def test_parquet_file_dataset_dir_and_save_to_disk_load_through_datasets(tmp_path: Path) -> None:
    import datasets

    table = datasets.Dataset.from_list(
        [{"problem": r.get("problem", r.get("question")), "answer": "7"} for r in MATH_ROWS]
    )
    table.to_parquet(str(tmp_path / "p.parquet"))
    (tmp_path / "hub_like" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "hub_like" / "data" / "train-00000-of-00001.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    expected, _ = load_problems(ProblemSource(path=tmp_path / "p.parquet"))
    assert len(expected) == 3
    assert load_problems(ProblemSource(path=tmp_path / "saved"))[0] == expected
    assert load_problems(ProblemSource(path=tmp_path / "hub_like"))[0] == expected
    # problems.dataset goes through datasets.load_dataset, as for a hub name (offline: a local dir).
    assert load_problems(ProblemSource(dataset=str(tmp_path / "hub_like"), split="train"))[0] == expected


def test_source_config_needs_exactly_one_origin(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        from_dict(ProblemSource, {})
    with pytest.raises(ConfigError, match="exactly one"):
        from_dict(ProblemSource, {"path": "a.jsonl", "dataset": "x/y"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_problems(ProblemSource(path=tmp_path / "missing.jsonl"))


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expression: str) -> float:
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant)
        return node.value

    return walk(ast.parse(expression, mode="eval").body)


@pytest.mark.parametrize("difficulty", [0, 1, 2])
def test_arithmetic_answers_are_right(difficulty: int) -> None:
    rows = make_arithmetic_problems(200, seed=3, difficulty=difficulty)
    assert len({r["problem"] for r in rows}) == 200
    for row in rows:
        expression = re.sub(r"^(What is|Compute) |[?.]$", "", row["problem"])
        assert _evaluate(expression) == int(row["answer"])


def test_arithmetic_is_seeded_and_loads_as_a_source(tmp_path: Path) -> None:
    words = make_arithmetic_problems(50, seed=1, difficulty=3)
    assert words == make_arithmetic_problems(50, seed=1, difficulty=3)
    assert words != make_arithmetic_problems(50, seed=2, difficulty=3)
    assert all(int(r["answer"]) >= 0 for r in words)
    path = write_arithmetic_problems(tmp_path / "a.jsonl", 20, seed=4, difficulty=2)
    from_file, _ = load_problems(ProblemSource(path=path))
    generated, _ = load_problems(ProblemSource(arithmetic=ArithmeticSpec(n=20, seed=4, difficulty=2)))
    assert [(p.id, p.text, p.answer) for p in from_file] == [(p.id, p.text, p.answer) for p in generated]
    with pytest.raises(ValueError, match="difficulty"):
        make_arithmetic_problems(5, difficulty=9)
