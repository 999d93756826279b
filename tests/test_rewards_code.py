"""Code reward: grading semantics, and containment of hostile programs by the sandbox.

Every hostile test asserts a concrete containment fact observed from the host, and that the same
grader still passes a correct program afterwards.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import resource
import shutil
import socket
import sys
import tempfile
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
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
    sandbox_launcher,
)
from megatron_sdzero.rewards import sandbox as sandbox_module
from megatron_sdzero.rewards.sandbox import (
    ProbeExecError,
    ResourceLimits,
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


# As an ordinary user with bubblewrap installed, every test taking `reward` runs on both backends.
BACKENDS = ["auto"] + (["bwrap"] if os.geteuid() != 0 and sandbox_module.bubblewrap() else [])


@pytest.fixture(scope="module", params=BACKENDS)
def reward(request):
    if NO_SANDBOX_REASON is not None:
        pytest.skip(f"no sandbox here: {NO_SANDBOX_REASON}")
    config = CodeRewardConfig(
        num_workers=2,
        test_timeout_s=TEST_TIMEOUT_S,
        max_processes=MAX_PROCESSES,
        max_output_bytes=MAX_OUTPUT_BYTES,
        sandbox=SandboxConfig(backend=request.param),
    )
    with CodeReward(config) as code_reward:
        yield code_reward


def python_block(code: str) -> str:
    return f"Here is my solution.\n```python\n{textwrap.dedent(code)}```\n"


def cpp_block(code: str) -> str:
    return f"```cpp\n{textwrap.dedent(code)}```"


def run_python(
    reward: CodeReward, code: str, stdin: str = "", limits: ResourceLimits | None = None
) -> SandboxResult:
    """Runs code exactly as a test run of the grader would, and returns what the sandbox saw."""
    toolchain = reward.toolchains["python"]
    with reward.sandbox.workdir() as workdir:
        (workdir / toolchain.source_name).write_text(textwrap.dedent(code))
        return reward.sandbox.run(toolchain.run_argv, workdir, limits or reward._run_limits(), stdin.encode())


_PREEXISTING: set[int] = set()


@pytest.fixture(scope="module", autouse=True)
def _helpers_of_earlier_tests() -> None:
    """Long-lived children that earlier test files started (the rank launcher's forkserver and its
    resource tracker) are not the sandbox's: remember them before this file's first run."""
    _PREEXISTING.update(_descendants())


def sandbox_processes() -> list[int]:
    """Live descendants of this test process (there must be none between runs) other than the helpers
    earlier test files left. A sandboxed process cannot leave the tree: its pid namespace dies with
    init, and init is the launcher's child."""
    return [pid for pid in _descendants() if pid not in _PREEXISTING]


def _descendants() -> list[int]:
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    descendants = []
    for pid in parents:
        ancestor = parents[pid]
        while ancestor > 1 and ancestor != os.getpid():
            ancestor = parents.get(ancestor, 0)
        if ancestor == os.getpid():
            descendants.append(pid)
    return descendants


