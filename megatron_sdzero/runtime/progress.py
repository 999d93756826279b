"""Progress bars for the waits a user sits through: on a terminal, on the reporting rank, never in logs."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any


def progress_bar(
    iterable: Iterable[Any] | None = None, *, enabled: bool = True, rank: int | None = None, **kwargs: Any
):
    """A tqdm bar that shows only when ``enabled``, on rank 0 (``rank`` or $RANK), and on a TTY.

    tqdm's ``disable=None`` turns a bar off when its stream is not a terminal, so Slurm logs and
    pipes get the one-line summaries instead of carriage-return noise.
    """
    from tqdm import tqdm

    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    show = enabled and rank == 0
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if show else True, **kwargs)
