"""Starts one untrusted command inside fresh Linux namespaces (run as a script; importable for its tables).

``megatron_sdzero.rewards.sandbox`` executes this file with ``python -I -S``, passing a JSON spec in
``argv[1]``. It uses the standard library only (namespaces, mounts, keyrings and seccomp through
ctypes), so it works without site-packages and under Python 3.11 or later.

Process layout::

    launcher (grader's uid, new session, new mount/net/ipc/uts[/user] namespaces)
      `- init (pid 1 of a new pid namespace): builds the file system view, then waits
           `- program (no capabilities, rlimits, seccomp, fresh keyring): execve(argv)

Backends: ``"root"`` (the grader is root: the program runs as a throwaway uid from a pool),
``"userns"`` (an ordinary user: a new user namespace maps the grader's uid to 0 inside, so init may
mount; the program keeps that uid but loses every capability and the bounding set, with
``SECBIT_NOROOT`` locked, so its uid 0 grants nothing), ``"bwrap"`` (an ordinary user where only
bubblewrap may create user namespaces, e.g. under AppArmor's restriction: bwrap builds the
namespaces and the same view, and this file runs inside it as init) and ``"none"`` (the explicit
opt-in for hosts without namespaces: rlimits, seccomp, a fresh keyring and the uid drop when root).

The launcher forwards SIGTERM as SIGKILL to init. When init exits the kernel kills every process
left in the pid namespace, so nothing the program started can outlive the run. One JSON line per
event goes to the status fd: ``{"exit_code": n}`` or ``{"signal": n}`` (from init),
``{"setup_error": s}`` (the sandbox could not be built) or ``{"exec_error": s}`` (the sandbox is
fine, argv[0] could not start). The fd is close-on-exec, so the program cannot forge a status.

The file system the program sees is an allow-list: a fresh read-only tmpfs root holding read-only
binds of ``SYSTEM_PATHS`` and of the spec's ``expose`` paths (the interpreters' prefixes), the device
nodes in ``DEVICES``, a fresh /proc, one size-capped tmpfs on /tmp (/dev/shm and /var/tmp point to
it) and the run directory at /tmp/work. The host's root is detached, so nothing else (home
directories, data sets, sockets, /run, /sys) exists inside.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import signal
import struct
import sys

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MNT_DETACH = 0x2
# statvfs flags whose mount counterparts a remount must keep (the kernel locks them in a user namespace)
KEPT_MOUNT_FLAGS = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
# NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE and KEEP_CAPS, each locked: uid 0 can never regain caps
SECUREBITS_NO_ROOT = 0b11101111
LINUX_CAPABILITY_VERSION_3 = 0x20080522
KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_READ = 11
KEY_SPEC_SESSION_KEYRING = -3

# Syscall numbers and the audit arch of the architectures the sandbox supports.
ARCHES = {
    "x86_64": {
        "audit_arch": 0xC000003E,
        "pivot_root": 155,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "mmap": 9,
        "memfd_create": 319,
        "memfd_secret": 447,
        "shmget": 29,
        "msgget": 68,
        "io_uring_setup": 425,
        "unshare": 272,
        "setns": 308,
        "clone": 56,
        "clone3": 435,
    },
    "aarch64": {
        "audit_arch": 0xC00000B7,
        "pivot_root": 41,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "mmap": 222,
        "memfd_create": 279,
        "memfd_secret": 447,
        "shmget": 194,
        "msgget": 186,
        "io_uring_setup": 425,
        "unshare": 97,
        "setns": 268,
        "clone": 220,
        "clone3": 435,
    },
}
ARCH = ARCHES.get(platform.machine())
# Ways to hold memory that no rlimit counts: memfd and SysV segments (their pages outlive any
# mapping), message queues, io_uring (whose operations seccomp cannot see), shared anonymous
# mappings (munmap of all but one page keeps the whole object alive while RLIMIT_AS sees one page),
# and new namespaces: in a user namespace of its own a program may mount a tmpfs of any size.
# Also the key calls (after the launcher joined a fresh keyring): with the grader's uid (userns) a
# program could read a key the grader made user-readable, or fill the uid's key quota.
DENIED_SYSCALLS = (
    "memfd_create",
    "memfd_secret",
    "shmget",
    "msgget",
    "io_uring_setup",
    "unshare",
    "setns",
    "add_key",
    "request_key",
    "keyctl",
)
NEW_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
MAP_SHARED_ANONYMOUS = (0x21, 0x23)  # MAP_ANONYMOUS with MAP_SHARED or MAP_SHARED_VALIDATE
MAP_TYPE_AND_ANONYMOUS = 0x2F
X32_SYSCALL_BIT = 0x40000000

SANDBOX_WORKDIR = "/tmp/work"
SYSTEM_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
)
DEVICES = ("/dev/null", "/dev/full", "/dev/random", "/dev/urandom")  # no /dev/zero: MAP_SHARED of it is shmem
SYMLINKS = {
    "/dev/fd": "/proc/self/fd",
    "/dev/stdin": "/proc/self/fd/0",
    "/dev/stdout": "/proc/self/fd/1",
    "/dev/stderr": "/proc/self/fd/2",
    "/dev/shm": "/tmp",
    "/var/tmp": "/tmp",
}
NEW_ROOT = "/tmp"  # where the new root is assembled (on a fresh tmpfs) before pivot_root
# Processes sharing the program's uid in its user namespace: launcher and init; with bwrap, init only.
EXTRA_PROCESSES = {"root": 0, "userns": 2, "bwrap": 1, "none": 0}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    pass


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)}")
    return result


def _syscall(name: str, *args: object) -> int:
    if ARCH is None:
        raise SetupError(f"unsupported architecture {platform.machine()}")
    return _check(_libc.syscall(ctypes.c_long(ARCH[name]), *args), name)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda value: value.encode() if value is not None else None
    result = _libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))
    _check(result, f"mount {source} -> {target}")


def _prctl(option: int, value: int, value2: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(value2), 0, 0), f"prctl({option})")


def _write_status(status_fd: int, record: dict) -> None:
    try:
        os.write(status_fd, (json.dumps(record) + "\n").encode())
    except OSError:
        pass


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def enter_namespaces(backend: str) -> None:
    """New namespaces for this process (its next child becomes pid 1); "userns" maps our uid to 0."""
    uid, gid = os.getuid(), os.getgid()
    flags = NAMESPACES | (CLONE_NEWUSER if backend == "userns" else 0)
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")
    if backend == "userns":
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"0 {uid} 1")
        _write_file("/proc/self/gid_map", f"0 {gid} 1")


# ---------------------------------------------------------------- the file system view


def _kept_flags(path: str) -> int:
    current = os.statvfs(path).f_flag
    return sum(mount_flag for stat_flag, mount_flag in KEPT_MOUNT_FLAGS if current & stat_flag)


def _bind(source_fd: int, target: str, read_only: bool = True) -> None:
    _mount(f"/proc/self/fd/{source_fd}", target, None, MS_BIND)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | _kept_flags(target)
    _mount(None, target, None, flags | (MS_RDONLY if read_only else 0))


def _open_sources(paths: list[str]) -> list[tuple[str, int | str]]:
    """(path, O_PATH fd) for each existing path, or (path, link target) for symlinks. Opened before
    the new root covers /tmp, so sources below it (a run directory, an interpreter) still bind."""
    sources = []
    for path in paths:
        if os.path.islink(path):
            sources.append((path, os.readlink(path)))
        elif os.path.exists(path):
            sources.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC)))
    return sources


def _place(root: str, path: str, source: int | str) -> None:
    target = root + path
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if isinstance(source, str):
        os.symlink(source, target)
        return
    if os.path.isdir(f"/proc/self/fd/{source}"):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    if path.startswith("/dev/"):
        _mount(f"/proc/self/fd/{source}", target, None, MS_BIND)  # device nodes: keep them writable
    else:
        _bind(source, target)
    os.close(source)


def _covered(path: str, allowed: list[str]) -> bool:
    return any(path == parent or path.startswith(parent.rstrip("/") + "/") for parent in allowed)


def build_root(spec: dict) -> None:
    """Assembles the allow-listed view on a fresh tmpfs and makes it the root (init, before forking)."""
    os.umask(0o022)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    system = [path for path in SYSTEM_PATHS if os.path.lexists(path)]
    exposed = [os.path.realpath(path) for path in spec["expose"]]
    allowed = system + [path for path in dict.fromkeys(exposed) if not _covered(path, system)]
    sources = _open_sources(allowed + list(DEVICES))
    workdir_fd = os.open(spec["workdir"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    _mount("tmpfs", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    for path, source in sources:
        _place(NEW_ROOT, path, source)
    for path, target in SYMLINKS.items():
        _place(NEW_ROOT, path, target)
    scratch = NEW_ROOT + "/tmp"
    os.mkdir(scratch, 0o755)
    options = f"size={spec['tmpfs_bytes']},nr_inodes=4096,mode=1777"
    _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options)
    os.mkdir(NEW_ROOT + SANDBOX_WORKDIR, 0o755)
    _bind(workdir_fd, NEW_ROOT + SANDBOX_WORKDIR, read_only=not spec["workdir_writable"])
    os.close(workdir_fd)
    os.mkdir(NEW_ROOT + "/proc", 0o555)
    _mount("proc", NEW_ROOT + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(NEW_ROOT)
    _syscall("pivot_root", b".", b".")
    _check(_libc.umount2(b".", ctypes.c_int(MNT_DETACH)), "umount the host root")  # detach the host
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


# ---------------------------------------------------------------- the program's process


def apply_limits(limits: dict) -> None:
    cpu = limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for name, key in (
        ("RLIMIT_AS", "address_space_bytes"),
        ("RLIMIT_FSIZE", "file_size_bytes"),
        ("RLIMIT_NOFILE", "open_files"),
        ("RLIMIT_NPROC", "processes"),
        ("RLIMIT_STACK", "stack_bytes"),
    ):
        resource.setrlimit(getattr(resource, name), (limits[key], limits[key]))
    for name in ("RLIMIT_CORE", "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE"):
        resource.setrlimit(getattr(resource, name), (0, 0))


def _drop_bounding_set() -> None:
    capability = 0
    while _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(capability), 0, 0, 0) == 0:
        capability += 1
    if capability == 0:
        raise SetupError(f"PR_CAPBSET_DROP: {os.strerror(ctypes.get_errno())}")


def _clear_capabilities() -> None:
    header = struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(header, bytes(24)), "capset")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def drop_privileges(backend: str, uid: int) -> None:
    """Root: the throwaway uid (which clears the capabilities). userns: uid 0 kept, every capability
    gone for good (bounding set, ambient set, and SECBIT_NOROOT so execve grants none back)."""
    if os.geteuid() != 0:
        return  # the unsandboxed opt-in as an ordinary user: nothing to drop
    if backend == "userns":
        _prctl(PR_SET_SECUREBITS, SECUREBITS_NO_ROOT)
        _drop_bounding_set()
        _clear_capabilities()
        return
    _drop_bounding_set()
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def join_fresh_session_keyring() -> None:
    """An empty anonymous session keyring, so the grader's keys are not possessed by the program."""
    try:
        _syscall("keyctl", KEYCTL_JOIN_SESSION_KEYRING, None)
    except SetupError:
        if ctypes.get_errno() != 38:  # ENOSYS: a kernel without keys has nothing to inherit
            raise


