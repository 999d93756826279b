"""``sdzero rft``: Rejection-sampling Fine-Tuning (Yuan et al. 2023), a baseline of the paper.

    sdzero rft --config examples/rft_qwen3_4b_math.yaml

1. collect: ``sampling.n`` responses per training question from the starting model, graded by the
   same reward as every other algorithm, through srt-collect's resumable store (``collect.revise``
   off: the verified-correct responses themselves are kept). Killed and rerun, it resumes.
2. filter: keep the verified-correct responses, drop exact duplicates per question (the paper also
   merges paths with the same equations; exact text is the conservative choice here), write
   ``OUTPUT/rft.jsonl`` (records with ``stage: response``).
3. train: one SFT stage on them from ``sft.init`` (the same Megatron trainer as Phase 1's SFT),
   into ``OUTPUT/sft/stage1`` (the RFT model).

Budget: ``budget.max_questions`` cuts the question set; ``budget.max_samples`` caps the questions
so that questions x sampling.n fits. ``OUTPUT/budget.json`` records what was spent.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from megatron_sdzero.algorithms.budget import Ledger, prior_samples, question_digest
from megatron_sdzero.algorithms.config import BudgetConfig
from megatron_sdzero.config import ConfigError, run_config_command, to_dict
from megatron_sdzero.data.formatting import ControlPhrases, PromptConfig
from megatron_sdzero.data.problems import Problem, ProblemSource, load_problems
from megatron_sdzero.models.builder import ModelConfig
from megatron_sdzero.rewards import RewardConfig
from megatron_sdzero.rollout.base import ModelSource, RolloutConfig, SamplingParams
from megatron_sdzero.runtime.distributed import ParallelConfig
from megatron_sdzero.srt.collector import CollectConfig
from megatron_sdzero.training.config import CheckpointConfig, LoggingConfig, TrainConfig
from megatron_sdzero.training.sft_data import SFTDataConfig

DATA_FILE = "rft.jsonl"
RECORD_FIELDS = ("problem_id", "messages", "y", "y_ids")


@dataclass
class RFTTraining:
    """The SFT stage on the kept samples (the settings of ``sdzero sft``)."""

    init: str = ""  # Megatron checkpoint of the starting model (`sdzero convert hf-to-mcore`)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class RFTConfig:
    model: ModelSource  # the starting model as a HF directory: it samples the training data
    problems: ProblemSource
    output_dir: Path = Path("outputs/rft")
    prompt: PromptConfig = field(default_factory=PromptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(n=4, temperature=1.0, top_p=1.0))
    reward: RewardConfig = field(default_factory=RewardConfig)
    collect: CollectConfig = field(default_factory=lambda: CollectConfig(target=10**9))
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    sft: RFTTraining = field(default_factory=RFTTraining)

    def __post_init__(self) -> None:
        if not self.sft.init:
            raise ConfigError("sft.init: the Megatron checkpoint of the starting model is required")
        if self.reward.mode != self.problems.mode:
            raise ConfigError(
                f"reward.mode: {self.reward.mode!r} does not grade {self.problems.mode!r} problems"
            )
        if self.budget.max_samples is not None and self.budget.max_samples < self.sampling.n:
            raise ConfigError(
                f"budget.max_samples={self.budget.max_samples} is smaller than one question's "
                f"sampling.n={self.sampling.n} samples"
            )


def question_set(problems: list[Problem], config: RFTConfig) -> list[Problem]:
    """The questions the budget allows: the first max_questions, then as many as max_samples pays for."""
    budget = config.budget
    if budget.max_questions is not None:
        problems = problems[: budget.max_questions]
    if budget.max_samples is not None:
        problems = problems[: max(0, budget.max_samples - prior_samples(budget)) // config.sampling.n]
    return problems


def collection_config(config: RFTConfig, questions: list[Problem]):
    """srt-collect's recipe for generation-only collection of exactly these questions."""
    from megatron_sdzero.srt.config import SRTConfig

    collect = replace(
        config.collect, output_dir=config.output_dir / "collect", num_responses=config.sampling.n,
        revise=False, shuffle=False, shard_index=0, num_shards=1,
    )  # fmt: skip
    return SRTConfig(
        model=config.model, problems=config.problems, prompt=config.prompt,
        phrases=ControlPhrases(correct="(unused by RFT)", incorrect="(unused by RFT)"),
        rollout=config.rollout, sampling=replace(config.sampling, n=1), reward=config.reward, collect=collect,
    )  # fmt: skip