def assert_grader_still_works(reward: CodeReward) -> None:
    result = reward.grade_batch([python_block(SUM_PROGRAM)], [SUM_TESTS]).results[0]
    assert (result.score, result.reason) == (1.0, "passed")
    assert sandbox_processes() == []


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
    expected = reward.config.sandbox.backend
    assert report.backend == (("root" if os.geteuid() == 0 else "userns") if expected == "auto" else expected)
    if report.backend == "root":
        assert report.uid >= reward.config.sandbox.uid_base
        assert report.rlimits["RLIMIT_NPROC"] == 8  # probe limits; test runs get max_processes
    else:  # init (and the launcher or bwrap's init) share the program's uid there
        assert report.uid == (0 if report.backend == "userns" else os.getuid())
        assert report.rlimits["RLIMIT_NPROC"] == 8 + sandbox_launcher.EXTRA_PROCESSES[report.backend]
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
def host_scratch():
    """A fresh world-readable host directory outside the temporary and runtime directories: in the
    checkout, or under $SDZERO_HOSTILE_SCRATCH (set by the unprivileged re-run, whose user cannot
    write the checkout)."""
    path = Path(tempfile.mkdtemp(prefix=".hostile-", dir=os.environ.get("SDZERO_HOSTILE_SCRATCH", REPO_ROOT)))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def host_listeners(host_scratch):
    """A TCP listener on the host's loopback and world-connectable unix sockets: at a path in
    host_scratch, in the abstract namespace, and under /run where this user may write there."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    unix_paths = [str(host_scratch / "service.sock"), f"\0sdzero-test-{uuid.uuid4().hex}"]
    if os.access("/run", os.W_OK):
        unix_paths.append(f"/run/sdzero-test-{uuid.uuid4().hex}.sock")
    listeners = [tcp]
    for path in unix_paths:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        if not path.startswith("\0"):
            os.chmod(path, 0o777)
        listeners.append(listener)
    for listener in listeners:
        listener.listen()
        listener.setblocking(False)
    yield listeners, unix_paths
    for listener in listeners:
        listener.close()
    for path in unix_paths:
        if not path.startswith("\0"):
            os.unlink(path)


def test_network_and_host_sockets_are_unreachable(reward, host_listeners):
    listeners, unix_paths = host_listeners
    program = f"""
        import socket
        attempts = [
            (socket.AF_INET, ("127.0.0.1", {listeners[0].getsockname()[1]})),
            (socket.AF_INET, ("10.0.2.2", 80)),
            (socket.AF_INET, ("1.1.1.1", 53)),
        ] + [(socket.AF_UNIX, path) for path in {unix_paths!r}]
        for family, address in attempts:
            try:
                client = socket.socket(family)
                client.settimeout(0.5)
                client.connect(address)
                client.sendall(b"hello")
                print("connected", address, client.recv(100))
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
    for listener in listeners:
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody reached the host's listeners
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    attempts = 3 + len(unix_paths) + 1
    assert all(line.startswith("failed") for line in lines[:attempts]), lines
    assert lines[attempts] == "['lo']"
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
    # kill(-1) and killpg may take the program itself down; they can reach nothing else. Its parent
    # is init: another uid (root backend), or the pid namespace's init, immune to its own namespace
    assert output[0] == "parent"
    assert output[1 : output.index("grader")] in (["failed PermissionError"], [])
    assert output[output.index("grader") + 1] == "failed ProcessLookupError"
    assert result.setup_error is None
    assert result.exit_code is not None or result.signal is not None  # init survived to report
    assert_grader_still_works(reward)


def test_the_test_input_cannot_be_modified_through_proc(reward):
    program = """
        import os, sys
        try:
            with open("/proc/self/fd/0", "r+b") as stdin:
                stdin.write(b"tampered" * 1000)
            print("wrote")
        except OSError as error:
            print("denied", type(error).__name__)
        sys.stdout.write(sys.stdin.read())
    """
    result = run_python(reward, program, stdin="the input\n")
    assert result.stdout.decode().splitlines() == ["denied PermissionError", "the input"], result.stderr
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
    assert sandbox_processes() == []  # ... which died with the pid namespace


def test_a_dataset_on_the_host_cannot_be_read_for_the_answer(reward, host_scratch, tmp_path, monkeypatch):
    """Reward hacking: the expected output sits in world-readable files on the host and in the
    grader's environment; a program that prints it without solving anything must score 0."""
    answer = uuid.uuid4().hex
    record = json.dumps({"input": "", "output": answer}) + "\n"
    tmp_path.chmod(0o755)
    datasets = [host_scratch / "data" / "problems.jsonl", tmp_path / "problems.jsonl"]
    for dataset in datasets:
        dataset.parent.mkdir(mode=0o755, exist_ok=True)
        dataset.write_text(record)
        dataset.chmod(0o644)
    monkeypatch.setenv("SDZERO_TEST_EXPECTED_OUTPUT", answer)
    skipped = [*sandbox_launcher.SYSTEM_PATHS, *reward.sandbox.expose, "/proc", "/dev"]
    # the cheater must not contain the answer itself: it looks for what follows the field names
    cheater = f"""
        import os, re
        patterns = [re.compile(rb'"output": "(\\w+)"'), re.compile(rb"SDZERO_TEST_EXPECTED_OUTPUT=(\\w+)")]
        def search(path):
            try:
                with open(path, "rb") as file:
                    data = file.read(1 << 20)
            except OSError as error:
                return "denied " + type(error).__name__
            found = [match.decode() for pattern in patterns for match in pattern.findall(data)]
            return "found " + " ".join(found) if found else "absent"
        for dataset in {[str(path) for path in datasets]!r}:
            print(dataset, search(dataset))
        for pid in [name for name in os.listdir("/proc") if name.isdigit()]:
            for name in ("environ", "cmdline"):
                print(f"/proc/{{pid}}/{{name}}", search(f"/proc/{{pid}}/{{name}}"))
        skipped = {skipped!r}
        for top, dirs, files in os.walk("/"):
            dirs[:] = [d for d in dirs if os.path.join(top, d) not in skipped]
            for name in files:
                print(os.path.join(top, name), search(os.path.join(top, name)))
        print("visible", sorted(os.listdir("/")))
    """
    result = run_python(reward, cheater)
    assert result.exit_code == 0, result.stderr
    output = result.stdout.decode()
    assert answer not in output, output
    lines = output.splitlines()
    assert [line.split()[1] for line in lines[: len(datasets)]] == ["denied"] * len(datasets)
    init_environ = next(line for line in lines if line.startswith("/proc/1/environ"))
    assert init_environ.split()[1] == "denied"  # init is another uid, or not dumpable (userns)
    visible = set(json.loads(lines[-1].removeprefix("visible ").replace("'", '"')))
    assert visible <= sandbox_module.expected_root_entries(reward.sandbox)
    assert not visible & {"root", "home", "work", "data", "run", "sys", "mnt", "srv", "opt"} - {
        path.split("/")[1] for path in reward.sandbox.expose
    }
    printer = python_block(f"import sys\nprint(open({str(datasets[0])!r}).read().split('\"')[-2])\n")
    graded = reward.grade_batch([printer], [[TestCase("", answer)]]).results[0]
    assert (graded.score, graded.reason) == (0.0, "runtime_error")
    assert_grader_still_works(reward)


