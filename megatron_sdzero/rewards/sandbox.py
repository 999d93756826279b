"""A Linux sandbox for model-written programs: namespaces, an allow-listed file system, no capabilities.

Each run gets fresh mount, pid, network, IPC and UTS namespaces (see ``sandbox_launcher.py``), a root
file system built from read-only binds of an allow-list (system directories and the interpreters'
prefixes, nothing of /root, /home, /work, /tmp, /run or /data), one size-capped tmpfs on /tmp, a
fresh session keyring, rlimits, a seccomp filter against memory that no rlimit counts, and a
wall-clock deadline after which the whole pid namespace is killed. stdout and stderr are read with a
byte cap; exceeding it kills the run.

Two backends build it: as root, the program runs as a throwaway uid from a pool (so ``RLIMIT_NPROC``
counts exactly this run); as an ordinary user, an unprivileged user namespace maps the grader's uid to
0 inside, and the program runs with every capability dropped. Where neither works the sandbox refuses
to start, naming what is missing, unless ``SandboxConfig.allow_unsandboxed`` is set, in which case
programs run with rlimits, seccomp, a fresh keyring and a private working directory only, with full
network and file system access.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import json
import logging
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import megatron_sdzero.rewards.sandbox_launcher as sandbox_launcher

logger = logging.getLogger(__name__)

LAUNCHER = Path(sandbox_launcher.__file__)
SANDBOX_WORKDIR = sandbox_launcher.SANDBOX_WORKDIR
Backend = Literal["root", "userns", "bwrap", "none"]
BACKEND_CHOICES = ("auto", "root", "userns", "bwrap")
STDERR_KEPT_BYTES = 16 * 1024
PROGRAM_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONHASHSEED": "0",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


class SandboxUnavailableError(RuntimeError):
    """The host cannot isolate programs and the user did not opt in to running them unsandboxed."""


class SandboxRunError(RuntimeError):
    """The sandbox itself failed (not the program): grading cannot give a trustworthy answer."""


@dataclass
class SandboxConfig:
    allow_unsandboxed: bool = False
    """Run programs without namespaces when isolation is impossible (trusted code only)."""
    backend: str = "auto"
    """auto: root as root, else an unprivileged user namespace, else bubblewrap; or name one of
    root, userns, bwrap."""
    read_only_paths: tuple[str, ...] = ()
    """Host paths shown read-only inside, besides the system directories and the interpreters'
    prefixes (e.g. a compiler installed outside /usr). Never a data directory."""
    uid_base: int = 1_700_000_000
    """First uid (and gid) of the pool (root backend). Must belong to no real user."""
    uid_count: int = 1024
    """Pool size. One uid is held per concurrent run, across all processes on the host (file locks)."""
    tmpfs_mb: int = 64
    """Size of a run's one private tmpfs: /tmp, with /var/tmp and /dev/shm pointing into it."""
    work_root: str | None = None
    """Where run directories are created (default: the system temp dir)."""

    def __post_init__(self) -> None:
        from megatron_sdzero.config import ConfigError

        if self.backend not in BACKEND_CHOICES:
            raise ConfigError(f"code.sandbox.backend: {self.backend!r}; choose from {list(BACKEND_CHOICES)}")


@dataclass(frozen=True)
class ResourceLimits:
    wall_timeout_s: float
    cpu_time_s: int
    memory_mb: int
    """Address-space limit per process (RLIMIT_AS); a run holds at most processes x memory_mb + tmpfs."""
    file_size_mb: int
    open_files: int
    processes: int
    """Processes and threads of the run, the program included (RLIMIT_NPROC)."""
    max_output_bytes: int
    """Cap on stdout and on stderr; exceeding either kills the run."""
    stack_mb: int = 64


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    """The first ``STDERR_KEPT_BYTES`` of stderr."""
    timed_out: bool
    output_limit_exceeded: bool
    setup_error: str | None
    """The sandbox could not be built (a host problem, not the program's fault)."""
    exec_error: str | None
    """argv[0] could not be executed inside the sandbox."""
    wall_s: float

    @property
    def succeeded(self) -> bool:
        failed = self.timed_out or self.output_limit_exceeded or self.setup_error or self.exec_error
        return self.exit_code == 0 and not failed

    def failure_reason(self) -> str:
        if self.setup_error:
            return "sandbox_error"
        if self.exec_error:
            return "exec_error"
        if self.timed_out:
            return "timeout"
        if self.output_limit_exceeded:
            return "output_limit"
        if self.signal == signal.SIGXCPU:
            return "cpu_time_limit"
        if self.signal == signal.SIGXFSZ:
            return "file_size_limit"
        return "ok" if self.succeeded else "runtime_error"


