"""Code problems whose tests call a function instead of feeding stdin (LiveCodeBench's LeetCode
problems, HumanEval), turned into stdin/stdout tests the code sandbox already runs.

The reference is ``{"code_harness": {"prefix": str, "suffix": str}, "tests": [{"input", "output"}]}``:
the grader (``rewards.harness_reward``) wraps the response's last code block as
``prefix + code + suffix`` and runs the tests on that program.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

HARNESS_KEY = "code_harness"
PASSED = "__sdzero_all_checks_passed__"
# What LiveCodeBench puts in front of a LeetCode solution, so List, defaultdict, ... need no import.
LEETCODE_PRELUDE = (
    "from typing import *\nfrom functools import *\nfrom collections import *\nfrom itertools import *\n"
    "from heapq import *\nfrom bisect import *\nfrom string import *\nfrom operator import *\n"
    "from math import *\nimport math, re, sys, copy, string, random, heapq, bisect, itertools, collections\n"
    "sys.setrecursionlimit(1 << 20)\n"
)
CALL_METHOD = """
import json as _sdzero_json, sys as _sdzero_sys
_sdzero_args = [_sdzero_json.loads(line) for line in _sdzero_sys.stdin.read().split("\\n") if line.strip()]
print(_sdzero_json.dumps(getattr(Solution(), {name!r})(*_sdzero_args)))
"""


def is_harness_reference(reference: Any) -> bool:
    return isinstance(reference, Mapping) and HARNESS_KEY in reference


def functional_reference(func_name: str, tests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """LeetCode-style tests: each input is one JSON argument per line, each output a JSON value."""
    cases = []
    for test in tests:
        expected = json.dumps(json.loads(test["output"]))  # one canonical spelling on both sides
        cases.append({"input": test["input"], "output": expected})
    return {
        HARNESS_KEY: {"prefix": LEETCODE_PRELUDE, "suffix": CALL_METHOD.format(name=func_name)},
        "tests": cases,
    }


def check_function_reference(test_code: str, entry_point: str, prompt: str = "") -> dict[str, Any]:
    """HumanEval-style tests: ``check(candidate)`` asserts; the program prints a marker if all pass.
    ``prompt`` (the signature and its imports) goes first, so a response that repeats only the body's
    function still has the prompt's imports."""
    suffix = f"\n\n{test_code}\n\ncheck({entry_point})\nprint({PASSED!r})\n"
    return {
        HARNESS_KEY: {"prefix": _imports(prompt), "suffix": suffix},
        "tests": [{"input": "", "output": PASSED}],
    }


def _imports(prompt: str) -> str:
    lines = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
    return "\n".join(lines) + "\n" if lines else ""


def harnessed_program(code: str, reference: Mapping[str, Any]) -> str:
    harness = reference[HARNESS_KEY]
    return f"{harness['prefix']}\n{code}\n{harness['suffix']}"
