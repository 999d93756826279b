"""``sdzero sft``: Phase 1's two-stage SFT on Megatron, ending in the SRT checkpoint.

    stage 1  generation data (stage1.jsonl)   fine-tuned from ``init`` (a converted base model)
    stage 2  revision data (stage2.jsonl)     fine-tuned from stage 1's final checkpoint

Each stage is a run directory under ``output_dir`` (``stage1/``, ``stage2/``) in the converted
checkpoint layout; ``stage2/`` is the SRT model (``sdzero convert mcore-to-hf OUT/stage2 HF``).
Rerunning the same command resumes an interrupted stage and skips a finished one.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_sdzero.checks import check_output_dir, phrases_of_records, write_phrases
from megatron_sdzero.config import ConfigError, run_config_command, to_dict, to_yaml
from megatron_sdzero.conversion.megatron_io import ModelMeta, resolve_checkpoint
from megatron_sdzero.models.builder import ModelConfig, padded_vocab_size, use_transformer_engine
from megatron_sdzero.report import write_run_report
from megatron_sdzero.runtime.distributed import ParallelConfig
from megatron_sdzero.training import checkpoint
from megatron_sdzero.training.config import CheckpointConfig, LoggingConfig, TrainConfig
from megatron_sdzero.training.flops import FlopsModel
from megatron_sdzero.training.forward import make_sft_forward_step
from megatron_sdzero.training.logging import StepLogger
from megatron_sdzero.training.loop import BatchStats, LoopResult, StepShape, run_training
from megatron_sdzero.training.packing import attention_format, schedule_shape
from megatron_sdzero.training.setup import Trainable, setup_trainable
from megatron_sdzero.training.sft_data import (
    DataPlan,
    SFTDataConfig,
    SFTDataset,
    collate_rows,
    make_plan,
    plan_identity,
)
from megatron_sdzero.training.step import NonFiniteStepError
from megatron_sdzero.training.trainer import exit_request_for

FINISHED = "sft_finished.json"


@dataclass
class SFTConfig:
    init: str = ""  # Megatron checkpoint that stage 1 fine-tunes from (`sdzero convert hf-to-mcore`)
    output_dir: str = "outputs/sft"
    stages: list[int] = field(default_factory=lambda: [1, 2])
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if not self.init:
            raise ConfigError("init: the Megatron checkpoint to start from is required")
        if (
            not self.stages
            or any(s not in (1, 2) for s in self.stages)
            or self.stages != sorted(set(self.stages))
        ):
            raise ConfigError(f"stages must be [1], [2] or [1, 2], got {self.stages}")
        for stage in self.stages:
            if not getattr(self.data, f"stage{stage}"):
                raise ConfigError(f"data.stage{stage}: the stage {stage} JSONL file is required")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


def stage_dir(config: SFTConfig, stage: int) -> Path:
    return Path(config.output_dir) / f"stage{stage}"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / FINISHED).is_file() and checkpoint.latest_iteration(run_dir) is not None


# --- data ---------------------------------------------------------------------------------------------


class SFTBatches:
    """This rank's view of a ``DataPlan``: micro-batches, log statistics, consumed samples."""

    def __init__(self, dataset: SFTDataset, plan: DataPlan, data: SFTDataConfig, train: TrainConfig) -> None:
        from megatron.core import parallel_state as ps

        self.dataset, self.plan, self.data, self.train = dataset, plan, data, train
        self.dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        self.dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)

    def micro_batches(self, iteration: int) -> list[Any]:
        rows = self.plan.rank_micro_batches(
            iteration, self.dp_rank, self.dp_size, self.train.micro_batch_size
        )
        return [collate_rows(self.dataset.samples, group, self.data) for group in rows]

    def stats(self, iteration: int) -> BatchStats:
        lengths = [self.dataset.lengths[i] for row in self.plan.global_batch(iteration) for i in row]
        return BatchStats(samples=len(lengths), tokens=sum(lengths), sample_lengths=lengths)

    def consumed_samples(self, iteration: int) -> int:
        return self.plan.consumed_samples(iteration)


def load_tokenizer(config: SFTConfig, init_root: Path):
    from transformers import AutoTokenizer

    source = Path(config.model.hf_path) if config.model.hf_path else init_root / "hf"
    if not source.is_dir():
        raise ConfigError(f"model.hf_path: no tokenizer at {source}; set it to the HF model directory")
    return AutoTokenizer.from_pretrained(source)


