"""Math reward: r = 1[math-verify says the response's final answer equals the gold answer].

A reasoning-gym reference (a problem from a ``reasoning_gym`` source) is graded by its task's own
scorer instead (``gym_reward.py``).

math-verify protects itself with ``signal.alarm``, which works only in a main thread and cannot
interrupt C code. So grading runs in worker processes (``math_worker.py``) that we own: each item
gets a hard deadline, and a worker that misses it is SIGKILLed and replaced while the others carry
on. A worker that dies mid-item (OOM killer, a crash in C) is replaced and its item retried once on a
fresh worker; a second death scores the item 0.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sdzero.rewards.base import (
    Reward,
    RewardResult,
    default_workers,
    require_non_negative,
    require_positive,
)
from megatron_sdzero.rewards.gym_reward import grade_gym, is_gym_reference

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("math_worker.py")
BOXED = "\\boxed"
MAX_STARTUP_DEATHS = 3


@dataclass
class MathRewardConfig:
    num_workers: int = 0
    """Worker processes; 0 = min(8, CPU count)."""
    timeout_s: float = 10.0
    """Hard per-item deadline, measured from dispatch to a ready worker; on expiry the worker is killed."""
    internal_timeout_s: int = 3
    """math-verify's own (signal-based) timeout for each parse and each comparison."""
    max_response_chars: int = 32_768
    """Longer responses are cut before parsing; see ``cap_response``."""
    worker_memory_mb: int = 4096
    """RLIMIT_AS of each worker (0 = unlimited): a huge intermediate fails instead of swapping."""
    startup_timeout_s: float = 120.0
    """How long to wait for a (re)started worker to import math-verify before giving up."""

    def __post_init__(self) -> None:
        require_positive(
            self, "math", ("timeout_s", "internal_timeout_s", "max_response_chars", "startup_timeout_s")
        )
        require_non_negative(self, "math", ("num_workers", "worker_memory_mb"))


def wrap_gold(answer: Any) -> str:
    """The gold answer as math-verify expects it: inside \\boxed{} unless it already has one."""
    text = str(answer).strip()
    return text if BOXED in text else f"{BOXED}{{{text}}}"


def cap_response(response: str, max_chars: int) -> str:
    """Bounds parsing work: a long response keeps max_chars starting at its last \\boxed (the answer
    math-verify would pick first), or its last max_chars if it has no \\boxed."""
    if len(response) <= max_chars:
        return response
    last_boxed = response.rfind(BOXED)
    if last_boxed < 0:
        return response[-max_chars:]
    return response[last_boxed : last_boxed + max_chars]


@dataclass
class _Item:
    index: int
    response: str
    gold: str
    attempts: int = 0


class _Worker:
    def __init__(self, config: MathRewardConfig) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(WORKER_SCRIPT),
                str(config.internal_timeout_s),
                str(config.worker_memory_mb),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's Ctrl-C is for the trainer; we stop workers ourselves
        )
        self.started = time.monotonic()
        self.ready = False
        self.item: _Item | None = None
        self.dispatched = 0.0
        self._buffer = b""

    @property
    def fd(self) -> int:
        return self.process.stdout.fileno()

    def send(self, item: _Item) -> None:
        request = {"id": item.index, "response": item.response, "gold": item.gold}
        self.item, self.dispatched = item, time.monotonic()
        item.attempts += 1
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()

    def read_messages(self) -> list[dict] | None:
        """Complete messages available now; None once the worker has died."""
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            return None
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        return [json.loads(line) for line in lines]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class WorkerStartupError(RuntimeError):
    pass


