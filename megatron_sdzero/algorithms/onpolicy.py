"""The on-policy algorithms (SD-Zero Phase 2, SDFT, GRPO) as one TrainModule for the shared Trainer.

Every step, whatever the algorithm::

    prompts = this step's prompts (a function of the step: resumes draw what an uninterrupted run would)
    rollout = sample_and_grade on each replica's engine rank, shared with its model-parallel group
    batch   = algorithm.build_batch(rollout)           SD-Zero: x+y / x+body(y)+P_r+y; SDFT: x+y / c(x,y*)+y;
                                                        GRPO: x+y with group advantages
    result  = frozen model forward (if any) -> student forward/backward -> algorithm.loss -> optimizer step
    teacher synchronisation (copy / EMA), on schedule
    refresh the engine from the student, and check it with the probe
    account the budget; log; (the Trainer: evaluate and save on schedule, stop on request or budget)

A run resumes from its own latest checkpoint (student, optimizer, scheduler, teacher, data position,
RNG, eval scores, budget ledger); the engine is rebuilt from the restored student.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_sdzero.algorithms import metrics as global_metrics
from megatron_sdzero.algorithms.base import Algorithm, BatchContext
from megatron_sdzero.algorithms.budget import (
    Ledger,
    check_budget_allows_a_step,
    prior_samples,
    question_digest,
    samples_left_error,
)
from megatron_sdzero.config import ConfigError, to_dict
from megatron_sdzero.data.formatting import ChatFormat, build_messages, resolve_phrases
from megatron_sdzero.data.problems import Problem, describe, load_problems
from megatron_sdzero.distill import parallel
from megatron_sdzero.distill.batch import DistillBatch, RolloutSample
from megatron_sdzero.distill.config import DistillConfig
from megatron_sdzero.distill.refresh import RefreshResult, WeightRefresher, check_probe, export_hf
from megatron_sdzero.distill.rollout import replica_share, step_prompts, total_steps
from megatron_sdzero.distill.step import Stopwatch, policy_step
from megatron_sdzero.distill.teacher import Teacher
from megatron_sdzero.eval.evaluate import evaluate
from megatron_sdzero.eval.metrics import benchmark_scores
from megatron_sdzero.models.architecture import DecoderArchitecture
from megatron_sdzero.models.builder import padded_vocab_size
from megatron_sdzero.rollout.base import mix_seed
from megatron_sdzero.rollout.sampling import SampleRequest, sample_and_grade
from megatron_sdzero.training.step import StepResult
from megatron_sdzero.training.trainer import StepOutcome, due

logger = logging.getLogger(__name__)
SCORES_FILE = "eval_scores.json"
TOKEN_SAMPLES_FILE = "token_samples.jsonl"


@dataclass
class Rollout:
    samples: list[RolloutSample]
    generation_s: float
    grading_s: float
    skipped_prompts: int = 0


@dataclass
class Run:
    """Everything the steps share; built by :func:`setup`."""

    config: DistillConfig
    algorithm: Algorithm
    arch: DecoderArchitecture
    meta: Any  # conversion.megatron_io.ModelMeta of the student
    hf_assets: Path
    student: Any  # training.setup.Trainable
    teacher: Teacher | None  # the frozen model: teacher (SD-Zero, SDFT) or reference (GRPO); None without
    fmt: ChatFormat
    problems: list[Problem]
    eval_problems: list[Problem]
    refresher: WeightRefresher
    ledger: Ledger
    total_steps: int
    step_logger: Any = None  # training.logging.StepLogger
    exit_request: Any = None  # training.signals.ExitRequest
    step: int = 0
    engine: Any = None  # on engine ranks
    grader: Any = None  # on engine ranks
    scores: dict[int, float] = field(default_factory=dict)  # step -> eval avg@k
    token_rows: list[dict] = field(default_factory=list)  # per-token values kept for the report


class OnPolicyModule:
    """The TrainModule of every on-policy algorithm (see the module docstring)."""

    def __init__(self, run: Run) -> None:
        self.run = run

    # --- TrainModule --------------------------------------------------------------------------------

    def run_step(self, step: int) -> StepOutcome:
        run = self.run
        prompts = replica_prompts(run, step)
        rollout = generate(run, step, prompts)
        batch = run.algorithm.build_batch(rollout.samples or [_placeholder(prompts)], prompts)
        record = _token_samples_due(run, step)
        result, teacher_s, student_s = train(run, batch, record)
        if run.teacher is not None and run.teacher.due(step):
            run.teacher.sync_from(run.student.model)
        refreshed = run.refresher.refresh(run.engine, run.student.model, step)
        run.step = step
        if record:
            _write_token_samples(run, step, rollout)
        return step_outcome(run, step, rollout, batch, result, refreshed, teacher_s, student_s)

    def evaluate(self, step: int) -> dict[str, float]:
        return evaluate_student(self.run) if self.run.eval_problems else {}

    def save(self, step: int, state: dict[str, Any]) -> None:
        save(self.run, state.get("skipped_total", 0))

    def budget_left(self, step: int) -> str | None:
        run = self.run
        return samples_left_error(run.config.budget, run.ledger.total_samples, run.config.samples_per_step)


def replica_prompts(run: Run, step: int) -> list[Problem]:
    """This data-parallel replica's share of the step's prompts (the same on all its ranks)."""
    config = run.config
    prompts = step_prompts(
        run.problems, step, config.prompts_per_step, config.schedule.seed, config.schedule.shuffle
    )
    return replica_share(prompts, *parallel.dp_rank_and_size())


def generate(run: Run, step: int, prompts: list[Problem]) -> Rollout:
    """This replica's graded samples: drawn on its engine rank, shared with its model-parallel group."""
    config = run.config
    rollout = None
    if parallel.is_engine_rank():
        requests = [
            SampleRequest(
                run.fmt.prompt_ids(build_messages(p.text, p.mode, config.prompt)), p.reference,
                mix_seed("distill", config.schedule.seed, step, p.id), p.id,
            )
            for p in prompts
        ]  # fmt: skip
        sampling = replace(config.sampling, logprobs=False)
        sampled = sample_and_grade(
            run.engine, run.grader, run.fmt, requests, sampling, token_limit=config.batch.student_max_tokens
        )
        samples = [
            RolloutSample(
                group.request.prompt_ids, list(s.completion.token_ids), s.score, s.completion.finish_reason,
                group.request.problem_id, index,
            )
            for index, group in enumerate(sampled.groups)
            for s in group.samples or ()
        ]  # fmt: skip
        rollout = Rollout(samples, sampled.generation_s, sampled.grading_s, sampled.skipped)
        _sleep(run.engine)  # vLLM frees its memory for training (rollout.enable_sleep_mode)
    return parallel.broadcast_in_mp_group(rollout)


