"""The on-policy recipe: one config tree for ``sdzero distill`` (SD-Zero Phase 2), ``sdzero sdft`` and
``sdzero grpo``; ``algorithm`` picks the part that differs (docs/algorithms.md).

    sdzero distill --config examples/distill_qwen3_4b_math.yaml train.lr=2e-6 --dry-run
    sdzero grpo --config examples/grpo_qwen3_4b_math.yaml

Batch arithmetic: every step draws ``train.global_batch_size / sampling.n`` prompts, samples
``sampling.n`` responses to each (reference: 128 prompts x 1 sample) and makes one optimizer step
on them (fully on-policy). ``train.train_iters`` is the number of steps, ``train.epochs`` (if set)
caps the passes over the prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_sdzero.algorithms.config import AlgorithmName, BudgetConfig, GRPOConfig, SDFTConfig
from megatron_sdzero.checks import check_family, check_student, checkpoint_model_type
from megatron_sdzero.config import ConfigError
from megatron_sdzero.data.formatting import ControlPhrases, PromptConfig, resolve_phrases
from megatron_sdzero.data.problems import ProblemSource
from megatron_sdzero.distill.batch import BatchConfig
from megatron_sdzero.distill.refresh import RefreshConfig
from megatron_sdzero.distill.teacher import TeacherConfig
from megatron_sdzero.eval.evaluate import EvalOptions
from megatron_sdzero.losses import DistillLossConfig
from megatron_sdzero.models.builder import ModelConfig
from megatron_sdzero.rewards import RewardConfig
from megatron_sdzero.rollout.base import RolloutConfig, SamplingParams
from megatron_sdzero.runtime.distributed import ParallelConfig
from megatron_sdzero.training.config import CheckpointConfig, LoggingConfig, TrainConfig


@dataclass
class StudentConfig:
    checkpoint: Path  # Megatron checkpoint to start from: the SRT model (sdzero sft's run directory)
    family: str | None = None  # picks the control phrases (qwen3, olmo3, ...); never guessed from paths
    # Whether the starting checkpoint is an SRT model. None: a plain conversion (a "release" checkpoint)
    # is refused, since Phase 2 from a base model is the reference's silent trap; true: go on;
    # false: distill from a base model on purpose (warned about loudly).
    start_is_srt: bool | None = None
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class DistillEvalConfig:
    problems: ProblemSource | None = None  # held-out problems; None: no in-loop evaluation
    interval: int = 20  # steps between evaluations (and after the last step)
    at_start: bool = False  # also evaluate the starting weights
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, top_p=1.0))
    options: EvalOptions = field(default_factory=lambda: EvalOptions(k=8, pass_at=[1, 8]))


@dataclass
class DistillSchedule:
    seed: int = 0  # prompt order and sampling seeds
    shuffle: bool = True
    keep_best: int = 3  # checkpoints kept by eval avg@k (the newest is always kept too)


@dataclass
class DistillConfig:
    student: StudentConfig
    problems: ProblemSource
    algorithm: AlgorithmName = "sdzero"
    sdft: SDFTConfig = field(default_factory=SDFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    phrases: ControlPhrases = field(default_factory=ControlPhrases)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=8192)
    )
    reward: RewardConfig = field(default_factory=RewardConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    train: TrainConfig = field(default_factory=lambda: reference_train_config())
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    eval: DistillEvalConfig = field(default_factory=DistillEvalConfig)
    checkpoint: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(interval=10, keep_last=None)
    )
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    schedule: DistillSchedule = field(default_factory=DistillSchedule)

    def __post_init__(self) -> None:
        if self.algorithm not in ("sdzero", "sdft", "grpo"):
            raise ConfigError(f"algorithm: sdzero, sdft or grpo, got {self.algorithm!r}")
        if self.algorithm == "sdzero":
            # An unknown family without phrases fails here; a family or phrases that contradict the
            # student checkpoint (its model type, the phrases Phase 1 trained with) too.
            check_student(
                self.student.checkpoint,
                self.student.family,
                resolve_phrases(self.student.family, self.phrases),
            )
        else:  # SDFT and GRPO use no control phrase; the family must still match the checkpoint
            check_family(
                self.student.family, checkpoint_model_type(self.student.checkpoint), "student.family",
                self.student.checkpoint,
            )  # fmt: skip
        if self.algorithm == "grpo" and self.sampling.n < 2:
            raise ConfigError(
                f"sampling.n={self.sampling.n}: GRPO's group is the sampling.n responses of a prompt and "
                "needs at least 2 (advantages are relative to the group)"
            )
        if self.algorithm == "grpo" and self.teacher.sync != "none":
            raise ConfigError("teacher.sync: GRPO's reference model stays frozen; set teacher.sync=none")
        if self.algorithm == "sdft" and self.teacher.sync == "copy":
            raise ConfigError(
                "teacher.sync: SDFT's teacher is the frozen start (none) or an EMA of the student (ema)"
            )
        if self.reward.mode != self.problems.mode:
            raise ConfigError(
                f"reward.mode: {self.reward.mode!r} does not grade {self.problems.mode!r} problems"
            )
        if self.train.global_batch_size % self.sampling.n:
            raise ConfigError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of sampling.n "
                f"({self.sampling.n}): each step samples sampling.n responses per prompt"
            )
        if self.train.train_iters is None:
            raise ConfigError("train.train_iters: set the number of distillation steps")
        if self.parallel.vpp is not None:
            raise ConfigError("parallel.vpp: virtual pipeline stages are not supported by distill")
        if self.train.overlap_param_gather and self.train.use_distributed_optimizer:
            raise ConfigError(
                "train.overlap_param_gather: the distributed optimizer then defers the parameter all-gather "
                "to the next forward pass, but distill reads the parameters right after each step (weight "
                "refresh, teacher.sync, checkpoints) and would see other ranks' shards stale; set it false"
            )
        if not self.checkpoint.save:
            raise ConfigError("checkpoint.save: name the run directory")
        if self.checkpoint.keep_last is not None:
            raise ConfigError(
                "checkpoint.keep_last: distill keeps checkpoints by eval score (schedule.keep_best)"
            )

    @property
    def samples_per_step(self) -> int:
        return self.train.global_batch_size

    @property
    def prompts_per_step(self) -> int:
        return self.train.global_batch_size // self.sampling.n

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoint.save)


def reference_train_config() -> TrainConfig:
    """The reference's Phase 2 optimisation: AdamW lr 5e-6, wd 0.01, betas (0.9, 0.999), clip 1.0,
    linear warmup from 0.1x over 20 steps then constant, 128 samples per step, 1000 steps."""
    return TrainConfig(
        lr=5e-6,
        min_lr=5e-6,
        lr_schedule="constant",
        warmup_steps=20,
        warmup_init_lr=5e-7,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.999,
        clip_grad=1.0,
        micro_batch_size=1,
        global_batch_size=128,
        epochs=5,
        train_iters=1000,
    )