# --- one stage ----------------------------------------------------------------------------------------


@dataclass
class Stage:
    number: int
    run_dir: Path
    start_from: Path
    data_path: Path


def _model_meta(start_from: Path) -> ModelMeta:
    root, _ = resolve_checkpoint(start_from)
    return ModelMeta.read(root)


def _log(text: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


def _resume_or_start(
    stage: Stage, trainable: Trainable, config: SFTConfig, identity: dict
) -> tuple[int, dict]:
    ckpt = replace(config.checkpoint, save=str(stage.run_dir))
    if checkpoint.has_checkpoint(stage.run_dir):
        loaded = checkpoint.load(stage.run_dir, trainable, config=ckpt)
        saved = loaded.data_state.get("identity")
        if saved != identity:
            raise ConfigError(
                f"{stage.run_dir} was trained on other data or batch settings ({saved}); this run has "
                f"{identity}. Use a new output_dir, or restore the original data/settings to resume."
            )
        _log(f"stage {stage.number}: resumed from {loaded.directory} (iteration {loaded.iteration})")
        return loaded.iteration, dict(loaded.data_state.get("loop", {}))
    source = checkpoint.finetune_from(stage.start_from, trainable)
    _log(f"stage {stage.number}: weights from {source} (fine-tune start, iteration 0)")
    return 0, {}


def _describe_data(stage: Stage, dataset: SFTDataset, plan: DataPlan, data: SFTDataConfig) -> None:
    stats, tokens = dataset.stats, sum(dataset.lengths)
    rows = len(plan.rows)
    fill = sum(dataset.lengths[i] for row in plan.rows for i in row) / max(rows * data.seq_length, 1)
    _log(
        f"stage {stage.number}: {stage.data_path}: {stats.records} records, {len(dataset)} samples "
        f"({tokens:,} tokens; {stats.truncated} truncated, {stats.dropped_overlong} overlong dropped, "
        f"{stats.dropped_no_target} without targets), {plan.epochs} epoch(s) -> {rows} rows "
        f"(packing={data.packing}, {100 * fill:.1f}% of row capacity used), {plan.train_iters} iterations"
    )


def run_stage(stage: Stage, config: SFTConfig, tokenizer) -> LoopResult:
    meta = _model_meta(stage.start_from)
    arch = meta.arch
    model_cfg = replace(config.model, make_vocab_size_divisible_by=meta.make_vocab_size_divisible_by)
    train, data = config.train, config.data
    dataset = SFTDataset.from_jsonl(stage.data_path, tokenizer, data)
    plan = make_plan(
        dataset.lengths,
        data,
        seed=train.seed,
        global_batch_size=train.global_batch_size,
        epochs=train.epochs,
        train_iters=train.train_iters,
    )
    _describe_data(stage, dataset, plan, data)
    identity = plan_identity(dataset, data, train.seed, train.global_batch_size)

    trainable = _setup(arch, model_cfg, config, plan.train_iters)
    start, loop_state = _resume_or_start(stage, trainable, config, identity)
    run_meta = ModelMeta(
        meta.hf_config,
        model_cfg.params_dtype,
        meta.make_vocab_size_divisible_by,
        source=str(stage.start_from),
    )
    root, _ = resolve_checkpoint(stage.start_from)
    ckpt = replace(config.checkpoint, save=str(stage.run_dir))

    def save(iteration: int, state: dict) -> None:
        data_state = {"identity": identity, "loop": state, "iteration": iteration}
        checkpoint.save(
            stage.run_dir,
            iteration,
            trainable,
            config=ckpt,
            meta=run_meta,
            hf_assets=root / "hf",
            data_state=data_state,
        )

    attention = attention_format(data.packing, use_transformer_engine(model_cfg))
    dp = _dp_size()
    seq, mbs = schedule_shape(attention, train.micro_batch_size, data.seq_length)
    padded_vocab = padded_vocab_size(arch.vocab_size, meta.make_vocab_size_divisible_by, 1)
    logger = StepLogger(
        config.logging,
        stage.run_dir,
        flops=FlopsModel.from_arch(arch, padded_vocab),
        world_size=dist.get_world_size(),
        train_iters=plan.train_iters,
        start_iteration=start,
        run_name=f"sft-stage{stage.number}",
        run_config=to_dict(config),
    )
    exit_request = exit_request_for(train, stage.run_dir)
    try:
        return run_training(
            trainable,
            forward_step=make_sft_forward_step(attention, arch.vocab_size),
            batches=SFTBatches(dataset, plan, data, train),
            shape=StepShape(train.num_microbatches(dp), seq, mbs),
            train=train,
            start_iteration=start,
            loop_state=loop_state,
            save=save,
            save_interval=config.checkpoint.interval,
            logger=logger,
            exit_request=exit_request,
        )
    finally:
        exit_request.close()
        logger.close()


def _dp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size(with_context_parallel=True)


def _setup(arch, model_cfg: ModelConfig, config: SFTConfig, train_iters: int) -> Trainable:
    from megatron.core import parallel_state as ps

    overrides: dict[str, Any] = dict(sequence_parallel=config.parallel.sequence_parallel)
    if not config.data.packing and ps.get_pipeline_model_parallel_world_size() > 1:
        overrides["variable_seq_lengths"] = True  # unpacked micro-batches differ in length
    return setup_trainable(arch, model_cfg, config.train, train_iters, **overrides)


# --- the command --------------------------------------------------------------------------------------


def check_start(config: SFTConfig) -> Path:
    """Everything a start needs, checked before anything is written; returns the init checkpoint root."""
    check_output_dir(config.output_dir, "output_dir")
    init_root, _ = resolve_checkpoint(Path(config.init))
    for number in config.stages:
        data = Path(getattr(config.data, f"stage{number}"))
        if not data.is_file():
            raise ConfigError(
                f"data.stage{number}: {data} does not exist (srt-prepare writes stage{number}.jsonl)"
            )
    return init_root


def _write_run_config(config: SFTConfig) -> None:
    if dist.get_rank() == 0:
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(config))