def collect_samples(config: RFTConfig, questions: list[Problem], engine: Any = None) -> dict[str, Any]:
    """Step 1, resumable: the graded samples of every question in the store under OUTPUT/collect."""
    from megatron_sdzero.srt.collect import open_collector, run_batches
    from megatron_sdzero.srt.config import run_identity
    from megatron_sdzero.srt.store import CollectionStore

    srt = collection_config(config, questions)
    with CollectionStore.open(srt.collect.output_dir, run_identity(srt)) as store:
        todo = [p for p in questions if p.id not in store.done_ids]
        if todo:
            with open_collector(srt, engine, None) as collector:
                run_batches(collector, store, todo, replace(srt.collect, target=10**12))
        return {"counters": store.counters.summary(), "records": list(store.tuples())}


def filter_samples(records: list[dict]) -> list[dict]:
    """Verified-correct responses (the store keeps only those), exact duplicates per question dropped."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for record in sorted(records, key=lambda r: (r["problem_id"], r["index"])):
        key = (record["problem_id"], record["y"].strip())
        if record["reward"] > 0.5 and key not in seen:
            seen.add(key)
            kept.append(
                {"stage": "response", **{k: record[k] for k in ("problem_id", "messages", "y", "y_ids")}}
            )
    return kept


def write_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)


def sft_config(config: RFTConfig):
    from megatron_sdzero.training.sft import SFTConfig

    sft = config.sft
    data = replace(sft.data, stage1=str(config.output_dir / DATA_FILE), stage2="")
    return SFTConfig(
        init=sft.init, output_dir=str(config.output_dir / "sft"), stages=[1], model=sft.model,
        parallel=sft.parallel, data=data, train=sft.train, checkpoint=sft.checkpoint, logging=sft.logging,
    )  # fmt: skip


def run_rft(config: RFTConfig, engine: Any = None) -> dict[str, Any]:
    """Collect (resumable), filter, train one SFT stage; returns the budget record."""
    from megatron_sdzero.training.sft import run_sft

    problems, _ = load_problems(config.problems)
    questions = question_set(problems, config)
    if not questions:
        raise ConfigError(
            f"budget: no question fits (max_questions / max_samples with sampling.n={config.sampling.n})"
        )
    config.output_dir.mkdir(parents=True, exist_ok=True)
    digest = question_digest(p.id for p in questions)
    ledger = Ledger("rft", len(questions), digest, prior_samples(config.budget))
    collected = collect_samples(config, questions, engine)
    counters = collected["counters"]
    kept = filter_samples(collected["records"])
    write_records(config.output_dir / DATA_FILE, kept)
    print(
        f"rft: {len(questions)} questions x {config.sampling.n} samples: {counters['init_attempts']} "
        f"sampled, {counters['init_correct']} verified correct, {len(kept)} kept after dedupe",
        flush=True,
    )
    if not kept:
        raise ConfigError(
            "rft: no verified-correct sample to train on (a stronger model, more samples or easier problems)"
        )
    began = time.perf_counter()
    status = run_sft(sft_config(config))
    ledger.samples_generated = counters["init_attempts"]
    ledger.samples_trained = len(kept)
    ledger.training_tokens = _training_tokens(config.output_dir / "sft" / "stage1")
    ledger.steps = _steps(config.output_dir / "sft" / "stage1")
    gpus = int(os.environ.get("WORLD_SIZE", "1"))  # the SFT stage's ranks
    ledger.add_seconds({"generation": counters["generation_s"], "grading": counters["grading_s"]}, 1)
    ledger.add_seconds({"train": time.perf_counter() - began}, gpus)
    ledger.write(config.output_dir, config.budget)
    if status != 0:
        raise RuntimeError(f"rft: the SFT stage stopped with status {status}")
    return {**ledger.state(), "config": to_dict(config)}


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def _training_tokens(run_dir: Path) -> int:
    return int(sum(record.get("num_target_tokens", 0) for record in _metrics(run_dir)))


def _steps(run_dir: Path) -> int:
    return len(_metrics(run_dir))


def main(argv: Sequence[str] | None = None) -> int:
    def run(config: RFTConfig) -> int:
        record = run_rft(config)
        print(
            f"sdzero rft: done; {record['samples_generated']} samples generated, "
            f"{record['samples_trained']} trained on; the model is {config.output_dir / 'sft' / 'stage1'}, "
            f"the budget {config.output_dir / 'budget.json'}",
            flush=True,
        )
        return 0

    argv = sys.argv[1:] if argv is None else argv
    return run_config_command("sdzero rft", __doc__.split("\n\n")[0], RFTConfig, run, argv)