class _UidPool:
    """Hands out uids so that no two concurrent runs on this host share one.

    Exclusivity across processes comes from ``flock`` on one lock file per uid; uids are handed out
    round-robin so a uid is not reused right after its run (its dying processes need a moment).
    """

    def __init__(self, base: int, count: int) -> None:
        self._base = base
        self._count = count
        self._cursor = itertools.count(int.from_bytes(os.urandom(2), "little"))
        self._cursor_lock = threading.Lock()
        self._lock_dir = Path(tempfile.gettempdir()) / f"megatron_sdzero_sandbox_uids.{os.geteuid()}"
        self._lock_dir.mkdir(mode=0o700, exist_ok=True)
        info = self._lock_dir.lstat()
        if info.st_uid != os.geteuid() or not self._lock_dir.is_dir() or info.st_mode & 0o077:
            raise SandboxUnavailableError(f"{self._lock_dir} is not a private directory of this user")

    @contextmanager
    def acquire(self) -> Iterator[int]:
        while True:
            for _ in range(self._count):
                with self._cursor_lock:
                    uid = self._base + next(self._cursor) % self._count
                lock_fd = os.open(self._lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(lock_fd)
                    continue
                try:
                    yield uid
                finally:
                    os.close(lock_fd)
                return
            time.sleep(0.01)


USERNS_BLOCKERS = (
    ("/proc/sys/user/max_user_namespaces", "0", "user namespaces are disabled (user.max_user_namespaces=0)"),
    (
        "/proc/sys/kernel/unprivileged_userns_clone",
        "0",
        "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0)",
    ),
    (
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
        "1",
        "AppArmor denies unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1)",
    ),
)
NO_ISOLATION_HINT = (
    "run the grader as root or on a node that allows unprivileged user namespaces (or bubblewrap), or set "
    "allow_unsandboxed=True to run it without isolation (trusted code only: it gets the network and "
    "the grader's files)"
)


def select_backend(preferred: str = "auto") -> tuple[Backend | None, str | None]:
    """The namespace backend this host should support, or (None, why not); checked without running."""
    if preferred not in BACKEND_CHOICES:
        return None, f"sandbox.backend: {preferred!r}; choose from {list(BACKEND_CHOICES)}"
    if not sys.platform.startswith("linux"):
        return None, f"namespaces need Linux, this is {sys.platform}"
    if sandbox_launcher.ARCH is None:
        return None, f"the sandbox supports x86_64 and aarch64, this is {platform.machine()}"
    root = os.geteuid() == 0
    if preferred in ("auto", "root") and root:
        return "root", None
    if preferred == "root" or (preferred != "auto" and root):
        return None, f"the {preferred} backend is for {'root' if preferred == 'root' else 'ordinary users'}"
    blocker = _userns_blocker() if preferred in ("auto", "userns") else None
    if preferred == "userns" or (preferred == "auto" and blocker is None):
        return ("userns", None) if blocker is None else (None, f"not root, and {blocker}")
    if bubblewrap() is None:
        reason = f"not root, {blocker} and" if blocker else "not root, and"
        return None, f"{reason} bubblewrap (bwrap) is not installed"
    return "bwrap", None


def _userns_blocker() -> str | None:
    for path, blocking, reason in USERNS_BLOCKERS:
        try:
            if Path(path).read_text().strip() == blocking:
                return reason
        except OSError:
            continue  # an absent knob does not block
    return None


def bubblewrap() -> str | None:
    return shutil.which("bwrap")


def isolation_unavailable_reason() -> str | None:
    """Why this host cannot build the namespace sandbox, or None if it should."""
    return select_backend()[1]


class Sandbox:
    """Runs argv in a per-run sandbox. Thread-safe: call ``run`` from as many threads as you like.

    Prefer ``open_sandbox``, which also verifies the protections and falls back only on opt-in.
    """

    def __init__(
        self, config: SandboxConfig | None = None, backend: Backend | None = None, expose: Sequence[str] = ()
    ) -> None:
        """backend: None picks one for this host and ``config.backend``; "none" runs without namespaces.
        expose: host directories (interpreters' prefixes) shown read-only inside, besides the system
        allow-list and ``config.read_only_paths``; each is shown alone, its parents stay hidden."""
        self.config = config or SandboxConfig()
        if backend is None:
            backend, reason = select_backend(self.config.backend)
            if backend is None:
                raise SandboxUnavailableError(f"cannot sandbox model-written code: {reason}")
        self.backend: Backend = backend
        paths = (*expose, *self.config.read_only_paths)
        self.expose = tuple(dict.fromkeys(os.path.realpath(path) for path in paths))
        if "/" in self.expose:
            raise ValueError("expose: '/' would show the whole host file system to the program")
        self._uids = _UidPool(self.config.uid_base, self.config.uid_count) if os.geteuid() == 0 else None

    @property
    def isolated(self) -> bool:
        return self.backend != "none"

    @contextmanager
    def workdir(self) -> Iterator[Path]:
        """A fresh host directory, bind-mounted as the program's working directory /tmp/work."""
        path = Path(tempfile.mkdtemp(prefix="sdzero-run-", dir=self.config.work_root))
        try:
            path.chmod(0o755)
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def run(
        self,
        argv: Sequence[str],
        workdir: Path,
        limits: ResourceLimits,
        stdin: bytes = b"",
        workdir_writable: bool = False,
    ) -> SandboxResult:
        """Runs argv (argv[0] an absolute path) with cwd = workdir; returns when every process is gone."""
        if self._uids is None:
            return self._run_as(argv, workdir, limits, stdin, workdir_writable, uid=os.geteuid())
        with self._uids.acquire() as uid:
            return self._run_as(argv, workdir, limits, stdin, workdir_writable, uid=uid)

    def _run_as(
        self,
        argv: Sequence[str],
        workdir: Path,
        limits: ResourceLimits,
        stdin: bytes,
        workdir_writable: bool,
        uid: int,
    ) -> SandboxResult:
        if os.geteuid() == 0:
            os.chown(workdir, uid, uid)  # owner of what a writable run creates; read-only runs only read
        status_read, status_write = os.pipe()
        spec = {
            "argv": list(argv),
            "env": PROGRAM_ENV,
            "workdir": str(workdir),
            "workdir_writable": workdir_writable,
            "backend": self.backend,
            "uid": uid,
            "limits": _limits_spec(limits, self.backend),
            "tmpfs_bytes": self.config.tmpfs_mb << 20,
            "status_fd": status_write,
            "parent_pid": os.getpid(),
            "expose": list(self.expose),
            "bwrap": bubblewrap() if self.backend == "bwrap" else None,
        }
        started = time.monotonic()
        with _stdin_file(stdin) as stdin_file:
            try:
                process = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(spec)],
                    stdin=stdin_file,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=(status_write,),
                    start_new_session=True,
                    env={},  # the grader's environment (tokens, keys) never enters the sandbox's tree
                )
            finally:
                os.close(status_write)
        try:
            with os.fdopen(status_read, "rb") as status_pipe:
                deadline = started + limits.wall_timeout_s
                collected = _collect_output(process, status_pipe, limits, deadline, self.isolated)
        except BaseException:
            _terminate(process)  # e.g. KeyboardInterrupt: leave nothing running
            raise
        if collected.must_kill:
            _terminate(process)
        process.wait()
        if not self.isolated:
            _kill_group(process.pid)  # without a pid namespace the program may outlive its init
        return _build_result(collected, time.monotonic() - started)


