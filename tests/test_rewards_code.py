"""Code reward: grading semantics, and containment of hostile programs by the sandbox.

Every hostile test asserts a concrete containment fact observed from the host, and that the same
grader still passes a correct program afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import socket
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from megatron_sdzero.config import ConfigError
from megatron_sdzero.rewards import (
    CodeReward,
    CodeRewardConfig,
    RewardConfig,
    SandboxConfig,
    SandboxUnavailableError,
    TestCase,
    build_reward,
    extract_last_code_block,
    outputs_match,
)
from megatron_sdzero.rewards import sandbox as sandbox_module
from megatron_sdzero.rewards.sandbox import (
    ProbeExecError,
    SandboxResult,
    SandboxRunError,
    isolation_unavailable_reason,
    open_sandbox,
)

# Longer than the reference's 2 s so that a loaded 2-core CI box cannot turn a correct program into
# a timeout; the timeout tests pay it once or twice.
TEST_TIMEOUT_S = 4.0
SLACK_S = 8.0
MAX_PROCESSES = 8
MAX_OUTPUT_BYTES = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[1]
SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "40 2\n", "output": "42"}]
SUM_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"

NO_SANDBOX_REASON = isolation_unavailable_reason()
needs_sandbox = pytest.mark.skipif(
    NO_SANDBOX_REASON is not None, reason=f"no sandbox here: {NO_SANDBOX_REASON}"
)


@pytest.fixture(scope="module")
def reward():
    if NO_SANDBOX_REASON is not None:
        pytest.skip(f"no sandbox here: {NO_SANDBOX_REASON}")
    config = CodeRewardConfig(
        num_workers=2,
        test_timeout_s=TEST_TIMEOUT_S,
        max_processes=MAX_PROCESSES,
        max_output_bytes=MAX_OUTPUT_BYTES,
    )
    with CodeReward(config) as code_reward:
        yield code_reward


def python_block(code: str) -> str:
    return f"Here is my solution.\n```python\n{textwrap.dedent(code)}```\n"


def cpp_block(code: str) -> str:
    return f"```cpp\n{textwrap.dedent(code)}```"


def run_python(reward: CodeReward, code: str, stdin: str = "") -> SandboxResult:
    """Runs code exactly as a test run of the grader would, and returns what the sandbox saw."""
    toolchain = reward.toolchains["python"]
    with reward.sandbox.workdir() as workdir:
        (workdir / toolchain.source_name).write_text(textwrap.dedent(code))
        return reward.sandbox.run(toolchain.run_argv, workdir, reward._run_limits(), stdin.encode())


def sandbox_uid_processes(config: SandboxConfig) -> list[int]:
    """Pids of live processes owned by any sandbox uid (there must be none between runs)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if config.uid_base <= uid < config.uid_base + config.uid_count:
            pids.append(int(entry))
    return pids


def assert_grader_still_works(reward: CodeReward) -> None:
    result = reward.grade_batch([python_block(SUM_PROGRAM)], [SUM_TESTS]).results[0]
    assert (result.score, result.reason) == (1.0, "passed")
    assert sandbox_uid_processes(reward.config.sandbox) == []


# ---------------------------------------------------------------- extraction and comparison


def test_the_last_complete_fenced_block_is_graded():
    response = "```python\nprint(1)\n```\ntext\n```cpp\nint main(){}\n```\n```python\nprint(2)"
    block = extract_last_code_block(response)
    assert (block.language, block.code) == ("cpp", "int main(){}\n")
    assert extract_last_code_block("no fences at all") is None
    assert extract_last_code_block("```python\nprint('truncated')") is None
    assert extract_last_code_block("```\nprint(3)\n```").language == "python"
    assert extract_last_code_block("```\n#include <cstdio>\nint main(){}\n```").language == "cpp"
    assert extract_last_code_block("```Python3 title=x\nprint(4)\n```").language == "python"
    assert extract_last_code_block("```java\nclass A {}\n```").language == "java"