def _placeholder(prompts: list[Problem]) -> RolloutSample:
    """A zero-weight row for a replica whose every prompt was too long to sample (it must still step)."""
    return RolloutSample(prompt_ids=[0], response_ids=[], reward=0.0, finish_reason="length")


def train(run: Run, batch: DistillBatch, record_tokens: bool) -> tuple[StepResult, float, float]:
    """One optimizer step; returns it with the frozen model's and the student's seconds."""
    teacher_time = Stopwatch()
    began = time.perf_counter()
    sink = _token_sink(run) if record_tokens else None
    config = run.config
    result = policy_step(
        run.student, run.teacher, batch, run.algorithm.loss_fn(sink),
        micro_batch_size=config.train.micro_batch_size, pad_to_multiple_of=config.batch.pad_to_multiple_of,
        nan_policy=config.train.nan_policy, teacher_time=teacher_time,
    )  # fmt: skip
    if run.teacher is not None:
        run.teacher.offload()
    seconds = time.perf_counter() - began
    return result, teacher_time.seconds, seconds - teacher_time.seconds


def evaluate_student(run: Run) -> dict[str, float]:
    """avg@k / pass@k of the engine's (= the student's) weights on the held-out problems."""
    began = time.perf_counter()
    config = run.config
    options = config.eval.options
    dp_rank, dp_size = parallel.dp_rank_and_size()
    mine = run.eval_problems[dp_rank::dp_size]
    counts: list[int] = []
    if parallel.is_engine_rank() and mine:
        report = evaluate(
            mine, run.engine, run.grader, run.fmt, config.eval.sampling, options, config.prompt,
            token_limit=config.rollout.max_model_len,
        )  # fmt: skip
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
    seconds = global_metrics.global_max(eval=time.perf_counter() - began)
    run.ledger.add_seconds(seconds, dist.get_world_size())
    return {f"eval_{name}": value for name, value in scores.items()}