PROBE_SCRIPT = r"""
import ctypes, errno, json, mmap, os, resource, socket
def connect_errno():
    try:
        socket.create_connection(("127.0.0.1", 9), timeout=1).close()
    except OSError as error:
        return error.errno
    return 0
def denied(attempt):
    try:
        attempt()
    except PermissionError:
        return True
    return False
def capabilities():
    status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines())
    return {name: int(status[name], 16) for name in ("CapEff", "CapPrm", "CapBnd", "CapAmb")}
libc = ctypes.CDLL(None, use_errno=True)
limits = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC")
print(json.dumps({
    "uid": os.getuid(),
    "visible_pids": sum(name.isdigit() for name in os.listdir("/proc")),
    "interfaces": [name for _, name in socket.if_nameindex()],
    # the namespace's own lo: down (ENETUNREACH), or up with nothing listening (bwrap)
    "loopback_unreachable": connect_errno() in (errno.ENETUNREACH, errno.ECONNREFUSED),
    "read_only_root": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
    "root_entries": sorted(os.listdir("/")),
    "tmp_entries": sorted(os.listdir("/tmp")),
    "capabilities": capabilities(),
    "session_keyring": libc.syscall(KEYCTL_NR, 0, -3, 0),
    "memfd_denied": denied(lambda: os.memfd_create("probe")),
    "shared_anonymous_denied": denied(lambda: mmap.mmap(-1, 4096)),
    "new_user_namespace_denied": libc.unshare(0x10000000) != 0 and ctypes.get_errno() == errno.EPERM,
    "rlimits": {name: resource.getrlimit(getattr(resource, name))[1] for name in limits},
}))
"""