def test_whitespace_normalised_comparison():
    assert outputs_match(b"1  2\r\n3\n\n", "1 2\n3")
    assert outputs_match(b"  42 ", "42\n")
    assert not outputs_match(b"12", "1 2")
    assert not outputs_match(b"1 2 3", "1 2")
    assert not outputs_match(b"\xff", "1")


# ---------------------------------------------------------------- grading semantics


def test_the_sandbox_reports_every_protection_active(reward):
    report = reward.sandbox_report
    assert report.fully_protected, report.describe()
    assert report.uid >= reward.config.sandbox.uid_base
    assert report.rlimits["RLIMIT_NPROC"] == 8  # probe limits; test runs get max_processes
    # the grader's own interpreter is usable even when it lives under a 0700 home directory
    assert report.python == os.path.realpath(sys.executable)
    assert reward.toolchains["python"].run_argv[0] == report.python


def test_correct_wrong_and_failing_programs(reward):
    responses = [
        python_block(SUM_PROGRAM),
        python_block("print(3)\n"),
        python_block("raise SystemExit(3)\n"),
        python_block("import sys\nprint(int(input().split()[0]) // 0)\n"),
        "I would write a program but I will not.",
        "```java\nclass Main {}\n```",
        python_block(SUM_PROGRAM),
    ]
    answers = [SUM_TESTS] * 6 + [[]]
    results = reward.grade_batch(responses, answers).results
    reasons = [result.reason for result in results]
    assert reasons == [
        "passed",
        "wrong_answer",
        "runtime_error",
        "runtime_error",
        "no_code_block",
        "unsupported_language",
        "no_tests",
    ]
    assert [result.score for result in results] == [1.0] + [0.0] * 6
    assert results[0].extracted == SUM_PROGRAM
    assert results[1].detail == "test 1"  # "3" is right for the first test only
    assert "ZeroDivisionError" in results[3].detail


def test_grading_stops_at_the_first_failing_test(reward):
    program = """
        n = int(input())
        if n == 3:
            while True:
                pass
        print(n * 2)
    """
    tests = [TestCase("1", "2"), TestCase("2", "5"), TestCase("3", "6")]
    result = reward.grade_batch([python_block(program)], [tests]).results[0]
    assert (result.reason, result.detail) == ("wrong_answer", "test 1")
    assert result.seconds < TEST_TIMEOUT_S  # the endless third test never ran


def test_whitespace_differences_do_not_fail_a_test(reward):
    program = "print('  1   2 ')\nprint()\nprint('3')\n"
    graded = reward.grade_batch(
        [python_block(program)] * 2, [[TestCase("", "1 2\n3")], [TestCase("", "12 3")]]
    )
    assert graded.scores == [1.0, 0.0]


def test_test_formats_and_stdin(reward):
    program = "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))\n"
    answers = [
        {"inputs": ["1 2 3", "4\n5\n"], "outputs": ["6", "9"]},
        [TestCase("10 20", "30")],
        [{"input": "7 " * 10_000, "output": str(70_000)}],
    ]
    assert reward.score_batch([python_block(program)] * 3, answers) == [1.0, 1.0, 1.0]


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_cpp_compiles_runs_and_reports_errors(reward):
    sum_cpp = """
        #include <iostream>
        int main() { long long a, b; std::cin >> a >> b; std::cout << a + b << "\\n"; }
    """
    responses = [
        cpp_block(sum_cpp),
        cpp_block("int main( { return 0; }\n"),
        cpp_block('#include <cstdio>\nint main() { int *p = nullptr; *p = 1; puts("x"); }\n'),
        cpp_block("#include <vector>\nint main() { std::vector<char> v(4ul << 30, 1); return v[7]; }\n"),
    ]
    results = reward.grade_batch(responses, [SUM_TESTS] * 4).results
    assert [result.reason for result in results] == [
        "passed",
        "compile_error",
        "runtime_error",
        "runtime_error",
    ]
    assert "error" in results[1].detail