def _record_phrases(stage: Stage) -> None:
    """Stage 2 teaches the control phrases: keep them with the SRT checkpoint for Phase 2 to check.

    Every rank reads them (a conflict fails everywhere alike); rank 0 writes phrases.json.
    """
    if stage.number != 2:
        return
    records = [r for r in _jsonl_records(stage.data_path) if "phrase" in r and "init_correct" in r]
    if records:
        phrases = phrases_of_records(records, str(stage.data_path))
        if dist.get_rank() == 0:
            write_phrases(stage.run_dir, phrases)


def _jsonl_records(path: Path) -> list[dict]:
    records = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({err}); fix that line") from None
            if isinstance(record, dict):
                records.append(record)
    return records


def _mark_finished(stage: Stage, result: LoopResult, seconds: float) -> None:
    if dist.get_rank() != 0:
        return
    last = result.results[-1].loss if result.results else None
    record = dict(
        stage=stage.number,
        iterations=result.iteration,
        final_loss=last,
        data=str(stage.data_path),
        started_from=str(stage.start_from),
        skipped_iterations=result.skipped_total,
        seconds=seconds,
    )
    (stage.run_dir / FINISHED).write_text(json.dumps(record, indent=2) + "\n")
    write_run_report(stage.run_dir)


def run_sft(config: SFTConfig) -> int:
    from megatron_sdzero.runtime.distributed import destroy_model_parallel, init_model_parallel

    init_root = check_start(config)
    init_model_parallel(config.parallel, seed=config.train.seed)
    try:
        start_from = Path(config.init)
        tokenizer = load_tokenizer(config, init_root)
        _write_run_config(config)
        for number in config.stages:
            stage = Stage(
                number, stage_dir(config, number), start_from, Path(getattr(config.data, f"stage{number}"))
            )
            if is_finished(stage.run_dir):
                _log(f"stage {number}: already finished in {stage.run_dir}; skipping")
            else:
                began = time.perf_counter()
                _record_phrases(stage)
                result = run_stage(stage, config, tokenizer)
                gc.collect()
                if not result.finished:
                    _log(f"stage {number} interrupted at iteration {result.iteration}; rerun to resume")
                    return 0
                _mark_finished(stage, result, time.perf_counter() - began)
                dist.barrier()
            start_from = stage.run_dir
        _log(f"SFT done: the SRT checkpoint is {start_from} (sdzero convert mcore-to-hf {start_from} OUT)")
        return 0
    except (NonFiniteStepError, checkpoint.CorruptStateError) as err:
        _log(f"sdzero sft stopped: {err}")
        return 1
    finally:
        destroy_model_parallel()


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_command(
        "sdzero sft",
        "Phase 1: two-stage SFT on Megatron (stage 1 generation, stage 2 revision)",
        SFTConfig,
        run_sft,
        list(argv or []),
    )