def save(run: Run, skipped_total: int) -> None:
    from megatron_sdzero.training import checkpoint

    config = run.config
    synced = run.teacher is not None and config.teacher.sync != "none"
    checkpoint.save(
        config.run_dir, run.step, run.student, config=config.checkpoint, meta=run.meta,
        data_state={"step": run.step, "consumed_prompts": run.step * config.prompts_per_step},
        hf_assets=run.hf_assets,
        extra_sharded={"teacher": run.teacher.sharded_state_dict()} if synced else None,
        extra_common={
            "teacher": run.teacher.state() if run.teacher is not None else {}, "scores": run.scores,
            "skipped": skipped_total, "budget": run.ledger.state(), "algorithm": config.algorithm,
        },
    )  # fmt: skip
    if dist.get_rank() == 0:
        if run.eval_problems:  # without in-loop scores, checkpoint.keep_last alone decides what stays
            prune_checkpoints(config.run_dir, run.scores, config.schedule.keep_best)
        run.ledger.write(config.run_dir, config.budget)
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
    if run.step_logger is not None:
        run.step_logger.close()
    if run.exit_request is not None:
        run.exit_request.close()
    if run.engine is not None:
        run.engine.close()
    if run.grader is not None:
        run.grader.close()


# --- logging -----------------------------------------------------------------------------------------


def step_outcome(
    run: Run,
    step: int,
    rollout: Rollout,
    batch: DistillBatch,
    result: StepResult,
    refreshed: RefreshResult,
    teacher_s: float,
    student_s: float,
) -> StepOutcome:
    """Global step metrics for the step line, metrics.jsonl and TensorBoard; the budget ledger."""
    extra = {"skipped_prompts": float(rollout.skipped_prompts if parallel.is_engine_rank() else 0)}
    sums = global_metrics.batch_sums(batch, {**run.algorithm.batch_metrics(batch), **extra})
    samples = max(sums["samples"], 1.0)
    student_lengths = global_metrics.global_lengths(batch.student_index, batch.loss_mask)
    teacher_lengths = global_metrics.global_lengths(batch.teacher_index, batch.loss_mask)
    times = global_metrics.global_max(
        refresh=refreshed.seconds + refreshed.probe_seconds, generation=rollout.generation_s,
        grading=rollout.grading_s, teacher=teacher_s, student=student_s,
    )  # fmt: skip
    train_s = times["teacher"] + times["student"]
    flops = _train_flops(run, student_lengths, teacher_lengths)
    gpus = dist.get_world_size()
    run.ledger.add_step(
        int(sums["samples"]), int(sums["trained"]), result.num_tokens,
        {"generation": times["generation"], "grading": times["grading"], "train": train_s,
         "refresh": times["refresh"]}, gpus,
    )  # fmt: skip
    metrics = {
        run.algorithm.loss_name: result.loss,
        "reward_mean": sums["reward"] / samples,
        "response_length_mean": sums["response_tokens"] / samples,
        "response_length_max": sums["response_max"],
        "truncated_fraction": sums["truncated"] / samples,
        "zero_weight_fraction": sums["zero_weight"] / samples,
        "loss_tokens": float(result.num_tokens),
        "skipped_prompts": sums["skipped_prompts"],
        **{name: sums[name] for name in run.algorithm.batch_metrics(batch)},
        **{f"time_{name}_s": value for name, value in times.items()},
        "generation_tokens_per_s": sums["response_tokens"] / max(times["generation"], 1e-9),
        "train_tokens_per_s": (sums["student_tokens"] + sums["teacher_tokens"]) / max(train_s, 1e-9),
        "train_tflops_per_gpu": flops / max(train_s, 1e-9) / gpus / 1e12,
        "refresh_probe_max_diff": refreshed.probe_max_diff,
        "samples_generated_total": float(run.ledger.total_samples),
    }
    return StepOutcome(
        result,
        tokens=int(sums["student_tokens"] + sums["teacher_tokens"]),
        sample_lengths=student_lengths,
        consumed_samples=step * run.config.train.global_batch_size,
        metrics=metrics,
    )


def _train_flops(run: Run, student_lengths: list[int], teacher_lengths: list[int]) -> float:
    """Student forward + backward and the frozen model's forward FLOPs of the global batch."""
    from megatron_sdzero.training.flops import FlopsModel

    padded = padded_vocab_size(run.arch.vocab_size, run.config.student.model.make_vocab_size_divisible_by, 1)
    flops = FlopsModel.from_arch(run.arch, padded)
    frozen = flops.step_flops(teacher_lengths) / 3 if teacher_lengths else 0.0  # forward: 1 of 3 passes
    return flops.step_flops(student_lengths) + frozen