# ---------------------------------------------------------------- hostile programs


def test_fork_bomb_is_contained(reward):
    counting_bomb = """
        import os, time
        children = 0
        for _ in range(200):
            try:
                pid = os.fork()
            except OSError:
                continue
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children += 1
        print(children)
    """
    result = run_python(reward, counting_bomb)
    assert result.exit_code == 0
    assert int(result.stdout) < MAX_PROCESSES  # RLIMIT_NPROC on the run's private uid

    classic_bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    started = time.monotonic()
    graded = reward.grade_batch([python_block(classic_bomb)], [SUM_TESTS]).results[0]
    assert graded.reason in ("timeout", "runtime_error", "cpu_time_limit")
    assert time.monotonic() - started < TEST_TIMEOUT_S + SLACK_S
    assert_grader_still_works(reward)  # includes: no sandbox-uid process survived


def test_memory_bomb_is_contained(reward):
    bomb = """
        blocks = []
        try:
            while True:
                blocks.append(bytearray(50 << 20))
        except MemoryError:
            print(len(blocks) * 50)
    """
    result = run_python(reward, bomb)
    assert result.exit_code == 0
    assert int(result.stdout) < reward.config.memory_mb  # stopped by RLIMIT_AS, in MB
    graded = reward.grade_batch([python_block("x = bytearray(4 << 30)\n")], [SUM_TESTS]).results[0]
    assert graded.reason == "runtime_error" and "MemoryError" in graded.detail
    assert_grader_still_works(reward)


def test_infinite_loop_and_sleep_hit_the_wall_clock(reward):
    responses = [python_block("while True:\n    pass\n"), python_block("import time\ntime.sleep(3600)\n")]
    started = time.monotonic()
    results = reward.grade_batch(responses, [SUM_TESTS] * 2).results
    assert [result.reason for result in results] == ["timeout", "timeout"]
    assert all(result.seconds >= TEST_TIMEOUT_S for result in results)
    assert time.monotonic() - started < TEST_TIMEOUT_S + SLACK_S
    assert_grader_still_works(reward)


def test_writes_outside_the_working_directory_do_not_reach_the_host(reward, tmp_path):
    tmp_path.chmod(0o777)
    tag = uuid.uuid4().hex
    targets = [
        f"/tmp/pwned-{tag}",
        f"/var/tmp/pwned-{tag}",
        f"/dev/shm/pwned-{tag}",
        f"{tmp_path}/pwned-{tag}",
        f"{REPO_ROOT}/pwned-{tag}",
        f"/etc/pwned-{tag}",
        f"/root/pwned-{tag}",
        f"pwned-{tag}",  # its own working directory is read-only during tests
    ]
    program = f"""
        for target in {targets!r}:
            try:
                with open(target, "w") as f:
                    f.write("pwned")
                print("wrote", target)
            except OSError as error:
                print("denied", target, type(error).__name__)
    """
    result = run_python(reward, program)
    assert result.exit_code == 0, result.stderr
    written = [line.split()[1] for line in result.stdout.decode().splitlines() if line.startswith("wrote")]
    assert written == targets[:3]  # only its private tmpfs mounts accept writes ...
    for target in targets[:-1]:
        assert not os.path.exists(target), target  # ... and the host never sees them
    assert list(tmp_path.iterdir()) == []
    assert_grader_still_works(reward)


