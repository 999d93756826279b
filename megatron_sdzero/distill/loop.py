"""``sdzero distill``: Phase 2, on-policy self-distillation (SD-Zero).

    sdzero distill --config examples/distill_qwen3_4b_math.yaml
    torchrun --nproc-per-node 8 -m megatron_sdzero.cli distill --config ...    (see slurm/distill.sbatch)

Every step::

    rollout = sample y for this step's prompts with the rollout engine, grade them
    batch   = student x + y and teacher x + body(y) + P_r + y, aligned on the second y
    result  = teacher forward (frozen) -> student forward/backward -> KL -> optimizer step
    teacher synchronisation (copy / EMA), on schedule
    update the engine's weights from the student, and check them with the probe
    log; evaluate (avg@k) and save (keeping the best checkpoints), on schedule

A run resumes from its own latest checkpoint (student, optimizer, scheduler, teacher, data position,
RNG, eval scores); the engine is rebuilt from the restored student.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_sdzero.config import ConfigError, run_config_command, to_dict
from megatron_sdzero.data.formatting import ChatFormat, ControlPhrases, resolve_phrases
from megatron_sdzero.data.problems import Problem, load_problems
from megatron_sdzero.distill import parallel
from megatron_sdzero.distill.batch import DistillBatch, build_batch
from megatron_sdzero.distill.config import DistillConfig
from megatron_sdzero.distill.refresh import RefreshResult, WeightRefresher, check_probe, export_hf
from megatron_sdzero.distill.rollout import (
    RolloutBatch,
    replica_share,
    sample_and_grade,
    step_prompts,
    total_steps,
)
from megatron_sdzero.distill.step import Stopwatch, distill_step
from megatron_sdzero.distill.teacher import Teacher
from megatron_sdzero.eval.evaluate import evaluate
from megatron_sdzero.eval.metrics import benchmark_scores
from megatron_sdzero.models.architecture import DecoderArchitecture
from megatron_sdzero.models.builder import padded_vocab_size
from megatron_sdzero.training.step import StepResult

logger = logging.getLogger(__name__)
SCORES_FILE = "eval_scores.json"


@dataclass
class Hooks:
    """Test and tooling callbacks (not configuration)."""

    on_step_start: Callable[[int], None] = lambda step: None


@dataclass
class Run:
    """Everything the steps share; built by :func:`setup`."""

    config: DistillConfig
    arch: DecoderArchitecture
    meta: Any  # conversion.megatron_io.ModelMeta of the student
    hf_assets: Path
    student: Any  # training.setup.Trainable
    teacher: Teacher
    fmt: ChatFormat
    phrases: ControlPhrases
    problems: list[Problem]
    eval_problems: list[Problem]
    refresher: WeightRefresher
    step_logger: Any  # training.logging.StepLogger
    exit_request: Any  # training.signals.ExitRequest
    total_steps: int
    step: int = 0
    engine: Any = None  # on engine ranks
    grader: Any = None  # on engine ranks
    scores: dict[int, float] = field(default_factory=dict)  # step -> eval avg@k
    skipped_total: int = 0


# --- the loop ----------------------------------------------------------------------------------------


def distill(config: DistillConfig, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run (or resume) Phase 2 to ``train.train_iters`` steps; returns the last step's metrics."""
    hooks = hooks or Hooks()
    run = setup(config)
    last: dict[str, Any] = {}
    try:
        if run.step == 0 and config.eval.at_start and run.eval_problems:
            evaluate_student(run)
        while run.step < run.total_steps:
            step = run.step + 1
            hooks.on_step_start(step)
            began = time.perf_counter()
            rollout = generate(run, step)
            batch = build_batch(rollout.samples, run.fmt, run.phrases, config.batch, _pad_id(run.fmt))
            result, teacher_s, student_s = train(run, batch)
            if run.teacher.due(step):
                run.teacher.sync_from(run.student.model)
            refreshed = update_weights(run, step)
            run.step = step
            last = log_step(run, step, rollout, batch, result, refreshed, teacher_s, student_s, began)
            if _due(step, config.eval.interval, run.total_steps) and run.eval_problems:
                last.update(evaluate_student(run))
            if _due(step, config.checkpoint.interval, run.total_steps):
                save(run)
            if reason := run.exit_request.should_exit():
                save(run)
                run.step_logger.message(f"exit requested ({reason}) after step {step}: checkpoint saved")
                break
    finally:
        close(run)
    return last


