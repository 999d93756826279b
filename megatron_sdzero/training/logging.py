"""Step logging: one Megatron-style line per logged step, TensorBoard, W&B, a progress bar, metrics.jsonl.

Only the last rank logs (it sits on the last pipeline stage); the numbers it prints are global
(``train_step`` reduces them over data-parallel ranks and pipeline stages).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_sdzero.runtime.progress import progress_bar
from megatron_sdzero.training.config import LoggingConfig
from megatron_sdzero.training.flops import FlopsModel, mfu, tflops_per_gpu
from megatron_sdzero.training.step import StepResult

RESOLVED_LAYERS_FILE = "resolved_layers.json"


def is_logging_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


@dataclass
class _Window:
    """Accumulates the steps between two logged lines."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    flops: float = 0.0
    losses: list[float] = field(default_factory=list)

    def add(self, seconds: float, tokens: int, flops: float, loss: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        self.flops += flops
        self.losses.append(loss)


def readable(value: float) -> str:
    """Six significant digits, positional notation from 1e-4 up to 1e6 (``0.004546``, ``4.546``)."""
    return f"{value:.6g}"


def format_step_line(
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    ms_per_iter: float,
    tokens_per_s: float,
    tflops: float,
    mfu_value: float,
    result: StepResult,
    skipped_total: int,
    extra: dict[str, float],
) -> str:
    """The Megatron-LM step line (same fields and order, plus tokens/s, TFLOP/s and MFU).

    Losses and the other logged quantities are printed as plain numbers in metrics.jsonl's units
    (``loss: 0.004546``, not ``4.546000E-03``), so the console and the file read the same.
    """
    parts = [
        f" iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"elapsed time per iteration (ms): {ms_per_iter:.1f}",
        f"tokens/s: {tokens_per_s:.1f}",
        f"TFLOP/s/GPU: {tflops:.2f}",
        f"MFU: {100 * mfu_value:.2f}%",
        f"learning rate: {result.lr:.6E}",
        f"loss: {readable(result.loss)}",
        *(f"{name}: {readable(value)}" for name, value in extra.items()),
        f"grad norm: {result.grad_norm:.3f}",
        f"skipped iterations: {skipped_total:3d}",
    ]
    return " | ".join(parts) + " |"


class StepLogger:
    """Logs each step to stdout (every ``interval``), TensorBoard, W&B, tqdm and ``metrics.jsonl``."""

    def __init__(
        self,
        config: LoggingConfig,
        run_dir: str | Path | None,
        *,
        flops: FlopsModel | None,
        world_size: int,
        train_iters: int,
        start_iteration: int = 0,
        run_name: str = "",
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.flops = flops
        self.world_size = world_size
        self.train_iters = train_iters
        self.active = is_logging_rank()
        self.window = _Window()
        self.run_dir = Path(run_dir) if run_dir else None
        self.tensorboard = self.wandb = self.progress = None
        if self.active:
            self._open(start_iteration, run_name, run_config)

    def _open(self, start_iteration: int, run_name: str, run_config: dict[str, Any] | None) -> None:
        run_config = self._with_resolved_layers(run_config)
        self.tensorboard = _tensorboard_writer(self.config, self.run_dir)
        self.wandb = _wandb_run(self.config, run_name, run_config)
        if self.config.progress:
            self.progress = progress_bar(
                total=self.train_iters, initial=start_iteration, desc=run_name or "train", unit="it", rank=0
            )

    def _with_resolved_layers(self, run_config: dict[str, Any] | None) -> dict[str, Any] | None:
        """The run's config plus what its models were built with (TE or local, FP8 recipe), which
        "auto" and the machine decide; also written to <run_dir>/resolved_layers.json."""
        from megatron_sdzero.training.setup import RESOLVED_LAYERS

        if not RESOLVED_LAYERS:
            return run_config
        layers = {role: dict(resolved) for role, resolved in RESOLVED_LAYERS.items()}
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / RESOLVED_LAYERS_FILE).write_text(json.dumps(layers, indent=2) + "\n")
        return {**(run_config or {}), "resolved_layers": layers}

    def log(
        self,
        iteration: int,
        result: StepResult,
        *,
        seconds: float,
        tokens: int,
        sample_lengths: list[int],
        consumed_samples: int,
        skipped_total: int,
    ) -> None:
        """Record one finished step (``iteration`` = steps done, 1-based)."""
        if not self.active:
            return
        flops = self.flops.step_flops(sample_lengths) if self.flops else 0.0
        self.window.add(seconds, tokens, flops, result.loss)
        record = self._record(iteration, result, seconds, tokens, flops, consumed_samples, skipped_total)
        self._write_metrics(record)
        self._scalars(iteration, record)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", refresh=False)
        if iteration % max(self.config.interval, 1) == 0 or iteration == self.train_iters:
            self._print_line(iteration, result, consumed_samples, skipped_total)

    def _record(self, iteration, result, seconds, tokens, flops, consumed, skipped_total) -> dict[str, Any]:
        peak = self.config.peak_tflops
        return dict(
            iteration=iteration,
            loss=result.loss,
            lr=result.lr,
            grad_norm=result.grad_norm,
            skipped=result.skipped,
            skipped_total=skipped_total,
            num_target_tokens=result.num_tokens,
            tokens=tokens,
            consumed_samples=consumed,
            seconds=seconds,
            tokens_per_s=tokens / seconds if seconds > 0 else math.nan,
            tflops_per_gpu=tflops_per_gpu(flops, seconds, self.world_size),
            mfu=mfu(flops, seconds, self.world_size, peak),
            **{k: v for k, v in result.logs.items() if k != "loss"},
        )

    def _print_line(self, iteration: int, result: StepResult, consumed: int, skipped_total: int) -> None:
        w, peak = self.window, self.config.peak_tflops
        line = format_step_line(
            iteration,
            self.train_iters,
            consumed,
            1000 * w.seconds / max(w.steps, 1),
            w.tokens / w.seconds if w.seconds > 0 else math.nan,
            tflops_per_gpu(w.flops, w.seconds, self.world_size),
            mfu(w.flops, w.seconds, self.world_size, peak),
            result,
            skipped_total,
            {k: v for k, v in result.logs.items() if k != "loss"},
        )
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        message = f"[{stamp}]{line}"
        if self.progress is not None:
            self.progress.write(message)
        else:
            print(message, flush=True)
        self.window = _Window()

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "metrics.jsonl").open("a") as out:
            out.write(json.dumps(record) + "\n")

    def _scalars(self, iteration: int, record: dict[str, Any]) -> None:
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and k != "iteration"}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{name}", value, iteration)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=iteration)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tensorboard_writer(config: LoggingConfig, run_dir: Path | None):
    if config.tensorboard_dir is None:
        return None
    directory = (
        Path(config.tensorboard_dir)
        if config.tensorboard_dir
        else (run_dir / "tensorboard" if run_dir else None)
    )
    if directory is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: on by default when importable, a note only if asked for
        if config.tensorboard_dir:
            print(f"tensorboard is not installed: nothing written to {directory} (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(directory))


def _wandb_run(config: LoggingConfig, name: str, run_config: dict[str, Any] | None):
    if not config.wandb_project:
        return None
    try:
        import wandb
    except ImportError as err:
        raise ImportError(
            "logging.wandb_project is set but wandb is not installed (pip install wandb)"
        ) from err
    return wandb.init(
        project=config.wandb_project,
        entity=config.wandb_entity,
        name=config.wandb_name or name,
        config=run_config,
        resume="allow",
    )