def seccomp_filter() -> bytes:
    """A classic BPF program: kill foreign ABIs; EPERM for DENIED_SYSCALLS, for clone with a new
    namespace and for shared anonymous mmap; ENOSYS for clone3 (its flags are out of the filter's
    sight; glibc then falls back to clone)."""
    assert ARCH is not None
    program: list[tuple[int, int | str, int | str, int]] = []  # (code, true target, false target, k)
    labels: dict[str, int] = {}
    load, jeq, jge, jset, and_, ret = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06

    def emit(code: int, k: int, true: int | str = 0, false: int | str = 0) -> None:
        program.append((code, true, false, k))

    emit(load, 4)  # seccomp_data.arch
    emit(jeq, ARCH["audit_arch"], 1, 0)
    emit(ret, 0x80000000)  # SECCOMP_RET_KILL_PROCESS
    emit(load, 0)  # seccomp_data.nr
    if platform.machine() == "x86_64":
        emit(jge, X32_SYSCALL_BIT, "deny", 0)
    for name in DENIED_SYSCALLS:
        emit(jeq, ARCH[name], "deny", 0)
    emit(jeq, ARCH["clone3"], "no_such_call", 0)
    emit(jeq, ARCH["clone"], "clone", 0)
    emit(jeq, ARCH["mmap"], "mmap", "allow")
    labels["clone"] = len(program)
    emit(load, 16)  # low half of args[0], the clone flags (little-endian)
    emit(jset, NEW_NAMESPACE_FLAGS, "deny", "allow")
    labels["mmap"] = len(program)
    emit(load, 16 + 3 * 8)  # low half of args[3], the mmap flags
    emit(and_, MAP_TYPE_AND_ANONYMOUS)
    for flags in MAP_SHARED_ANONYMOUS:
        emit(jeq, flags, "deny", 0)
    labels["allow"] = len(program)
    emit(ret, 0x7FFF0000)  # SECCOMP_RET_ALLOW
    labels["deny"] = len(program)
    emit(ret, 0x00050000 | 1)  # SECCOMP_RET_ERRNO | EPERM
    labels["no_such_call"] = len(program)
    emit(ret, 0x00050000 | 38)  # SECCOMP_RET_ERRNO | ENOSYS
    resolve = lambda at, target: labels[target] - at - 1 if isinstance(target, str) else target
    return b"".join(
        struct.pack("HBBI", code, resolve(at, true), resolve(at, false), k)
        for at, (code, true, false, k) in enumerate(program)
    )