def generate(run: Run, step: int) -> RolloutBatch:
    """This replica's graded samples: drawn on its engine rank, shared with its model-parallel group."""
    config = run.config
    prompts = step_prompts(
        run.problems, step, config.prompts_per_step, config.schedule.seed, config.schedule.shuffle
    )
    rollout = None
    if parallel.is_engine_rank():
        mine = replica_share(prompts, *parallel.dp_rank_and_size())
        rollout = sample_and_grade(
            run.engine, run.grader, run.fmt, mine, config.sampling, step=step, seed=config.schedule.seed,
            prompt=config.prompt, student_max_tokens=config.batch.student_max_tokens,
        )  # fmt: skip
        _sleep(run.engine)  # vLLM frees its memory for training (rollout.enable_sleep_mode)
    return parallel.broadcast_in_mp_group(rollout)


def train(run: Run, batch: DistillBatch) -> tuple[StepResult, float, float]:
    """One optimizer step; returns it with the teacher's and the student's seconds."""
    teacher_time = Stopwatch()
    began = time.perf_counter()
    result = distill_step(
        run.student, run.teacher, batch, run.config.loss, run.arch.vocab_size,
        micro_batch_size=run.config.train.micro_batch_size,
        pad_to_multiple_of=run.config.batch.pad_to_multiple_of,
        nan_policy=run.config.train.nan_policy, teacher_time=teacher_time,
    )  # fmt: skip
    run.skipped_total += int(result.skipped)
    run.teacher.offload()
    seconds = time.perf_counter() - began
    return result, teacher_time.seconds, seconds - teacher_time.seconds


def update_weights(run: Run, step: int) -> RefreshResult:
    return run.refresher.refresh(run.engine, run.student.model, step)


def evaluate_student(run: Run) -> dict[str, float]:
    """avg@k / pass@k of the engine's (= the student's) weights on the held-out problems."""
    options = run.config.eval.options
    mine = replica_share_or_rest(run.eval_problems)
    counts: list[int] = []
    if parallel.is_engine_rank() and mine:
        report = evaluate(
            mine, run.engine, run.grader, run.fmt, run.config.eval.sampling, options, run.config.prompt
        )
        counts = [p.correct for p in report.problems]
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, counts if parallel.is_engine_rank() else None)
    merged = [c for part in everything if part for c in part]
    scores = benchmark_scores(merged, options.k, options.pass_at)
    run.scores[run.step] = scores[f"avg@{options.k}"]
    run.step_logger.message(
        f"eval at step {run.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        + f" over {len(merged)} problems"
    )  # fmt: skip
    _record_scores(run)
    return {f"eval_{name}": value for name, value in scores.items()}


def replica_share_or_rest(problems: list[Problem]) -> list[Problem]:
    dp_rank, dp_size = parallel.dp_rank_and_size()
    return problems[dp_rank::dp_size]


def save(run: Run) -> None:
    from megatron_sdzero.training import checkpoint

    config = run.config
    synced = config.teacher.sync != "none"
    checkpoint.save(
        config.run_dir, run.step, run.student, config=config.checkpoint, meta=run.meta,
        data_state={"step": run.step, "consumed_prompts": run.step * config.prompts_per_step},
        hf_assets=run.hf_assets,
        extra_sharded={"teacher": run.teacher.sharded_state_dict()} if synced else None,
        extra_common={"teacher": run.teacher.state(), "scores": run.scores, "skipped": run.skipped_total},
    )  # fmt: skip
    if dist.get_rank() == 0:
        prune_checkpoints(config.run_dir, run.scores, config.schedule.keep_best)
    parallel.barrier()