def _keyctl(*args: object) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(sandbox_launcher.ARCH["keyctl"]), *args)
    if result < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result


@pytest.fixture
def grader_key():
    """A "user" key with a secret payload in this thread's session keyring, as a grader's token."""
    if sandbox_launcher.ARCH is None:
        pytest.skip("no syscall table for this architecture")
    secret = uuid.uuid4().hex.encode()
    description = f"sdzero-test-{uuid.uuid4().hex}".encode()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    add_key = ctypes.c_long(sandbox_launcher.ARCH["add_key"])
    session = ctypes.c_int(sandbox_launcher.KEY_SPEC_SESSION_KEYRING)
    serial = libc.syscall(add_key, b"user", description, secret, ctypes.c_size_t(len(secret)), session)
    if serial < 0:
        pytest.skip(f"this kernel does not take keys: {os.strerror(ctypes.get_errno())}")
    buffer = ctypes.create_string_buffer(256)
    read = _keyctl(sandbox_launcher.KEYCTL_READ, ctypes.c_long(serial), buffer, ctypes.c_size_t(256))
    assert buffer.raw[:read] == secret  # the grader itself can read it
    yield serial, description, secret
    _keyctl(21, ctypes.c_long(serial))  # KEYCTL_INVALIDATE


def test_the_graders_keyring_is_not_inherited(reward, grader_key):
    serial, description, secret = grader_key
    program = f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        KEYCTL = ctypes.c_long({sandbox_launcher.ARCH["keyctl"]})
        def keyctl(*args):
            result = libc.syscall(KEYCTL, *args)
            return result if result >= 0 else "failed " + os.strerror(ctypes.get_errno())
        buffer = ctypes.create_string_buffer(256)
        print("read", keyctl(11, ctypes.c_long({serial}), buffer, ctypes.c_size_t(256)), buffer.value)
        for keyring in (-3, -4, -5):  # session, user, user-session
            print("search", keyctl(10, ctypes.c_int(keyring), b"user", {description!r}, 0))
        print("session keyring", keyctl(0, ctypes.c_int(-3), 0))
    """
    result = run_python(reward, program)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert secret.decode() not in result.stdout.decode()
    assert lines[0].startswith("read failed"), lines
    assert all(line.startswith("search failed") for line in lines[1:4]), lines
    assert lines[4] == "session keyring failed Operation not permitted"  # key calls are refused
    assert_grader_still_works(reward)


MEMORY_BOMB = r"""
import ctypes, json, mmap, os, sys
MB = 1 << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
c = ctypes
libc.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
keep = []