def test_deletes_outside_the_working_directory_fail(reward, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    sentinel = shared / "sentinel"
    sentinel.write_text("keep me")
    sentinel.chmod(0o666)
    program = f"""
        import os, shutil
        for attempt in (lambda: os.remove({str(sentinel)!r}), lambda: shutil.rmtree({str(shared)!r}),
                        lambda: os.rename({str(sentinel)!r}, "/tmp/moved")):
            try:
                attempt()
                print("done")
            except OSError as error:
                print("denied", type(error).__name__)
    """
    result = run_python(reward, program)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["denied FileNotFoundError"] * 3  # /tmp is private
    assert sentinel.read_text() == "keep me"
    assert_grader_still_works(reward)


def test_host_files_cannot_be_read(reward, tmp_path):
    secret = uuid.uuid4().hex
    private = tmp_path / "private.txt"
    private.write_text(secret)
    private.chmod(0o600)
    world_readable = tmp_path / "public.txt"
    world_readable.write_text(secret)
    world_readable.chmod(0o644)
    home_secrets = ["/root/.bashrc", "/root/.ssh/id_rsa"]  # absent or not: never readable
    targets = [
        str(private),
        str(world_readable),
        "/etc/shadow",
        f"/proc/{os.getpid()}/environ",
        *home_secrets,
    ]
    program = f"""
        import os
        for target in {targets!r}:
            try:
                if os.path.isdir(target):
                    print(os.listdir(target))
                else:
                    print(open(target, errors="replace").read())
            except OSError as error:
                print("denied", type(error).__name__)
    """
    result = run_python(reward, program)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(targets)
    assert all(line.startswith("denied") for line in lines), lines
    assert secret not in result.stdout.decode()
    assert_grader_still_works(reward)


@pytest.fixture
def host_listeners():
    """A TCP listener on the host's loopback and a world-connectable unix socket under /run."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    unix_path = Path("/run") / f"sdzero-test-{uuid.uuid4().hex}.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(unix_path))
    unix_path.chmod(0o777)
    for listener in (tcp, unix):
        listener.listen()
        listener.setblocking(False)
    yield tcp, unix, unix_path
    tcp.close()
    unix.close()
    unix_path.unlink()


def test_network_connections_fail(reward, host_listeners):
    tcp, unix, unix_path = host_listeners
    program = f"""
        import socket
        attempts = [
            (socket.AF_INET, ("127.0.0.1", {tcp.getsockname()[1]})),
            (socket.AF_INET, ("10.0.2.2", 80)),
            (socket.AF_INET, ("1.1.1.1", 53)),
            (socket.AF_UNIX, {str(unix_path)!r}),
        ]
        for family, address in attempts:
            try:
                client = socket.socket(family)
                client.settimeout(0.5)
                client.connect(address)
                print("connected", address)
            except OSError as error:
                print("failed", type(error).__name__)
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53))
            print("sent")
        except OSError as error:
            print("failed", type(error).__name__)
        print(sorted(name for _, name in socket.if_nameindex()))
    """
    result = run_python(reward, program)
    for listener in (tcp, unix):
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody reached the host's listeners
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert all(line.startswith("failed") for line in lines[:5]), lines
    assert lines[5] == "['lo']"
    assert_grader_still_works(reward)


def test_killing_its_parent_or_the_grader_fails(reward):
    program = f"""
        import os, signal, sys
        attempts = {{
            "parent": lambda: os.kill(os.getppid(), signal.SIGKILL),
            "grader": lambda: os.kill({os.getpid()}, signal.SIGKILL),
            "everyone": lambda: os.kill(-1, signal.SIGKILL),
            "own group": lambda: os.killpg(os.getpgid(0), signal.SIGKILL),
        }}
        for name, attempt in attempts.items():
            print(name, flush=True)
            try:
                attempt()
            except OSError as error:
                print("failed", type(error).__name__, flush=True)
    """
    before = os.getpid()
    result = run_python(reward, program)
    assert os.getpid() == before  # we are still here
    output = result.stdout.decode().splitlines()
    # kill(-1) and killpg may take the program itself down; they can reach nothing else
    assert output[:4] == ["parent", "failed PermissionError", "grader", "failed ProcessLookupError"]
    assert result.setup_error is None
    assert_grader_still_works(reward)


def test_a_gigabyte_of_output_is_cut_off(reward):
    peak_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gigabyte_to = (
        "import sys\nblock = b'x' * (1 << 20)\nout = {}\nfor _ in range(1024):\n    out.write(block)\n"
    )
    responses = [
        python_block(gigabyte_to.format("sys.stdout.buffer")),
        python_block(gigabyte_to.format("sys.stderr.buffer")),
        python_block(gigabyte_to.format("open('/tmp/big', 'wb')")),
    ]
    started = time.monotonic()
    results = reward.grade_batch(responses, [SUM_TESTS] * 3).results
    assert [result.reason for result in results] == ["output_limit", "output_limit", "runtime_error"]
    assert "File too large" in results[2].detail  # RLIMIT_FSIZE (Python ignores SIGXFSZ: EFBIG)
    assert time.monotonic() - started < SLACK_S  # stopped at the cap, not after a gigabyte
    peak_growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_rss_before
    assert peak_growth_kb < 100 * 1024  # the grader buffered about the cap, not a gigabyte
    assert_grader_still_works(reward)


def test_processes_left_behind_die_with_the_run(reward):
    escaper = """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        print("parent done")
    """
    result = run_python(reward, escaper)
    assert result.stdout == b"parent done\n"
    assert not result.timed_out and result.wall_s < TEST_TIMEOUT_S  # did not wait for the sleeper ...
    assert sandbox_uid_processes(reward.config.sandbox) == []  # ... which died with the pid namespace


# ---------------------------------------------------------------- refusal and configuration


def test_refuses_to_run_unsandboxed_without_opt_in(monkeypatch):
    monkeypatch.setattr(sandbox_module, "select_backend", lambda: (None, "pretend: not root"))
    with pytest.raises(SandboxUnavailableError, match="allow_unsandboxed"):
        open_sandbox(SandboxConfig(), ["/usr/bin/python3"])
    with pytest.raises(SandboxUnavailableError, match="pretend: not root"):
        CodeReward(CodeRewardConfig(num_workers=1))


def test_opt_in_runs_unsandboxed_and_says_so(monkeypatch):
    monkeypatch.setattr(sandbox_module, "select_backend", lambda: (None, "pretend: not root"))
    config = CodeRewardConfig(
        num_workers=1, languages=("python",), sandbox=SandboxConfig(allow_unsandboxed=True)
    )
    with CodeReward(config) as reward:
        assert not reward.sandbox_report.isolated
        assert not reward.sandbox_report.fully_protected
        assert not reward.sandbox_report.network_isolated
        assert "namespaces: NO" in reward.sandbox_report.describe()
        assert reward.score_batch([python_block(SUM_PROGRAM)], [SUM_TESTS]) == [1.0]


@needs_sandbox
def test_a_failing_sandbox_is_an_error_not_a_zero_score():
    broken = CodeReward(CodeRewardConfig(num_workers=1, languages=("python",)))
    with broken:
        # the interpreter disappears after start-up: every run fails before the program starts
        broken.toolchains["python"] = dataclasses.replace(
            broken.toolchains["python"], run_argv=("/nonexistent/py",)
        )
        with pytest.raises(SandboxRunError, match="failed twice"):
            broken.grade_batch([python_block(SUM_PROGRAM)], [SUM_TESTS])


@needs_sandbox
def test_an_interpreter_that_cannot_run_in_the_sandbox_is_reported():
    config = CodeRewardConfig(num_workers=1, python_executable="/nonexistent/python3")
    with pytest.raises(ProbeExecError, match="/nonexistent/python3"):
        CodeReward(config)


@needs_sandbox
def test_build_reward_and_config_validation():
    config = RewardConfig(mode="code", code=CodeRewardConfig(num_workers=1, languages=("python",)))
    with build_reward(config) as reward:
        assert isinstance(reward, CodeReward)
        assert set(reward.toolchains) == {"python"}
        assert reward.score_batch(["```cpp\nint main(){}\n```"], [SUM_TESTS]) == [0.0]
    with pytest.raises(ConfigError, match="code.languages"):
        CodeRewardConfig(languages=("rust",))
    with pytest.raises(ConfigError, match="code.test_timeout_s"):
        CodeRewardConfig(test_timeout_s=0)
