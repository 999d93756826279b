"""Code reward: r = 1[the response's last fenced code block passes every test, in a sandbox].

Grading follows the reference: take the last fenced code block, compile it if the language needs it
(30 s), run each test with a 2 s wall-clock timeout feeding the test input on stdin, compare stdout
with the expected output after whitespace normalisation, and stop at the first failing test. Unlike
the reference, every compile and every run happens inside ``Sandbox`` (see ``sandbox.py``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sdzero.rewards.base import (
    Reward,
    RewardResult,
    default_workers,
    require_non_negative,
    require_positive,
)
from megatron_sdzero.rewards.sandbox import (
    ResourceLimits,
    SandboxConfig,
    SandboxReport,
    SandboxResult,
    SandboxRunError,
    install_prefix,
    open_sandbox,
)

logger = logging.getLogger(__name__)

FENCED_BLOCK = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
LANGUAGE_ALIASES = {
    "python": "python",
    "python3": "python",
    "py": "python",
    "cpp": "cpp",
    "c++": "cpp",
    "cc": "cpp",
    "cxx": "cpp",
}
SUPPORTED_LANGUAGES = ("python", "cpp")
POSITIVE_FIELDS = (
    "test_timeout_s",
    "compile_timeout_s",
    "memory_mb",
    "compile_memory_mb",
    "max_output_bytes",
    "file_size_mb",
    "open_files",
    "max_processes",
    "max_code_chars",
)
DETAIL_CHARS = 500


@dataclass
class CodeRewardConfig:
    num_workers: int = 0
    """Items graded concurrently, each in its own sandbox; 0 = min(8, CPU count)."""
    test_timeout_s: float = 2.0
    """Wall-clock limit of one test run, interpreter start-up included."""
    compile_timeout_s: float = 30.0
    memory_mb: int = 512
    """Address-space limit of each process of a test run."""
    compile_memory_mb: int = 2048
    max_output_bytes: int = 16 << 20
    """Cap on a test run's stdout (and stderr); exceeding it fails the test."""
    file_size_mb: int = 16
    open_files: int = 64
    max_processes: int = 8
    """Processes and threads a run may have at once (RLIMIT_NPROC of its private uid)."""
    languages: tuple[str, ...] = ("python", "cpp")
    untagged_language: str = "python"
    """Language of a fence without a tag, unless it looks like C++ (#include / int main)."""
    python_executable: str | None = None
    """Interpreter for Python solutions; None tries the grader's own base interpreter (without its
    venv), then python3 on PATH, then /usr/bin/python3, keeping the first that runs in the sandbox."""
    cpp_compiler: str = "g++"
    cpp_flags: tuple[str, ...] = ("-O2", "-std=c++17", "-pipe")
    max_code_chars: int = 200_000
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Isolation settings, including the ``allow_unsandboxed`` opt-in."""

    def __post_init__(self) -> None:
        from megatron_sdzero.config import ConfigError

        require_positive(self, "code", POSITIVE_FIELDS)
        require_non_negative(self, "code", ("num_workers",))
        if not self.languages or set(self.languages) - set(SUPPORTED_LANGUAGES):
            supported = list(SUPPORTED_LANGUAGES)
            raise ConfigError(f"code.languages: {list(self.languages)}; choose from {supported}")
        if self.untagged_language not in SUPPORTED_LANGUAGES:
            raise ConfigError(f"code.untagged_language: {self.untagged_language!r} is not supported")


@dataclass(frozen=True)
class TestCase:
    __test__ = False  # not a pytest class, despite the name

    input: str
    output: str


@dataclass(frozen=True)
class CodeBlock:
    language: str
    """Canonical language ("python", "cpp") or the fence's own tag if unknown."""
    code: str


@dataclass(frozen=True)
class _Toolchain:
    source_name: str
    run_argv: tuple[str, ...]
    compile_argv: tuple[str, ...] | None = None


def extract_last_code_block(response: str, untagged_language: str = "python") -> CodeBlock | None:
    """The last complete ```-fenced block; an unclosed final fence (truncated output) does not count."""
    matches = FENCED_BLOCK.findall(response)
    if not matches:
        return None
    info, code = matches[-1]
    tag = info.strip().split(" ")[0].lower().lstrip("{.")
    if not tag:
        looks_like_cpp = "#include" in code or re.search(r"\bint\s+main\s*\(", code) is not None
        return CodeBlock("cpp" if looks_like_cpp else untagged_language, code)
    return CodeBlock(LANGUAGE_ALIASES.get(tag, tag), code)


def as_test_cases(answer: Any) -> list[TestCase]:
    """Accepts a list of TestCase / {"input", "output"} mappings, or {"inputs": [...], "outputs": [...]}."""
    if isinstance(answer, Mapping) and "inputs" in answer:
        return [TestCase(str(i), str(o)) for i, o in zip(answer["inputs"], answer["outputs"], strict=True)]
    tests = []
    for test in answer:
        if isinstance(test, TestCase):
            tests.append(test)
        elif isinstance(test, Mapping):
            tests.append(TestCase(str(test["input"]), str(test["output"])))
        else:
            raise TypeError(f"cannot read a test case from {type(test).__name__}")
    return tests


def outputs_match(actual: bytes, expected: str) -> bool:
    """Whitespace-normalised comparison: equal token sequences (what Codeforces' default checker does)."""
    return actual.decode("utf-8", errors="replace").split() == expected.split()