def install_seccomp() -> None:
    filters = ctypes.create_string_buffer(seccomp_filter())
    fprog = struct.pack("HxxxxxxP", len(filters.raw) // 8, ctypes.addressof(filters))
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    result = _libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.c_char_p(fprog), 0, 0)
    _check(result, "seccomp")


def _exec_program(spec: dict, status_fd: int) -> None:
    """Runs in the program's process; never returns."""
    try:
        apply_limits(spec["limits"])
        drop_privileges(spec["backend"], spec["uid"])
        join_fresh_session_keyring()
        install_seccomp()
        os.chdir(SANDBOX_WORKDIR if spec["backend"] != "none" else spec["workdir"])
    except BaseException as error:  # report anything, then die
        _write_status(status_fd, {"setup_error": f"{type(error).__name__}: {error}"})
        os._exit(127)
    try:
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as error:
        _write_status(status_fd, {"exec_error": f"{spec['argv'][0]}: {error}"})
    os._exit(127)


def _wait_for_program(program_pid: int) -> dict:
    """Reaps every child (init adopts orphans) until the program itself is gone."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return {"setup_error": "program vanished"}
        if pid != program_pid:
            continue
        if os.WIFSIGNALED(status):
            return {"signal": os.WTERMSIG(status)}
        return {"exit_code": os.WEXITSTATUS(status)}


def _run_init(spec: dict, status_fd: int) -> None:
    """pid 1 of the new pid namespace (or the plain child without isolation); never returns."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # Not dumpable: a program with init's uid (userns) must not ptrace init, which keeps its
        # capabilities, nor read its /proc files. The capability check refuses that already; this is a
        # second lock. The program's execve makes the program itself dumpable again.
        _prctl(PR_SET_DUMPABLE, 0)
        if spec["backend"] != "none" and os.getsid(0) != os.getpid():
            # A session of its own: killpg(0) from a program with the launcher's uid (userns) must
            # not reach the launcher, whose process group the grader started (bwrap made one).
            os.setsid()
        if spec["backend"] in ("root", "userns"):
            build_root(spec)
        program_pid = os.fork()
        if program_pid == 0:
            _exec_program(spec, status_fd)
        _write_status(status_fd, _wait_for_program(program_pid))
    except BaseException as error:
        _write_status(status_fd, {"setup_error": f"{type(error).__name__}: {error}"})
    os._exit(0)


