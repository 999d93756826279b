"""Failures the user caused, reported as one line with exit status 2 instead of a traceback.

Code that finds bad input raises a :class:`UserError` subclass (``ConfigError``, ``ProblemFormatError``,
``CheckpointError``, ...) whose message says what is wrong, where, and what to do. The command fronts
(``run_config_command``, ``sdzero convert``, ``sdzero report``) run their work through
:func:`run_reporting_user_errors`, the one place these are caught. A file-system refusal (a missing
path, a file where a directory belongs, a read-only directory) is a user error too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

USER_ERROR_STATUS = 2


class UserError(Exception):
    """Bad input the user can fix; the message names what, where and what to do."""


# OSErrors that mean "this path is not what the command needs", each with what to do about it.
_PATH_ERRORS: dict[type[OSError], str] = {
    FileNotFoundError: "check the path",
    NotADirectoryError: "a file is in the way of a directory; choose another path",
    IsADirectoryError: "a directory is where a file belongs; choose another path",
    FileExistsError: "something is already there; choose another path or remove it",
    PermissionError: "check its permissions, or choose a writable location",
}


def is_reporting_rank() -> bool:
    """Rank 0 of a distributed job (or the only process): the one that prints user errors."""
    if "RANK" in os.environ:  # set by torchrun and srun wrappers before any process group exists
        return os.environ["RANK"] == "0"
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def user_error_line(err: BaseException) -> str | None:
    """The one-line explanation of a user error, or None when ``err`` is not one."""
    if isinstance(err, UserError):
        return " ".join(str(err).split())
    for kind, advice in _PATH_ERRORS.items():
        if isinstance(err, kind):
            where = f": {err.filename}" if err.filename else ""
            what = err.strerror or str(err)
            if err.filename2:
                where += f" -> {err.filename2}"
            return " ".join(f"{what}{where} ({advice})".split())
    return None


def print_user_error(prog: str, line: str) -> int:
    """Print ``prog: error: line`` on stderr (rank 0 only); returns the user-error exit status."""
    if is_reporting_rank():
        print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


def run_reporting_user_errors[**P](
    prog: str, work: Callable[P, int | None], *args: P.args, **kwargs: P.kwargs
) -> int:
    """``work(*args)``'s exit code; a user error becomes one line on stderr (rank 0) and status 2."""
    try:
        return int(work(*args, **kwargs) or 0)
    except (UserError, OSError) as err:
        line = user_error_line(err)
        if line is None:
            raise
        return print_user_error(prog, line)