PROBE_LIMITS = ResourceLimits(
    wall_timeout_s=20.0,
    cpu_time_s=10,
    memory_mb=1024,
    file_size_mb=1,
    open_files=64,
    processes=8,
    max_output_bytes=1 << 16,
)


@dataclass(frozen=True)
class SandboxReport:
    """What a probe program observed from inside the sandbox (so each protection is checked, not assumed)."""

    isolated: bool
    python: str
    uid: int
    own_pid_namespace: bool
    network_isolated: bool
    read_only_root: bool
    private_tmp: bool
    rlimits: dict[str, int]
    backend: str = "none"
    no_capabilities: bool = False
    """No effective, permitted, bounding or ambient capability (uid 0 of a user namespace is powerless)."""
    allow_listed_view: bool = False
    """The root directory holds only the allow-listed entries."""
    fresh_keyring: bool = False
    """The session keyring is not the grader's (or, as the filter ensures, key calls are refused)."""
    memory_escapes_denied: bool = False
    """memfd_create, shared anonymous mmap and new namespaces (a tmpfs of its own) are refused:
    memory RLIMIT_AS would not count."""

    @property
    def fully_protected(self) -> bool:
        checks = (
            self.own_pid_namespace,
            self.network_isolated,
            self.read_only_root,
            self.private_tmp,
            self.no_capabilities,
            self.allow_listed_view,
            self.fresh_keyring,
            self.memory_escapes_denied,
        )
        unprivileged = self.uid != 0 or self.backend == "userns"
        return self.isolated and unprivileged and all(checks)

    def describe(self) -> str:
        uid = f"uid {self.uid}" if self.backend != "userns" else "uid 0 of its own user namespace"
        flags = {
            f"namespaces ({self.backend})": self.isolated,
            uid: self.uid != 0 or self.backend == "userns",
            "no capabilities": self.no_capabilities,
            "own pid namespace": self.own_pid_namespace,
            "no network": self.network_isolated,
            "allow-listed read-only file system": self.allow_listed_view and self.read_only_root,
            "private /tmp": self.private_tmp,
            "fresh keyring": self.fresh_keyring,
            "memfd/shared memory denied": self.memory_escapes_denied,
        }
        listed = ", ".join(f"{name}: {'yes' if on else 'NO'}" for name, on in flags.items())
        limits = ", ".join(f"{name.removeprefix('RLIMIT_')}={value}" for name, value in self.rlimits.items())
        return f"{listed}; rlimits {limits}; sandbox python {self.python}"


class ProbeExecError(RuntimeError):
    """The probe interpreter could not run inside the sandbox (try another one)."""