class CodeReward(Reward):
    """Grades code responses against stdin/stdout tests inside a verified sandbox."""

    mode = "code"

    def __init__(self, config: CodeRewardConfig | None = None) -> None:
        self.config = config or CodeRewardConfig()
        self.sandbox, self.sandbox_report = open_sandbox(
            self.config.sandbox, self._python_candidates(), self._toolchain_prefixes()
        )
        logger.info("code sandbox: %s", self.sandbox_report.describe())
        self.toolchains = self._find_toolchains(self.sandbox_report)
        self._executor = ThreadPoolExecutor(
            self.config.num_workers or default_workers(), thread_name_prefix="code-reward"
        )

    def close(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _grade_all(self, responses: list[str], answers: list[Any]) -> list[RewardResult]:
        if self._executor is None:
            raise RuntimeError("CodeReward is closed")
        return list(self._executor.map(self.grade_one, responses, answers))

    def grade_one(self, response: str, answer: Any) -> RewardResult:
        started = time.monotonic()
        reason, extracted, detail = self._grade(response, as_test_cases(answer))
        score = 1.0 if reason == "passed" else 0.0
        return RewardResult(score, reason, extracted, time.monotonic() - started, detail)

    def _grade(self, response: str, tests: list[TestCase]) -> tuple[str, str, str]:
        block = extract_last_code_block(response, self.config.untagged_language)
        if block is None:
            return "no_code_block", "", ""
        if not tests:
            return "no_tests", block.code, ""
        if len(block.code) > self.config.max_code_chars:
            return "code_too_long", "", f"{len(block.code)} chars"
        toolchain = self.toolchains.get(block.language)
        if toolchain is None:
            return "unsupported_language", block.code, block.language
        with self.sandbox.workdir() as workdir:
            (workdir / toolchain.source_name).write_text(block.code, encoding="utf-8", errors="replace")
            if toolchain.compile_argv is not None:
                compiled = self._run(toolchain.compile_argv, workdir, self._compile_limits(), b"", True)
                if not compiled.succeeded:
                    reason = "compile_timeout" if compiled.timed_out else "compile_error"
                    return reason, block.code, _stderr_head(compiled)
            return self._tests_verdict(toolchain, workdir, tests, block.code)

    def _tests_verdict(
        self, toolchain: _Toolchain, workdir: Path, tests: list[TestCase], code: str
    ) -> tuple[str, str, str]:
        for number, test in enumerate(tests):
            stdin = test.input.encode("utf-8", errors="replace")
            result = self._run(toolchain.run_argv, workdir, self._run_limits(), stdin)
            if not result.succeeded:
                return result.failure_reason(), code, f"test {number}: {_stderr_head(result)}"
            if not outputs_match(result.stdout, test.output):
                return "wrong_answer", code, f"test {number}"
        return "passed", code, f"{len(tests)} tests"

    def _run(
        self,
        argv: tuple[str, ...],
        workdir: Path,
        limits: ResourceLimits,
        stdin: bytes,
        writable: bool = False,
    ) -> SandboxResult:
        """A sandbox run; a failure of the sandbox itself is retried once, then raised, never scored 0."""
        result = self.sandbox.run(argv, workdir, limits, stdin, writable)
        if result.setup_error or result.exec_error:
            logger.warning("sandbox failure, retrying once: %s", result.setup_error or result.exec_error)
            result = self.sandbox.run(argv, workdir, limits, stdin, writable)
        if result.setup_error or result.exec_error:
            raise SandboxRunError(
                f"the sandbox failed twice running {argv[0]}: {result.setup_error or result.exec_error}"
            )
        return result

    def _run_limits(self) -> ResourceLimits:
        return ResourceLimits(
            wall_timeout_s=self.config.test_timeout_s,
            cpu_time_s=math.ceil(self.config.test_timeout_s) + 1,
            memory_mb=self.config.memory_mb,
            file_size_mb=self.config.file_size_mb,
            open_files=self.config.open_files,
            processes=self.config.max_processes,
            max_output_bytes=self.config.max_output_bytes,
        )

    def _compile_limits(self) -> ResourceLimits:
        return ResourceLimits(
            wall_timeout_s=self.config.compile_timeout_s,
            cpu_time_s=math.ceil(self.config.compile_timeout_s) + 1,
            memory_mb=self.config.compile_memory_mb,
            file_size_mb=max(64, self.config.file_size_mb),
            open_files=self.config.open_files,
            processes=self.config.max_processes,
            max_output_bytes=1 << 20,
        )

    def _python_candidates(self) -> list[str]:
        if self.config.python_executable:
            return [self.config.python_executable]
        candidates = [os.path.realpath(sys.executable), shutil.which("python3"), "/usr/bin/python3"]
        return list(dict.fromkeys(path for path in candidates if path))

    def _toolchain_prefixes(self) -> list[str]:
        """Installation prefixes the sandbox must show (read-only) besides each candidate python's:
        the grader's base interpreter and the C++ compiler (usually /usr, already shown)."""
        prefixes = [os.path.realpath(sys.base_prefix)]
        compiler = shutil.which(self.config.cpp_compiler)
        if compiler and "cpp" in self.config.languages:
            prefixes.append(install_prefix(compiler))
        return prefixes

    def _find_toolchains(self, report: SandboxReport) -> dict[str, _Toolchain]:
        toolchains = {}
        if "python" in self.config.languages:
            toolchains["python"] = _Toolchain("main.py", (report.python, "-I", "main.py"))
        compiler = shutil.which(self.config.cpp_compiler)
        if "cpp" in self.config.languages:
            if compiler is None:
                logger.warning("no %s on PATH: C++ responses will score 0", self.config.cpp_compiler)
            else:
                compile_argv = (compiler, *self.config.cpp_flags, "-o", "prog", "main.cpp")
                toolchains["cpp"] = _Toolchain("main.cpp", ("./prog",), compile_argv)
        return toolchains


def _stderr_head(result: SandboxResult) -> str:
    return result.stderr.decode("utf-8", errors="replace")[:DETAIL_CHARS]
