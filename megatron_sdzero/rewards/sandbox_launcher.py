"""Starts one untrusted command inside fresh Linux namespaces (run as a script, not imported).

``megatron_sdzero.rewards.sandbox`` executes this file with ``python -I -S`` as root, passing a JSON
spec in ``argv[1]``. It uses the standard library only, so it works without site-packages.

Process layout::

    launcher (root, new session, new mount/net/ipc/uts namespaces)
      `- init (pid 1 of a new pid namespace, root): mounts, then waits
           `- program (sandbox uid, rlimits, no_new_privs): execve(argv)

The launcher forwards SIGTERM as SIGKILL to init. When init exits the kernel kills every process
left in the pid namespace, so nothing the program started can outlive the run. One JSON line per
event goes to the status fd: ``{"exit_code": n}`` or ``{"signal": n}`` (from init),
``{"setup_error": s}`` (the sandbox could not be built) or ``{"exec_error": s}`` (the sandbox is
fine, argv[0] could not start). The fd is close-on-exec, so the program cannot forge a status.

Mounts in the new namespace: everything inherited read-only, fresh /proc, private tmpfs on /tmp,
/var/tmp and /dev/shm, an empty /run, the run directory at /tmp/work, and optionally one exposed
directory (the interpreter's prefix) made visible through an ancestor the sandbox uid cannot enter.

With ``"isolate": false`` (the explicit opt-in for hosts without namespaces) the same layout runs
without namespaces or mounts: rlimits, a uid drop when root, and the caller's process group only.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import signal
import sys

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

SANDBOX_WORKDIR = "/tmp/work"
PRIVATE_TMPFS_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# Read-only mounts still let a program connect() to the host's unix sockets (dbus, databases): hide them.
HIDDEN_DIRS = ("/run",)
NAMESPACE_FLAGS = ("CLONE_NEWNS", "CLONE_NEWNET", "CLONE_NEWPID", "CLONE_NEWIPC", "CLONE_NEWUTS")

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda value: value.encode() if value is not None else None
    result = _libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))
    _check(result, f"mount {source} -> {target}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def _write_status(status_fd: int, record: dict) -> None:
    try:
        os.write(status_fd, (json.dumps(record) + "\n").encode())
    except OSError:
        pass


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4]
            # mountinfo escapes blanks, newlines and backslashes as octal
            points.append(re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), point))
    return points


def _remount_everything_read_only() -> None:
    for point in _mount_points():
        if point == "/proc" or point.startswith("/proc/"):
            continue
        try:
            current = os.statvfs(point).f_flag
        except OSError:
            continue  # hidden under another mount: unreachable anyway
        if current & os.ST_RDONLY:
            continue
        kept = current & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
        _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


def _first_untraversable_ancestor(path: str) -> str | None:
    """The first directory above path that "others" (the sandbox uid) may not enter, if any."""
    current = "/"
    for part in path.strip("/").split("/")[:-1]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & 0o001:
            return current
    return None


def _expose_read_only(path: str, path_fd: int, blocker: str) -> None:
    """Shows path (read-only) through blocker, which becomes an empty tmpfs: /root/.pyenv/... works
    while the rest of /root stays invisible."""
    os.makedirs(blocker, mode=0o755, exist_ok=True)
    _mount("tmpfs", blocker, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    os.makedirs(path, mode=0o755, exist_ok=True)
    _mount(f"/proc/self/fd/{path_fd}", path, None, MS_BIND | MS_REC)
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _mount(None, blocker, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _mount_private_filesystems(spec: dict) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _remount_everything_read_only()
    # Opened inside the new mount namespace: bind mounts only take sources from the caller's namespace.
    workdir_fd = os.open(spec["workdir"], os.O_PATH | os.O_DIRECTORY)
    exposed = spec["expose"]
    blocker = _first_untraversable_ancestor(exposed) if exposed and os.path.isdir(exposed) else None
    exposed_fd = os.open(exposed, os.O_PATH | os.O_DIRECTORY) if blocker else None
    tmpfs_options = f"size={spec['tmpfs_bytes']},nr_inodes=4096,mode=1777"
    for directory in PRIVATE_TMPFS_DIRS:
        if os.path.isdir(directory):
            _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, tmpfs_options)
    for directory in HIDDEN_DIRS:
        if os.path.isdir(directory):
            _mount("tmpfs", directory, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    if exposed_fd is not None:
        _expose_read_only(exposed, exposed_fd, blocker)
        os.close(exposed_fd)
    os.mkdir(SANDBOX_WORKDIR, 0o755)
    # The host workdir may sit under /tmp, now hidden by the tmpfs: bind it from the fd opened earlier.
    _mount(f"/proc/self/fd/{workdir_fd}", SANDBOX_WORKDIR, None, MS_BIND)
    os.close(workdir_fd)
    workdir_flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV
    if not spec["workdir_writable"]:
        workdir_flags |= MS_RDONLY
    _mount(None, SANDBOX_WORKDIR, None, workdir_flags)


def _apply_limits(limits: dict) -> None:
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
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _drop_privileges(uid: int, gid: int) -> None:
    if os.geteuid() != 0:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _exec_program(spec: dict, status_fd: int) -> None:
    """Runs in the program's process; never returns."""
    try:
        _apply_limits(spec["limits"])
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _drop_privileges(spec["uid"], spec["gid"])
        os.chdir(SANDBOX_WORKDIR if spec["isolate"] else spec["workdir"])
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
        if spec["isolate"]:
            _mount_private_filesystems(spec)
        program_pid = os.fork()
        if program_pid == 0:
            _exec_program(spec, status_fd)
        _write_status(status_fd, _wait_for_program(program_pid))
    except BaseException as error:
        _write_status(status_fd, {"setup_error": f"{type(error).__name__}: {error}"})
    os._exit(0)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    spec = json.loads(sys.argv[1])
    status_fd = spec["status_fd"]
    os.set_inheritable(status_fd, False)
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != spec["parent_pid"]:
            os._exit(1)  # the grader died before we armed the death signal
        if spec["isolate"]:
            os.unshare(sum(getattr(os, flag) for flag in NAMESPACE_FLAGS))
    except BaseException as error:
        _write_status(status_fd, {"setup_error": f"{type(error).__name__}: {error}"})
        os._exit(0)

    # SIGTERM stays blocked until the handler knows whom to kill; init unblocks it after resetting it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    init_pid = os.fork()
    if init_pid == 0:
        _run_init(spec, status_fd)
    signal.signal(signal.SIGTERM, lambda *_: _kill_quietly(init_pid))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.close(status_fd)
    while True:
        try:
            os.waitpid(init_pid, 0)
            break
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    os._exit(0)


if __name__ == "__main__":
    main()