def _record_scores(run: Run) -> None:
    if dist.get_rank() == 0:
        run.config.run_dir.mkdir(parents=True, exist_ok=True)
        (run.config.run_dir / SCORES_FILE).write_text(json.dumps({str(k): v for k, v in run.scores.items()}))


def _token_samples_due(run: Run, step: int) -> bool:
    logging_config = run.config.logging
    return bool(logging_config.token_samples) and due(
        step, logging_config.token_samples_interval, run.total_steps
    )


def _token_sink(run: Run):
    """Keeps the first rows of the step's first micro-batch on the logging rank."""
    from megatron_sdzero.training.logging import is_logging_rank

    wanted = run.config.logging.token_samples
    run.token_rows = []
    calls = [0]

    def sink(batch: DistillBatch, values: torch.Tensor) -> None:
        calls[0] += 1
        if calls[0] > 1 or not is_logging_rank():
            return
        for b in range(min(wanted, batch.size)):
            mask = batch.loss_mask[b].bool()
            run.token_rows.append({
                "row": b,
                "ids": batch.targets[b][mask].tolist(),
                "values": values[b][mask.to(values.device)].float().tolist(),
                "reward": float(batch.rewards[b]),
            })  # fmt: skip

    return sink


def _write_token_samples(run: Run, step: int, rollout: Rollout) -> None:
    """Append this step's kept rows to RUN_DIR/token_samples.jsonl (read by ``sdzero report``)."""
    if not run.token_rows:
        return
    tokenizer = run.fmt.tokenizer
    lines = []
    for row in run.token_rows:
        problem = rollout.samples[row["row"]].problem_id if row["row"] < len(rollout.samples) else ""
        lines.append(json.dumps({
            "step": step, "problem_id": problem, "reward": row["reward"], "algorithm": run.config.algorithm,
            "tokens": [tokenizer.decode([i]) for i in row["ids"]], "values": row["values"],
        }))  # fmt: skip
    run.config.run_dir.mkdir(parents=True, exist_ok=True)
    with open(run.config.run_dir / TOKEN_SAMPLES_FILE, "a", encoding="utf-8") as out:
        out.write("".join(line + "\n" for line in lines))
    run.token_rows = []


def _sleep(engine: Any) -> None:
    if hasattr(engine, "sleep"):
        engine.sleep(level=2)  # weights are reloaded after every step anyway


# --- setup -------------------------------------------------------------------------------------------


def setup(config: DistillConfig) -> tuple[Run, int]:
    """Data and budget checks, parallel state, student, frozen model, resume or start, the engine;
    returns the run and its skipped-step count so far."""
    from megatron_sdzero.conversion.megatron_io import ModelMeta
    from megatron_sdzero.runtime.distributed import init_model_parallel
    from megatron_sdzero.training import checkpoint
    from megatron_sdzero.training.setup import build_frozen, setup_trainable

    problems, eval_problems, prior = load_and_check(config)
    init_model_parallel(config.parallel, seed=config.train.seed)
    root, _ = check_start(config)
    source = ModelMeta.read(root)
    model_cfg = config.student.model
    meta = ModelMeta(
        source.hf_config, model_cfg.params_dtype, model_cfg.make_vocab_size_divisible_by, str(root)
    )
    arch, hf_assets = meta.arch, root / "hf"
    steps = total_steps(len(problems), config.prompts_per_step, config.train.train_iters, config.train.epochs)
    student = setup_trainable(arch, config.student.model, config.train, steps)
    fmt = ChatFormat(_tokenizer(hf_assets))
    context = BatchContext(fmt, config.batch, _pad_id(fmt), config.prompt, arch.vocab_size)
    algorithm = build_algorithm(config, context)
    teacher = None
    if algorithm.uses_frozen_model:
        chunks = build_frozen(arch, teacher_model_config(config))
        checkpoint.finetune_from(config.teacher.checkpoint or config.student.checkpoint, chunks)
        teacher = Teacher(chunks, config.teacher)
    ledger = Ledger(
        config.algorithm, questions=len(problems), questions_digest=question_digest(p.id for p in problems),
        prior_samples=prior,
    )  # fmt: skip
    run = Run(
        config=config, algorithm=algorithm, arch=arch, meta=meta, hf_assets=hf_assets, student=student,
        teacher=teacher, fmt=fmt, problems=problems, eval_problems=eval_problems,
        refresher=WeightRefresher(
            config.refresh, arch, arch.vocab_size, config.refresh.dir or config.run_dir / "rollout_weights",
            hf_assets, config.student.model.params_dtype,
        ),
        ledger=ledger, total_steps=steps,
    )  # fmt: skip
    skipped = start_or_resume(run)
    run.step_logger = _logger(run)
    start_engine(run)
    return run, skipped