def expected_root_entries(sandbox: Sandbox) -> set[str]:
    """Top-level names the allow-listed root may hold."""
    placed = (
        *sandbox_launcher.SYSTEM_PATHS,
        *sandbox_launcher.DEVICES,
        *sandbox_launcher.SYMLINKS,
        *sandbox.expose,
    )
    return {path.split("/")[1] for path in placed} | {"proc", "tmp"}


def session_keyring_id() -> int:
    """The serial of this process's session keyring (-1 where the kernel has no keys)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    arch = sandbox_launcher.ARCH
    if arch is None:
        return -1
    session = sandbox_launcher.KEY_SPEC_SESSION_KEYRING
    return libc.syscall(ctypes.c_long(arch["keyctl"]), sandbox_launcher.KEYCTL_GET_KEYRING_ID, session, 0)


def probe(sandbox: Sandbox, python: str) -> SandboxReport:
    """Runs a probe under ``python`` in ``sandbox`` and reports what is actually enforced."""
    keyctl = sandbox_launcher.ARCH["keyctl"] if sandbox_launcher.ARCH else -1
    with sandbox.workdir() as workdir:
        (workdir / "probe.py").write_text(PROBE_SCRIPT.replace("KEYCTL_NR", str(keyctl)))
        result = sandbox.run([python, "-I", "probe.py"], workdir, PROBE_LIMITS)
    if result.setup_error:
        raise SandboxUnavailableError(f"the sandbox could not be built: {result.setup_error}")
    if not result.succeeded:
        why = result.exec_error or result.stderr.decode(errors="replace")[-500:] or result.failure_reason()
        raise ProbeExecError(f"{python} does not run in the sandbox: {why}")
    seen = json.loads(result.stdout)
    grader_keyring = session_keyring_id()
    return SandboxReport(
        isolated=sandbox.isolated,
        python=python,
        uid=seen["uid"],
        own_pid_namespace=seen["visible_pids"] <= 3,
        network_isolated=seen["interfaces"] == ["lo"] and seen["loopback_unreachable"],
        read_only_root=seen["read_only_root"],
        private_tmp=seen["tmp_entries"] == [SANDBOX_WORKDIR.removeprefix("/tmp/")],
        rlimits=seen["rlimits"],
        backend=sandbox.backend,
        no_capabilities=not any(seen["capabilities"].values()),
        allow_listed_view=set(seen["root_entries"]) <= expected_root_entries(sandbox),
        fresh_keyring=seen["session_keyring"] != grader_keyring or grader_keyring < 0,
        memory_escapes_denied=all(
            seen[key] for key in ("memfd_denied", "shared_anonymous_denied", "new_user_namespace_denied")
        ),
    )


def open_sandbox(
    config: SandboxConfig, python_candidates: Sequence[str], expose: Sequence[str] = ()
) -> tuple[Sandbox, SandboxReport]:
    """The strongest sandbox this host supports, verified by a probe under the first working python.

    Raises ``SandboxUnavailableError`` if isolation fails and ``allow_unsandboxed`` is not set, and
    ``ProbeExecError`` if no candidate interpreter can run inside the sandbox.
    """
    backend, reason = select_backend(config.backend)
    if backend is not None:
        try:
            return _probe_first_working(config, backend, python_candidates, expose)
        except SandboxUnavailableError as error:
            reason = f"{'not root, and ' if backend != 'root' else ''}{error}"
        if backend == "userns" and config.backend == "auto" and bubblewrap() is not None:
            try:  # e.g. AppArmor lets only bwrap create user namespaces
                return _probe_first_working(config, "bwrap", python_candidates, expose)
            except SandboxUnavailableError as error:
                reason = f"{reason}; bubblewrap failed too: {error}"
    if not config.allow_unsandboxed:
        raise SandboxUnavailableError(f"cannot sandbox model-written code: {reason}; {NO_ISOLATION_HINT}.")
    logger.warning("running model-written code WITHOUT a sandbox (allow_unsandboxed=True): %s", reason)
    return _probe_first_working(config, "none", python_candidates, expose)


def install_prefix(executable: str) -> str:
    """/opt/py/bin/python3 -> /opt/py (after following symlinks)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(executable)))


