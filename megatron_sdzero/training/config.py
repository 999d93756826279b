"""Configs of the training loop's components: optimisation, checkpoints, logging.

Each is a plain dataclass that recipes fill from YAML (see ``megatron_sdzero.config``). SFT adds
its data config in ``sft_data.py``; Phase 2 reuses these three as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megatron_sdzero.config import ConfigError

LrSchedule = Literal["cosine", "constant", "linear"]
NanPolicy = Literal["skip", "stop"]


@dataclass
class TrainConfig:
    """Optimiser, schedule, batch and loop settings (AdamW with fp32 main params, Megatron DDP)."""

    lr: float = 5e-6
    min_lr: float = 0.0
    lr_schedule: LrSchedule = "cosine"
    warmup_ratio: float = 0.05  # fraction of the train iterations (ignored when warmup_steps is set)
    warmup_steps: int | None = None
    warmup_init_lr: float = 0.0  # lr at iteration 0; warmup is linear from here to ``lr``
    weight_decay: float = 1e-4  # not applied to biases and norm weights (Megatron's default groups)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global L2 norm; 0 disables clipping
    micro_batch_size: int = 1  # rows per micro-batch per data-parallel rank
    global_batch_size: int = 4  # rows per optimizer step over all data-parallel ranks
    epochs: int | None = 3  # used when train_iters is None
    train_iters: int | None = None
    seed: int = 1234
    nan_policy: NanPolicy = "skip"  # a step with a non-finite loss or grad norm: skip it, or stop
    max_consecutive_skips: int = 8  # stop anyway after this many skipped steps in a row
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_fp32: bool = True
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # save, then exit
    exit_duration_minutes: float | None = None  # save and exit after this much wall time

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ValueError("train.micro_batch_size and train.global_batch_size must be >= 1")
        if self.epochs is None and self.train_iters is None:
            raise ValueError("set train.epochs or train.train_iters")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) is larger than train.lr ({self.lr})")

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) is not divisible by "
                f"micro_batch_size x data-parallel size ({self.micro_batch_size} x {data_parallel_size})"
            )
        return self.global_batch_size // per_step

    def warmup_iters(self, train_iters: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, max(train_iters - 1, 0))
        # ceil, as transformers' TrainingArguments.get_warmup_steps (the reference trainer)
        return min(math.ceil(self.warmup_ratio * train_iters), max(train_iters - 1, 0))


OptimizerFormat = Literal["dp_reshardable", "fully_reshardable"]


@dataclass
class CheckpointConfig:
    """Where and how training checkpoints are written and read.

    ``save`` is the run directory (the same layout as a converted checkpoint, see
    conversion/megatron_io.py). A run resumes from ``load`` (default: ``save``) when it holds a
    checkpoint; otherwise it starts from ``finetune`` (weights only, iteration 0).
    """

    save: str = ""
    load: str | None = None
    finetune: str | None = None
    interval: int | None = None  # iterations between saves; None: only at the end and on exit
    keep_last: int | None = 2  # older iter_* directories are removed; None keeps all
    # dp_reshardable: fully parallel, resumes at any DP size but the same TP/PP. fully_reshardable:
    # gathers optimizer state over DP at save; resumes at any TP/PP/DP.
    optimizer_format: OptimizerFormat = "dp_reshardable"
    load_optimizer: bool = True  # False: resume iteration, schedule and data but fresh Adam moments
    load_rng: bool = True


@dataclass
class LoggingConfig:
    """Step lines, TensorBoard, W&B and the progress bar."""

    interval: int = 1  # iterations per logged line
    tensorboard_dir: str | None = ""  # "" = <checkpoint.save>/tensorboard; None disables it
    wandb_project: str | None = None  # W&B is off unless a project is named
    wandb_entity: str | None = None
    wandb_name: str | None = None
    progress: bool = True  # a tqdm bar on the last rank
    peak_tflops: float = 989.0  # dense BF16 peak per GPU for MFU (H100/H200 SXM)
    # On-policy runs: per-token divergence (or surprise) of this many samples, every
    # token_samples_interval steps, into RUN_DIR/token_samples.jsonl for `sdzero report`.
    token_samples: int = 2
    token_samples_interval: int | None = 10