def bwrap_argv(spec: dict) -> list[str]:
    """bubblewrap building the same view as ``build_root``; inside it, this file runs as init."""
    python = os.path.realpath(sys.executable)
    system = [path for path in SYSTEM_PATHS if os.path.lexists(path)]
    exposed = [os.path.realpath(path) for path in (*spec["expose"], os.path.dirname(os.path.dirname(python)))]
    # --as-pid-1: our init, not bwrap's reaper, is pid 1, so the program can neither kill it nor read it
    argv = [
        spec["bwrap"],
        "--unshare-all",
        "--unshare-user",
        "--as-pid-1",
        "--die-with-parent",
        "--new-session",
    ]
    argv += ["--cap-drop", "ALL", "--clearenv"]
    for path in system + [path for path in dict.fromkeys(exposed) if not _covered(path, system)]:
        argv += ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]
    for device in DEVICES:
        argv += ["--dev-bind", device, device]
    for path, target in SYMLINKS.items():
        argv += ["--symlink", target, path]
    argv += ["--perms", "1777", "--size", str(spec["tmpfs_bytes"]), "--tmpfs", "/tmp"]
    argv += ["--bind" if spec["workdir_writable"] else "--ro-bind", spec["workdir"], SANDBOX_WORKDIR]
    argv += ["--proc", "/proc", "--remount-ro", "/", "--chdir", "/"]
    with open(__file__) as source:
        inner = json.dumps({**spec, "stage": "init"})
        return [*argv, "--", python, "-I", "-S", "-c", source.read(), inner]