def _probe_first_working(
    config: SandboxConfig, backend: Backend, python_candidates: Sequence[str], expose: Sequence[str]
) -> tuple[Sandbox, SandboxReport]:
    """A sandbox showing the first candidate python that runs in it (and that python's prefix)."""
    failures = []
    for python in python_candidates:
        prefix = install_prefix(python)
        sandbox = Sandbox(config, backend, [*expose, prefix] if prefix != "/" else expose)
        try:
            return sandbox, probe(sandbox, python)
        except ProbeExecError as error:
            failures.append(str(error))
    raise ProbeExecError("no Python interpreter runs inside the sandbox:\n" + "\n".join(failures))


@dataclass
class _Collected:
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    status: bytearray = field(default_factory=bytearray)
    timed_out: bool = False
    output_limit_exceeded: bool = False

    @property
    def must_kill(self) -> bool:
        return self.timed_out or self.output_limit_exceeded


def _collect_output(
    process: subprocess.Popen, status_pipe: BinaryIO, limits: ResourceLimits, deadline: float, isolated: bool
) -> _Collected:
    """Reads stdout, stderr and the status pipe to EOF, until the deadline or an output cap."""
    collected = _Collected()
    stderr_seen = 0
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, collected.stdout)
    selector.register(process.stderr, selectors.EVENT_READ, collected.stderr)
    selector.register(status_pipe, selectors.EVENT_READ, collected.status)
    try:
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                collected.timed_out = True
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    if key.fileobj is status_pipe and not isolated:
                        _kill_group(process.pid)  # orphans would keep stdout open; no pid namespace here
                    continue
                if key.data is collected.stderr:
                    stderr_seen += len(chunk)
                    over_cap = stderr_seen > limits.max_output_bytes
                    chunk = chunk[: max(0, STDERR_KEPT_BYTES - len(collected.stderr))]
                else:
                    over_cap = len(key.data) + len(chunk) > limits.max_output_bytes
                key.data.extend(chunk)
                if over_cap:
                    collected.output_limit_exceeded = True
                    return collected
    finally:
        selector.close()
        process.stdout.close()
        process.stderr.close()
    return collected


def _build_result(collected: _Collected, wall_s: float) -> SandboxResult:
    exit_code = signal_number = setup_error = exec_error = None
    for line in bytes(collected.status).decode(errors="replace").splitlines():
        record = json.loads(line)
        exit_code = record.get("exit_code", exit_code)
        signal_number = record.get("signal", signal_number)
        setup_error = record.get("setup_error", setup_error)
        exec_error = record.get("exec_error", exec_error)
    if exit_code is None and signal_number is None and setup_error is None and not collected.must_kill:
        setup_error = "the sandbox launcher exited without a status"
    return SandboxResult(
        exit_code=exit_code,
        signal=signal_number,
        stdout=bytes(collected.stdout),
        stderr=bytes(collected.stderr),
        timed_out=collected.timed_out,
        output_limit_exceeded=collected.output_limit_exceeded,
        setup_error=setup_error,
        exec_error=exec_error,
        wall_s=wall_s,
    )


def _limits_spec(limits: ResourceLimits, backend: Backend) -> dict[str, int]:
    # in a user namespace the launcher and init count towards the program's RLIMIT_NPROC
    extra = sandbox_launcher.EXTRA_PROCESSES[backend]
    return {
        "cpu_s": limits.cpu_time_s,
        "address_space_bytes": limits.memory_mb << 20,
        "file_size_bytes": limits.file_size_mb << 20,
        "open_files": limits.open_files,
        "processes": limits.processes + extra,
        "stack_bytes": limits.stack_mb << 20,
    }


@contextmanager
def _stdin_file(data: bytes) -> Iterator[int]:
    """An fd on a sealed memfd holding data (no writer thread, no pipe deadlock). Sealed, because a
    program with the grader's uid (userns) could reopen a plain file through /proc/self/fd/0 for
    writing; the seals forbid any write, growth or shrinking whatever the opener."""
    fd = os.memfd_create("sdzero-stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def _terminate(process: subprocess.Popen) -> None:
    """SIGTERM makes the launcher SIGKILL the namespace's init, which takes every process with it."""
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)


def _kill_group(process_group: int) -> None:
    try:
        os.killpg(process_group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