class MathReward(Reward):
    """Grades math responses in a pool of math-verify worker processes with hard per-item timeouts."""

    mode = "math"

    def __init__(self, config: MathRewardConfig | None = None) -> None:
        self.config = config or MathRewardConfig()
        self.workers_replaced = 0
        self._startup_deaths = 0
        self._batch_lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._workers: list[_Worker] = []
        for _ in range(self.config.num_workers or default_workers()):
            self._start_worker()

    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    def close(self) -> None:
        for worker in getattr(self, "_workers", []):
            worker.kill()
        self._workers = []
        if hasattr(self, "_selector"):
            self._selector.close()

    def _grade_all(self, responses: list[str], answers: list[Any]) -> list[RewardResult]:
        with self._batch_lock:  # the pool serves one batch at a time
            if not self._workers:
                raise RuntimeError("MathReward is closed")
            gym = [is_gym_reference(answer) for answer in answers]
            if not any(gym):
                return self._grade_with_pool(responses, answers)
            max_chars = self.config.max_response_chars
            results = [
                grade_gym(cap_response(response, max_chars), answer) if is_gym else None
                for response, answer, is_gym in zip(responses, answers, gym, strict=True)
            ]
            rest = [k for k, is_gym in enumerate(gym) if not is_gym]
            graded = self._grade_with_pool([responses[k] for k in rest], [answers[k] for k in rest])
            for k, result in zip(rest, graded, strict=True):
                results[k] = result
            return results  # type: ignore[return-value]

    def _grade_with_pool(self, responses: list[str], answers: list[Any]) -> list[RewardResult]:
        max_chars = self.config.max_response_chars
        pending = deque(
            _Item(index, cap_response(response, max_chars), wrap_gold(answer))
            for index, (response, answer) in enumerate(zip(responses, answers, strict=True))
        )
        results: list[RewardResult | None] = [None] * len(pending)
        try:
            while pending or any(worker.item for worker in self._workers):
                self._dispatch(pending)
                self._wait_and_collect(pending, results)
        except BaseException:
            # Busy workers would answer this abandoned batch's items during the next one.
            for worker in [worker for worker in self._workers if worker.item is not None]:
                self._replace(worker)
            raise
        return results  # type: ignore[return-value]

    def _dispatch(self, pending: deque[_Item]) -> None:
        for worker in self._workers:
            if not pending:
                return
            if worker.ready and worker.item is None:
                item = pending.popleft()
                try:
                    worker.send(item)
                except (BrokenPipeError, ValueError):
                    pending.appendleft(item)  # died while idle: its EOF is handled by the read loop
                    item.attempts -= 1
                    worker.item = None

    def _wait_and_collect(self, pending: deque[_Item], results: list[RewardResult | None]) -> None:
        for key, _ in self._selector.select(self._seconds_to_next_deadline()):
            worker: _Worker = key.data
            messages = worker.read_messages()
            if messages is None:
                self._handle_death(worker, pending, results)
                continue
            for message in messages:
                self._handle_message(worker, message, results)
        self._enforce_deadlines(results)

    def _handle_message(self, worker: _Worker, message: dict, results: list[RewardResult | None]) -> None:
        if "error" in message:
            raise WorkerStartupError(f"math worker failed to start:\n{message['error']}")
        if message.get("ready"):
            worker.ready = True
            self._startup_deaths = 0
            return
        item, worker.item = worker.item, None
        if item is None or item.index != message["id"]:
            raise RuntimeError(f"math worker {worker.process.pid} answered an item it was not given")
        results[item.index] = RewardResult(
            score=float(message["score"]),
            reason=message["reason"],
            extracted=message["extracted"],
            seconds=time.monotonic() - worker.dispatched,
        )

    def _handle_death(
        self, worker: _Worker, pending: deque[_Item], results: list[RewardResult | None]
    ) -> None:
        item = worker.item
        self._replace(worker)
        if not worker.ready:
            self._startup_deaths += 1
            if self._startup_deaths >= MAX_STARTUP_DEATHS:
                raise WorkerStartupError(
                    f"{self._startup_deaths} math workers in a row died while starting "
                    "(is worker_memory_mb too small for sympy?)"
                )
        if item is None:
            return
        if item.attempts < 2:
            pending.appendleft(item)
            return
        results[item.index] = RewardResult(0.0, "worker_crashed", "", time.monotonic() - worker.dispatched)

    def _enforce_deadlines(self, results: list[RewardResult | None]) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.item is not None and now - worker.dispatched > self.config.timeout_s:
                results[worker.item.index] = RewardResult(0.0, "timeout", "", now - worker.dispatched)
                self._replace(worker)
            elif not worker.ready and now - worker.started > self.config.startup_timeout_s:
                raise WorkerStartupError(
                    f"a math worker did not start within {self.config.startup_timeout_s} s"
                )

    def _seconds_to_next_deadline(self) -> float:
        now = time.monotonic()
        deadlines = [
            worker.dispatched + self.config.timeout_s
            if worker.item is not None
            else worker.started + self.config.startup_timeout_s
            for worker in self._workers
            if worker.item is not None or not worker.ready
        ]
        return max(0.0, min(deadlines, default=now + 1.0) - now) + 0.001

    def _start_worker(self) -> None:
        worker = _Worker(self.config)
        self._workers.append(worker)
        self._selector.register(worker.fd, selectors.EVENT_READ, worker)

    def _replace(self, worker: _Worker) -> None:
        logger.debug("replacing math worker %d", worker.process.pid)
        self._selector.unregister(worker.fd)
        self._workers.remove(worker)
        worker.kill()
        self.workers_replaced += 1
        self._start_worker()
