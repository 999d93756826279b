"""The sandbox's hostile-program suite again, as an ordinary user (what a Slurm job is).

Run as root (CI), this re-executes pytest on ``tests/test_rewards_code.py`` as uid/gid 65534
(``nobody``), so the same tests exercise the unprivileged user-namespace backend. The interpreter
and the checkout may sit under a directory other users cannot enter (``/root`` is mode 700, and a
CI clone's parents may be too): the re-run happens in a private mount namespace where each such
directory is covered by an empty tmpfs showing only the needed paths. Nothing changes on the host.
Run as an ordinary user, ``tests/test_rewards_code.py`` already tests that backend itself.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
UNPRIVILEGED_ID = 65534  # nobody / nogroup
SUITE = "tests/test_rewards_code.py"
RERUN_TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="runs as root only: as an ordinary user tests/test_rewards_code.py covers this itself",
)


def blocked_ancestor(path: str) -> str | None:
    """The topmost directory above (or at) path that other users may not enter, if any."""
    current = "/"
    for part in Path(path).parts[1:]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & 0o001:
            return current
    return None


def reachable_paths_script(paths: list[str]) -> list[str]:
    """Shell lines (run as root in a private mount namespace) that make each path reachable by
    others: its blocked ancestor becomes a tmpfs holding only bind mounts of the paths below it."""
    needed = [path for path in dict.fromkeys(paths) if blocked_ancestor(path)]
    blockers = list(dict.fromkeys(blocked_ancestor(path) for path in needed))
    lines = ["stage=$(mktemp -d)", 'mount -t tmpfs tmpfs "$stage"']
    for number, path in enumerate(needed):
        lines += [f'mkdir "$stage/{number}"', f'mount --bind {shlex.quote(path)} "$stage/{number}"']
    lines += [f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(blocker)}" for blocker in blockers]
    for number, path in enumerate(needed):
        lines += [f"mkdir -p {shlex.quote(path)}", f'mount --bind "$stage/{number}" {shlex.quote(path)}']
    return lines


def as_unprivileged(command: list[str], env: dict[str, str]) -> list[str]:
    setpriv = ["setpriv", f"--reuid={UNPRIVILEGED_ID}", f"--regid={UNPRIVILEGED_ID}", "--clear-groups"]
    environment = [f"{name}={value}" for name, value in env.items()]
    return [*setpriv, "env", "-i", *environment, *command]


def test_the_sandbox_suite_passes_as_an_unprivileged_user():
    missing = [tool for tool in ("unshare", "setpriv", "mount") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs util-linux's {', '.join(missing)}")
    userns = subprocess.run(
        as_unprivileged(["unshare", "--user", "--map-root-user", "true"], {"PATH": os.environ["PATH"]}),
        capture_output=True,
        text=True,
    )
    if userns.returncode != 0:
        pytest.skip(
            f"unprivileged user namespaces do not work here for uid {UNPRIVILEGED_ID} "
            f"({userns.stderr.strip()}): the sandbox's ordinary-user backend cannot be tested on this host"
        )
    scratch = Path(tempfile.mkdtemp(prefix=".hostile-scratch-", dir=REPO_ROOT))
    scratch.chmod(0o1777)  # host sockets and data sets of the re-run, outside /tmp and /run
    try:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
            "SDZERO_HOSTILE_SCRATCH": str(scratch),
        }
        pytest_argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", SUITE]
        needed = [str(REPO_ROOT), os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)]
        script = [
            "set -eu",
            *reachable_paths_script(needed),
            f"cd {shlex.quote(str(REPO_ROOT))}",
            shlex.join(["exec", *as_unprivileged(pytest_argv, env)]),
        ]
        rerun = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", "\n".join(script)],
            capture_output=True,
            text=True,
            timeout=RERUN_TIMEOUT_S,
        )
    finally:
        shutil.rmtree(scratch)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-6000:]
    assert "no sandbox here" not in output, output[-3000:]  # every hostile test ran, none skipped
    assert " passed" in output.splitlines()[-1], output[-3000:]