def prune_checkpoints(root: Path, scores: dict[int, float], keep_best: int) -> list[int]:
    """Keep the newest checkpoint and the ``keep_best`` best by eval score; remove the others."""
    steps = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit() and p.is_dir())
    if not steps:
        return []
    scored = sorted((s for s in steps if s in scores), key=lambda s: (-scores[s], -s))
    keep = {steps[-1], *scored[:keep_best]}
    removed = [s for s in steps if s not in keep]
    for step in removed:
        shutil.rmtree(root / f"iter_{step:07d}", ignore_errors=True)
    return removed


def close(run: Run) -> None:
    run.step_logger.close()
    run.exit_request.close()
    if run.engine is not None:
        run.engine.close()
    if run.grader is not None:
        run.grader.close()


# --- logging -----------------------------------------------------------------------------------------


def log_step(
    run: Run,
    step: int,
    rollout: RolloutBatch,
    batch: DistillBatch,
    result: StepResult,
    refreshed: RefreshResult,
    teacher_s: float,
    student_s: float,
    began: float,
) -> dict[str, Any]:
    """Global step metrics into the step line, metrics.jsonl and TensorBoard."""
    sums = _global_sums(batch)
    samples = max(sums["samples"], 1.0)
    student_lengths = _global_lengths(batch.student_index, batch.loss_mask)
    teacher_lengths = _global_lengths(batch.teacher_index, batch.loss_mask)
    times = _global_max(
        refresh=refreshed.seconds + refreshed.probe_seconds, generation=rollout.generation_s,
        grading=rollout.grading_s, teacher=teacher_s, student=student_s,
    )  # fmt: skip
    train_s = times["teacher"] + times["student"]
    flops = _train_flops(run, student_lengths, teacher_lengths)
    metrics = {
        "kl": result.loss,
        "reward_mean": sums["reward"] / samples,
        "response_length_mean": sums["response_tokens"] / samples,
        "response_length_max": sums["response_max"],
        "truncated_fraction": sums["truncated"] / samples,
        "zero_weight_fraction": sums["zero_weight"] / samples,
        "loss_tokens": float(result.num_tokens),
        **{f"time_{name}_s": value for name, value in times.items()},
        "generation_tokens_per_s": sums["response_tokens"] / max(times["generation"], 1e-9),
        "train_tokens_per_s": (sums["student_tokens"] + sums["teacher_tokens"]) / max(train_s, 1e-9),
        "train_tflops_per_gpu": flops / max(train_s, 1e-9) / dist.get_world_size() / 1e12,
        "refresh_probe_max_diff": refreshed.probe_max_diff,
    }
    result.logs.update(metrics)
    run.step_logger.log(
        step, result, seconds=time.perf_counter() - began,
        tokens=int(sums["student_tokens"] + sums["teacher_tokens"]),
        sample_lengths=student_lengths, consumed_samples=step * run.config.train.global_batch_size,
        skipped_total=run.skipped_total,
    )  # fmt: skip
    return {"step": step, "loss": result.loss, "grad_norm": result.grad_norm, **metrics}


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def _global_sums(batch: DistillBatch) -> dict[str, float]:
    lengths = batch.response_lengths.float()
    values = {
        "samples": float(batch.size),
        "reward": float(batch.rewards.sum()),
        "response_tokens": float(lengths.sum()),
        "truncated": float(batch.truncated.sum()),
        "zero_weight": float((batch.sample_weights == 0).sum()),
        "student_tokens": float(sum(_lengths(batch.student_index, batch.loss_mask))),
        "teacher_tokens": float(sum(_lengths(batch.teacher_index, batch.loss_mask))),
    }
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, group=_dp_group())
    sums = dict(zip(values, tensor.tolist(), strict=True))
    sums["response_max"] = _global_max(response_max=float(lengths.max()))["response_max"]
    return sums