def pinned(fd, size):
    # map the object, touch it, unmap all but one page: RLIMIT_AS then sees one page
    address = libc.mmap(None, size, 3, 0x01 | (0x20 if fd < 0 else 0), fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    ctypes.memset(address, 1, size)
    libc.munmap(address + 4096, size - 4096)
    return size // MB

def memfd():
    fd = os.memfd_create("bomb")
    os.write(fd, b"\1" * (8 * MB))
    keep.append(fd)
    return 8 + pinned(os.memfd_create("bomb"), 16 * MB)

def shared_anonymous():
    return pinned(-1, 16 * MB)

def dev_zero():
    return pinned(os.open("/dev/zero", os.O_RDWR), 16 * MB)

def sysv():
    segment = libc.shmget(0, ctypes.c_size_t(16 * MB), 0o1600)
    if segment < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    return 16

def nested_tmpfs():
    # a user namespace of its own would let the program mount a tmpfs of any size
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000 | 0x20000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as file:
            file.write(text)
    if libc.mount(b"tmpfs", b"/tmp/work", b"tmpfs", 0, b"size=4g") != 0:
        raise OSError(ctypes.get_errno(), "mount")
    return 16 * sum(tmpfs_file("/tmp/work")() == 1 for _ in range(16))

def clone_new_user():
    pid = libc.syscall(56 if os.uname().machine == "x86_64" else 220, 0x10000000 | 17, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone")
    os.waitpid(pid, 0)
    return 0

def tmpfs_file(directory):
    def grab():
        fd = os.open(f"{directory}/{len(keep)}-{os.getpid()}", os.O_CREAT | os.O_RDWR)
        keep.append(fd)
        return os.write(fd, b"\1" * MB) / MB  # a short write when the tmpfs fills up
    return grab

def anonymous():
    keep.append(bytearray(b"\1") * (8 * MB))
    return 8

held, errors = {}, {}
for name, grab in [("memfd", memfd), ("shared_anonymous", shared_anonymous), ("dev_zero", dev_zero),
                   ("sysv", sysv), ("nested_tmpfs", nested_tmpfs), ("clone_new_user", clone_new_user),
                   ("dev_shm", tmpfs_file("/dev/shm")), ("tmp", tmpfs_file("/tmp")),
                   ("anonymous", anonymous)]:
    held[name] = 0
    for _ in range(4096):
        try:
            held[name] += grab()
        except (OSError, MemoryError) as error:
            errors[name] = type(error).__name__
            break
print(json.dumps({"held_mb": held, "errors": errors}), flush=True)
"""


def memory_bound_mb(config: CodeRewardConfig) -> int:
    """docs/rewards.md: a run holds at most max_processes x memory_mb + tmpfs_mb."""
    return config.max_processes * config.memory_mb + config.sandbox.tmpfs_mb


@pytest.fixture(scope="module")
def small_memory_reward():
    if NO_SANDBOX_REASON is not None:
        pytest.skip(f"no sandbox here: {NO_SANDBOX_REASON}")
    config = CodeRewardConfig(
        num_workers=1,
        languages=("python",),
        memory_mb=128,
        max_processes=MAX_PROCESSES,
        sandbox=SandboxConfig(tmpfs_mb=32),
    )
    with CodeReward(config) as code_reward:
        yield code_reward


def bomb_limits(reward: CodeReward) -> ResourceLimits:
    return dataclasses.replace(reward._run_limits(), wall_timeout_s=60.0, cpu_time_s=60)


def check_one_bomb(report: dict, config: CodeRewardConfig) -> int:
    held = report["held_mb"]
    for escape in ("memfd", "shared_anonymous", "sysv", "nested_tmpfs", "clone_new_user"):
        assert (held[escape], report["errors"][escape]) == (0, "PermissionError"), report
    assert (held["dev_zero"], report["errors"]["dev_zero"]) == (0, "FileNotFoundError"), report
    assert config.memory_mb / 2 <= held["anonymous"] <= config.memory_mb, report  # RLIMIT_AS bites
    assert report["errors"]["anonymous"] == "MemoryError"
    return sum(held.values())


def test_one_process_cannot_hold_more_than_its_memory_bound(small_memory_reward):
    config = small_memory_reward.config
    result = run_python(small_memory_reward, MEMORY_BOMB, limits=bomb_limits(small_memory_reward))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    total = check_one_bomb(report, config)
    tmpfs = report["held_mb"]["dev_shm"] + report["held_mb"]["tmp"]
    assert config.sandbox.tmpfs_mb / 2 <= tmpfs <= config.sandbox.tmpfs_mb, report  # one tmpfs for both
    assert total <= config.memory_mb + config.sandbox.tmpfs_mb
    assert_grader_still_works(small_memory_reward)


def test_eight_processes_of_a_run_stay_within_the_documented_bound(small_memory_reward):
    config = small_memory_reward.config
    program = f"""
        import os
        ready_read, ready_write = os.pipe()
        go_read, go_write = os.pipe()
        children = 0
        while children < {MAX_PROCESSES - 1} and os.fork() != 0:
            children += 1
        is_parent = children == {MAX_PROCESSES - 1}
        exec({MEMORY_BOMB!r})
        if not is_parent:  # hold everything until every process has reported
            os.close(go_write)
            os.write(ready_write, b"x")
            os.read(go_read, 1)
            os._exit(0)
        for _ in range(children):
            os.read(ready_read, 1)
        os.close(go_write)
        for _ in range(children):
            os.wait()
    """
    result = run_python(small_memory_reward, program, limits=bomb_limits(small_memory_reward))
    assert result.exit_code == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(reports) == MAX_PROCESSES  # the rlimit left room for exactly max_processes
    total = sum(check_one_bomb(report, config) for report in reports)
    tmpfs = sum(report["held_mb"]["dev_shm"] + report["held_mb"]["tmp"] for report in reports)
    assert tmpfs <= config.sandbox.tmpfs_mb
    assert total <= memory_bound_mb(config)
    assert_grader_still_works(small_memory_reward)


def test_eight_concurrent_runs_each_stay_within_the_bound(small_memory_reward):
    config = small_memory_reward.config
    limits = bomb_limits(small_memory_reward)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda _: run_python(small_memory_reward, MEMORY_BOMB, limits=limits), range(8))
        )
    totals = []
    for result in results:
        assert result.exit_code == 0, result.stderr
        totals.append(check_one_bomb(json.loads(result.stdout), config))
    assert all(total <= config.memory_mb + config.sandbox.tmpfs_mb for total in totals), totals
    assert sum(totals) <= 8 * memory_bound_mb(config)
    assert_grader_still_works(small_memory_reward)


# ---------------------------------------------------------------- refusal and configuration


def test_refuses_to_run_unsandboxed_without_opt_in(monkeypatch):
    monkeypatch.setattr(sandbox_module, "select_backend", lambda _: (None, "pretend: not root"))
    with pytest.raises(SandboxUnavailableError, match="allow_unsandboxed"):
        open_sandbox(SandboxConfig(), ["/usr/bin/python3"])
    with pytest.raises(SandboxUnavailableError, match="pretend: not root"):
        CodeReward(CodeRewardConfig(num_workers=1))


def test_an_ordinary_user_without_user_namespaces_gets_a_one_line_reason(monkeypatch, tmp_path):
    knob = tmp_path / "max_user_namespaces"
    knob.write_text("0\n")
    blocker = (str(knob), "0", "user namespaces are disabled (user.max_user_namespaces=0)")
    monkeypatch.setattr(sandbox_module, "USERNS_BLOCKERS", (blocker,))
    monkeypatch.setattr(sandbox_module.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox_module, "bubblewrap", lambda: None)
    reason = f"not root, {blocker[2]} and bubblewrap (bwrap) is not installed"
    assert sandbox_module.select_backend() == (None, reason)
    with pytest.raises(SandboxUnavailableError) as refused:
        CodeReward(CodeRewardConfig(num_workers=1, languages=("python",)))
    message = str(refused.value)
    assert "\n" not in message
    assert reason in message
    assert "allow_unsandboxed=True" in message
    monkeypatch.setattr(sandbox_module, "bubblewrap", lambda: "/usr/bin/bwrap")
    assert sandbox_module.select_backend() == ("bwrap", None)  # bubblewrap may still work
    knob.write_text("15000\n")  # an allowed count: the user-namespace backend is chosen
    assert sandbox_module.select_backend() == ("userns", None)


def test_opt_in_runs_unsandboxed_and_says_so(monkeypatch):
    monkeypatch.setattr(sandbox_module, "select_backend", lambda _: (None, "pretend: not root"))
    config = CodeRewardConfig(
        num_workers=1, languages=("python",), sandbox=SandboxConfig(allow_unsandboxed=True)
    )
    with CodeReward(config) as reward:
        assert not reward.sandbox_report.isolated
        assert not reward.sandbox_report.fully_protected
        assert not reward.sandbox_report.network_isolated
        assert "namespaces (none): NO" in reward.sandbox_report.describe()
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
    with pytest.raises(ConfigError, match="code.sandbox.backend"):
        SandboxConfig(backend="docker")