def _exec_bwrap(spec: dict, status_fd: int) -> None:
    """The launcher's child with the bwrap backend; never returns."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.set_inheritable(status_fd, True)  # for init inside bwrap
        argv = bwrap_argv(spec)
        os.execv(argv[0], argv)
    except BaseException as error:
        _write_status(status_fd, {"setup_error": f"bwrap: {type(error).__name__}: {error}"})
    os._exit(127)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    spec = json.loads(sys.argv[1])
    status_fd = spec["status_fd"]
    os.set_inheritable(status_fd, False)
    if spec.get("stage") == "init":  # inside bwrap, which built the namespaces and the view
        _run_init(spec, status_fd)
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != spec["parent_pid"]:
            os._exit(1)  # the grader died before we armed the death signal
        if spec["backend"] in ("root", "userns"):
            enter_namespaces(spec["backend"])
    except BaseException as error:
        _write_status(status_fd, {"setup_error": f"{type(error).__name__}: {error}"})
        os._exit(0)

    # SIGTERM stays blocked until the handler knows whom to kill; init unblocks it after resetting it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    init_pid = os.fork()
    if init_pid == 0:
        (_exec_bwrap if spec["backend"] == "bwrap" else _run_init)(spec, status_fd)
    signal.signal(signal.SIGTERM, lambda *_: _kill_quietly(init_pid))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    status = 0
    while True:
        try:
            status = os.waitpid(init_pid, 0)[1]
            break
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    if spec["backend"] == "bwrap" and status != 0:  # init inside always exits 0: bwrap itself failed
        _write_status(status_fd, {"setup_error": f"bwrap failed ({os.waitstatus_to_exitcode(status)})"})
    os._exit(0)


if __name__ == "__main__":
    main()