def _lengths(index: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """Each row's sequence length without padding (up to the token after its last aligned position)."""
    used = mask.sum(1)
    last = index.gather(1, (used - 1).clamp(min=0)[:, None])[:, 0] + 2
    return torch.where(used > 0, last, torch.ones_like(last)).tolist()


def _global_lengths(index: torch.Tensor, mask: torch.Tensor) -> list[int]:
    gathered: list[Any] = [None] * dist.get_world_size(_dp_group())
    dist.all_gather_object(gathered, _lengths(index, mask), group=_dp_group())
    return [n for part in gathered for n in part]


def _global_max(**values: float) -> dict[str, float]:
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return dict(zip(values, tensor.tolist(), strict=True))


def _train_flops(run: Run, student_lengths: list[int], teacher_lengths: list[int]) -> float:
    """Student forward + backward and teacher forward FLOPs of the global batch."""
    from megatron_sdzero.training.flops import FlopsModel

    padded = padded_vocab_size(run.arch.vocab_size, run.config.student.model.make_vocab_size_divisible_by, 1)
    flops = FlopsModel.from_arch(run.arch, padded)
    return flops.step_flops(student_lengths) + flops.step_flops(teacher_lengths) / 3  # forward: 1 of 3 passes


def _record_scores(run: Run) -> None:
    if dist.get_rank() == 0:
        run.config.run_dir.mkdir(parents=True, exist_ok=True)
        (run.config.run_dir / SCORES_FILE).write_text(json.dumps({str(k): v for k, v in run.scores.items()}))


def _device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _due(step: int, interval: int | None, last: int) -> bool:
    return bool(interval) and (step % interval == 0 or step == last)


def _pad_id(fmt: ChatFormat) -> int:
    pad = fmt.tokenizer.pad_token_id
    return pad if pad is not None else fmt.end_of_turn_id


def _sleep(engine: Any) -> None:
    if hasattr(engine, "sleep"):
        engine.sleep(level=2)  # weights are reloaded after every step anyway


# --- setup -------------------------------------------------------------------------------------------


def setup(config: DistillConfig) -> Run:
    """Parallel state, student, teacher, data, logging; resume or start; the engine and its first probe."""
    from megatron_sdzero.conversion.megatron_io import ModelMeta
    from megatron_sdzero.runtime.distributed import init_model_parallel
    from megatron_sdzero.training import checkpoint
    from megatron_sdzero.training.setup import build_frozen, setup_trainable

    init_model_parallel(config.parallel, seed=config.train.seed)
    root, _ = check_start(config)
    source = ModelMeta.read(root)
    model_cfg = config.student.model
    meta = ModelMeta(
        source.hf_config, model_cfg.params_dtype, model_cfg.make_vocab_size_divisible_by, str(root)
    )
    arch, hf_assets = meta.arch, root / "hf"
    problems, _ = load_problems(config.problems)
    steps = total_steps(len(problems), config.prompts_per_step, config.train.train_iters, config.train.epochs)
    student = setup_trainable(arch, config.student.model, config.train, steps)
    teacher_chunks = build_frozen(arch, teacher_model_config(config))
    checkpoint.finetune_from(config.teacher.checkpoint or config.student.checkpoint, teacher_chunks)
    run = Run(
        config=config, arch=arch, meta=meta, hf_assets=hf_assets, student=student,
        teacher=Teacher(teacher_chunks, config.teacher), fmt=ChatFormat(_tokenizer(hf_assets)),
        phrases=resolve_phrases(config.student.family, config.phrases), problems=problems,
        eval_problems=load_problems(config.eval.problems)[0] if config.eval.problems else [],
        refresher=WeightRefresher(
            config.refresh, arch, arch.vocab_size, config.refresh.dir or config.run_dir / "rollout_weights",
            hf_assets, config.student.model.params_dtype,
        ),
        step_logger=None, exit_request=None, total_steps=steps,
    )  # fmt: skip
    start_or_resume(run)
    run.step_logger, run.exit_request = _logger(run), _exit_request(config)
    start_engine(run)
    return run


def check_start(config: DistillConfig) -> tuple[Path, Path]:
    """The student's starting checkpoint, refusing a plain base-model conversion unless told."""
    from megatron_sdzero.conversion.megatron_io import resolve_checkpoint

    root, directory = resolve_checkpoint(Path(config.student.checkpoint))
    plain_conversion = directory.name == "release"
    if plain_conversion and config.student.start_is_srt is None:
        raise ConfigError(
            f"student.checkpoint {config.student.checkpoint} is a plain conversion, not a trained SRT "
            "checkpoint: Phase 2 must start from the SRT model (the output of sdzero sft), and the teacher "
            "defaults to the same checkpoint. If this conversion is an SRT model, set "
            "student.start_is_srt=true; to distill from a base model on purpose, set it to false"
        )
    if config.student.start_is_srt is False and dist.get_rank() == 0:
        banner = "!" * 100
        logger.warning(
            "%s\nPHASE 2 FROM A BASE MODEL: student.start_is_srt=false; the teacher (%s) has not learned to "
            "revise, so its targets are not SD-Zero's.\n%s",
            banner, config.teacher.checkpoint or config.student.checkpoint, banner,
        )  # fmt: skip
    return root, directory


def start_or_resume(run: Run) -> None:
    from megatron_sdzero.training import checkpoint

    config = run.config
    source = config.checkpoint.load or config.checkpoint.save
    if not checkpoint.has_checkpoint(source):
        checkpoint.finetune_from(config.student.checkpoint, run.student)
        return
    synced = config.teacher.sync != "none"
    template = {"teacher": run.teacher.sharded_state_dict()} if synced else None
    state = checkpoint.load(source, run.student, config=config.checkpoint, extra_sharded=template)
    if synced:
        run.teacher.load_sharded(state.extra_sharded["teacher"])
    run.teacher.load_state(state.extra_common.get("teacher", {}))
    run.scores = {int(k): float(v) for k, v in state.extra_common.get("scores", {}).items()}
    run.skipped_total = int(state.extra_common.get("skipped", 0))
    run.step = state.iteration


def start_engine(run: Run) -> None:
    """Export the (started or resumed) student, start the engine on it, check it with the probe."""
    from megatron_sdzero.rewards import build_reward
    from megatron_sdzero.rollout.base import ModelSource, build_engine

    config = run.config
    path = run.refresher.root / f"step_{run.step:07d}"
    export_hf(run.student.model, run.arch, path, run.hf_assets, config.student.model.params_dtype)
    parallel.barrier()
    if parallel.is_engine_rank():
        run.engine = build_engine(ModelSource(path, config.student.family), config.rollout)
        run.grader = build_reward(config.reward)
    if config.refresh.probe.enabled:
        check_probe(run.engine, run.student.model, run.arch.vocab_size, config.refresh.probe)


def teacher_model_config(config: DistillConfig):
    """The student's model settings with the teacher's FP8 choice (None: the student's)."""
    fp8 = config.teacher.fp8
    if fp8 is None:
        return config.student.model
    return replace(config.student.model, fp8=None if fp8 == "off" else fp8)


def _tokenizer(hf_assets: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_assets))


def _logger(run: Run):
    from megatron_sdzero.training.flops import FlopsModel
    from megatron_sdzero.training.logging import StepLogger

    padded = padded_vocab_size(run.arch.vocab_size, run.config.student.model.make_vocab_size_divisible_by, 1)
    return StepLogger(
        run.config.logging, run.config.run_dir, flops=FlopsModel.from_arch(run.arch, padded),
        world_size=dist.get_world_size(), train_iters=run.total_steps, start_iteration=run.step,
        run_name="distill", run_config=to_dict(run.config),
    )  # fmt: skip


def _exit_request(config: DistillConfig):
    from megatron_sdzero.training.signals import ExitRequest

    return ExitRequest(
        config.train.exit_signals,
        stop_file=config.run_dir / "STOP",
        max_minutes=config.train.exit_duration_minutes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    def run(config: DistillConfig) -> int:
        last = distill(config)
        if dist.get_rank() == 0:
            print(f"sdzero distill: done; last step {json.dumps(last)}", flush=True)
        return 0

    argv = sys.argv[1:] if argv is None else argv
    return run_config_command("sdzero distill", __doc__.split("\n\n")[0], DistillConfig, run, argv)