def load_and_check(config: DistillConfig) -> tuple[list[Problem], list[Problem], int]:
    """The question set (cut to budget.max_questions), the eval problems and the prior samples;
    everything that can be refused is refused here, before any model is built."""
    problems, _ = load_problems(config.problems)
    if not problems:
        raise ConfigError(f"problems: the source holds no problems ({describe(config.problems)})")
    if config.budget.max_questions is not None:
        problems = problems[: config.budget.max_questions]
    prior = prior_samples(config.budget)
    check_budget_allows_a_step(config.budget, prior, config.samples_per_step, config.prompts_per_step)
    if config.algorithm == "sdft":
        from megatron_sdzero.algorithms.sdft import require_solutions

        require_solutions(problems, "problems")
    eval_problems = load_problems(config.eval.problems)[0] if config.eval.problems else []
    return problems, eval_problems, prior


def build_algorithm(config: DistillConfig, context: BatchContext) -> Algorithm:
    if config.algorithm == "sdzero":
        from megatron_sdzero.algorithms.sdzero import SDZero

        return SDZero(context, resolve_phrases(config.student.family, config.phrases), config.loss)
    if config.algorithm == "sdft":
        from megatron_sdzero.algorithms.sdft import SDFT

        return SDFT(context, config.loss, config.sdft)
    from megatron_sdzero.algorithms.grpo import GRPO

    return GRPO(
        context, replace(config.grpo, loss=replace(config.grpo.loss, temperature=config.sampling.temperature))
    )


def check_start(config: DistillConfig) -> tuple[Path, Path]:
    """The student's starting checkpoint; SD-Zero refuses a plain base-model conversion unless told."""
    from megatron_sdzero.conversion.megatron_io import resolve_checkpoint

    root, directory = resolve_checkpoint(Path(config.student.checkpoint))
    if config.algorithm != "sdzero":
        return root, directory  # SDFT and GRPO start from the base model
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


def start_or_resume(run: Run) -> int:
    """Fine-tune start or resume; returns the skipped-step count so far."""
    from megatron_sdzero.training import checkpoint

    config = run.config
    source = config.checkpoint.load or config.checkpoint.save
    if not checkpoint.has_checkpoint(source):
        checkpoint.finetune_from(config.student.checkpoint, run.student)
        return 0
    synced = run.teacher is not None and config.teacher.sync != "none"
    template = {"teacher": run.teacher.sharded_state_dict()} if synced else None
    state = checkpoint.load(source, run.student, config=config.checkpoint, extra_sharded=template)
    saved_algorithm = state.extra_common.get("algorithm", "sdzero")
    if saved_algorithm != config.algorithm:
        raise ConfigError(
            f"{source} holds a {saved_algorithm} run, this recipe is {config.algorithm}: "
            "use a new checkpoint.save"
        )
    if synced:
        run.teacher.load_sharded(state.extra_sharded["teacher"])
    if run.teacher is not None:
        run.teacher.load_state(state.extra_common.get("teacher", {}))
    run.scores = {int(k): float(v) for k, v in state.extra_common.get("scores", {}).items()}
    if "budget" in state.extra_common:
        run.ledger = Ledger.from_state(state.extra_common["budget"])
    run.step = state.iteration
    return int(state.extra_common.get("skipped", 0))


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


def _pad_id(fmt: ChatFormat) -> int:
    pad = fmt.tokenizer.pad_token_id
    return pad if pad is not None else fmt.end_of_turn_id


def _logger(run: Run):
    from megatron_sdzero.training.flops import FlopsModel
    from megatron_sdzero.training.logging import StepLogger

    padded = padded_vocab_size(run.arch.vocab_size, run.config.student.model.make_vocab_size_divisible_by, 1)
    return StepLogger(
        run.config.logging, run.config.run_dir, flops=FlopsModel.from_arch(run.arch, padded),
        world_size=dist.get_world_size(), train_iters=run.total_steps, start_iteration=run.step,
        run_name=run.config.algorithm, run_config=to_dict(run.config),
    )  # fmt: skip
