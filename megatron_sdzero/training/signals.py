"""Save-and-exit requests: signals (Slurm's SIGUSR1 warning, SIGTERM), a stop file, a time budget.

A handler only sets a flag; the loop asks ``should_exit()`` after each step, which all-reduces the
flag so every rank stops at the same iteration (a signal may reach only some ranks, and only rank 0
looks at the stop file and the clock). The loop then saves a checkpoint and returns; a requeued job
resumes from it.

The stop file is the robust route under torchrun: Slurm signals the batch shell, which cannot reach
the workers through torchrun (it forwards SIGTERM with a 30 s grace period only), so the sbatch
script's trap creates the file instead (see slurm/sft.sbatch).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

_REASONS = ("", "signal", "stop file", "time limit")
_PROCESS_START = time.monotonic()  # the time budget counts from the start of the process, not of a stage


class ExitRequest:
    def __init__(
        self,
        signals: Sequence[str] = ("SIGTERM", "SIGUSR1"),
        *,
        stop_file: str | Path | None = None,
        max_minutes: float | None = None,
    ) -> None:
        self.received: str | None = None
        self.stop_file = Path(stop_file) if stop_file else None
        self.deadline = _PROCESS_START + 60 * max_minutes if max_minutes else None
        self._previous: dict[int, object] = {}
        for name in signals:
            number = getattr(signal, name, None)
            if not isinstance(number, signal.Signals):
                raise ValueError(f"unknown signal {name!r} in train.exit_signals")
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    def _local_reason(self) -> int:
        if self.received:
            return 1
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if rank0 and self.stop_file is not None and self.stop_file.exists():
            return 2
        if rank0 and self.deadline is not None and time.monotonic() >= self.deadline:
            return 3
        return 0

    def should_exit(self) -> str | None:
        """Collective: the reason to stop now (same on every rank), or None."""
        code = torch.tensor(float(self._local_reason()))
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                code = code.cuda()
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
        reason = _REASONS[int(code.item())]
        if reason == "signal" and self.received:
            reason = f"signal {self.received}"
        return reason or None

    def close(self) -> None:
        """Put the previous handlers back."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        self._previous.clear()
