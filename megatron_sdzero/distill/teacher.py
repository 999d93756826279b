"""The frozen teacher, and its synchronisation with the student (iterative self-evolution).

The teacher is the SRT model, built with the student's TP/PP layout but never trained: eval mode,
``requires_grad=False``, no DDP wrapper, no gradient buffers, no optimizer state (see
``training.setup.build_frozen``). It may use another precision than the student (``teacher.fp8``).
On a GPU it can live on the CPU between its forward passes (``teacher.offload``).

Synchronisation (``teacher.sync``), after the optimizer step of every ``sync_interval``-th step:

- ``copy``: teacher := student (the paper's "regular teacher synchronization");
- ``ema``:  teacher := decay * teacher + (1 - decay) * student. The average is kept in float32
  (``master``), since a bf16 teacher would round away increments smaller than its resolution;
  the teacher's own parameters are the master rounded to their dtype.

Both happen in memory, parameter by parameter on each rank (teacher and student shard alike). A
synchronised teacher is part of the run's state: :meth:`Teacher.sharded_state_dict` gives its
weights under ``teacher.`` (and the float32 EMA under ``teacher_ema.``) for the checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_sdzero.config import ConfigError
from megatron_sdzero.distill.weights import unwrap

SyncMode = Literal["none", "copy", "ema"]
TEACHER_PREFIX = "teacher."
EMA_PREFIX = "teacher_ema."


@dataclass
class TeacherConfig:
    checkpoint: Path | None = None  # Megatron checkpoint; None: the student's starting checkpoint
    fp8: Literal["e4m3", "hybrid", "off"] | None = None  # the teacher's FP8 format; None: the student's
    sync: SyncMode = "none"
    sync_interval: int = 0  # steps between synchronisations (copy or EMA update)
    ema_decay: float = 0.99
    offload: bool = False  # GPU: keep the teacher's weights on the CPU between forward passes

    def __post_init__(self) -> None:
        if self.sync != "none" and self.sync_interval < 1:
            raise ConfigError(f"teacher.sync_interval: must be >= 1 with sync={self.sync!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"teacher.ema_decay: must lie in (0, 1), got {self.ema_decay}")


def _params(chunks: list[Any]) -> list[tuple[str, torch.nn.Parameter]]:
    return [
        (f"{i}.{name}", param)
        for i, chunk in enumerate(unwrap(chunks))
        for name, param in chunk.named_parameters()
    ]


class Teacher:
    def __init__(self, chunks: list[Any], config: TeacherConfig) -> None:
        self.chunks = chunks
        self.config = config
        self.syncs = 0  # how many synchronisations have been applied
        self.master: dict[str, torch.Tensor] | None = None
        for chunk in unwrap(chunks):
            chunk.eval()
            chunk.requires_grad_(False)
        if config.sync == "ema":
            self.master = {name: p.detach().float().clone() for name, p in _params(chunks)}
            self._place_master()

    # --- synchronisation ---------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the step just completed (1-based) ends with a synchronisation."""
        return self.config.sync != "none" and step % self.config.sync_interval == 0

    @torch.no_grad()
    def sync_from(self, student_chunks: list[Any]) -> None:
        pairs = self._matched(student_chunks)
        if self.config.sync == "copy":
            for _, mine, theirs in pairs:
                mine.copy_(theirs)
        elif self.config.sync == "ema":
            assert self.master is not None
            decay = self.config.ema_decay
            for name, mine, theirs in pairs:
                master = self.master[name]
                master.mul_(decay).add_(theirs.to(master.device, torch.float32), alpha=1.0 - decay)
                mine.copy_(master)
        else:
            raise ValueError("teacher.sync is 'none': nothing to synchronise")
        self.syncs += 1

    def _matched(self, student_chunks: list[Any]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        student = dict(_params(student_chunks))
        mine = _params(self.chunks)
        if [n for n, _ in mine] != list(student):
            raise ValueError("teacher and student have different parameters (same architecture and layout?)")
        return [(name, param.data, student[name].data) for name, param in mine]

    # --- placement -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The teacher's weights on the GPU for a forward pass (a no-op unless offloading)."""
        if not self._offloading():
            yield
            return
        device = torch.device("cuda", torch.cuda.current_device())
        self._move(device)
        try:
            yield
        finally:
            self._move(torch.device("cpu"))

    def offload(self) -> None:
        if self._offloading():
            self._move(torch.device("cpu"))

    def _offloading(self) -> bool:
        return self.config.offload and torch.cuda.is_available()

    def _move(self, device: torch.device) -> None:
        for _, param in _params(self.chunks):
            param.data = param.data.to(device, non_blocking=True)
        for chunk in unwrap(self.chunks):
            for buffer in chunk.buffers():
                buffer.data = buffer.data.to(device, non_blocking=True)

    def _place_master(self) -> None:
        if self.master is not None and self._offloading():
            self.master = {n: t.to("cpu") for n, t in self.master.items()}

    # --- checkpointing --------------------------------------------------------------------------------

    def sharded_state_dict(self) -> dict[str, Any]:
        """The teacher's weights (and the float32 EMA) as Megatron sharded tensors, prefixed."""
        state: dict[str, Any] = {}
        for i, chunk in enumerate(unwrap(self.chunks)):
            state.update(_weights_only(chunk.sharded_state_dict(prefix=_prefix(TEACHER_PREFIX, i))))
            if self.master is not None:
                with _swapped_data(chunk, self.master, f"{i}."):
                    ema = chunk.sharded_state_dict(prefix=_prefix(EMA_PREFIX, i))
                state.update(_weights_only(ema))
        return state

    @torch.no_grad()
    def load_sharded(self, loaded: dict[str, Any]) -> None:
        """Copy what ``dist_checkpointing.load(self.sharded_state_dict(), ...)`` returned."""
        for i, chunk in enumerate(unwrap(self.chunks)):
            for name, param in chunk.named_parameters():
                param.copy_(loaded[_prefix(TEACHER_PREFIX, i) + name])
                if self.master is not None:
                    self.master[f"{i}.{name}"].copy_(loaded[_prefix(EMA_PREFIX, i) + name])

    def state(self) -> dict[str, Any]:
        return {"syncs": self.syncs, "sync": self.config.sync}

    def load_state(self, state: dict[str, Any]) -> None:
        self.syncs = int(state.get("syncs", 0))


def _prefix(base: str, chunk_index: int) -> str:
    return base if chunk_index == 0 else f"{base}chunk{chunk_index}."


def _weights_only(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


@contextlib.contextmanager
def _swapped_data(chunk: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Iterator[None]:
    """Parameters temporarily backed by ``tensors`` (so Megatron shards them like the weights)."""
    saved = {}
    for name, param in chunk.named_parameters():
        saved[name] = param.data
        param.data = tensors[prefix + name]
    try:
        yield
    finally:
        for name, param in chunk.named_parameters():
            param.data = saved[name]
