"""``sdzero demo``: SD-Zero end to end on a tiny model, on CPU, offline.

Every stage is the command a user would run (``sdzero convert``, ``sft``, ``srt-collect``,
``srt-prepare``, ``distill``, ``eval``), with its recipe written to ``<output_dir>/recipes/``; the
training runs draw their own PNG plots (``<run>/report/``). A stage whose output is complete is
skipped, so an interrupted demo picks up where it stopped.

The toy task is arithmetic difficulty 0 (a sum or difference of numbers up to 20). A random model
solves none of it, so the demo first teaches its tiny model the task a little: a seeded warm-up with
``sdzero sft`` on (problem, worked answer) pairs whose problems are none of those the demo collects
on, distills on or evaluates on. The warm-up's length and learning rate were chosen on a validation
split, not on the demo's eval problems: 64 problems of seed 777, held out of the tuning runs' warm-up
data, scored avg@4 0.055 after 300 steps, 0.117 after 600 and 0.320 after 900 (the default). So the
model is right a fraction of the time: Phase 1 keeps real verified tuples, both SFT stages train on
them and Phase 2 sees nonzero rewards. ``sdzero eval`` scores the random, warmed-up, SRT and
distilled models on the same held-out problems, and the last lines say what happened.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_sdzero.config import ConfigError, run_config_command

TOY_DIFFICULTY = 0
EVAL_SEED = 1000


@dataclass
class DemoConfig:
    output_dir: str = "outputs/demo"
    family: str = "qwen3"
    warmup_steps: int = 900  # SFT steps of the warm-up on (problem, worked answer) pairs
    warmup_lr: float = 5.0e-3
    num_problems: int = 96  # Phase 1 collection
    eval_problems: int = 32  # the held-out problems every model is scored on
    max_tokens: int = 32
    distill_steps: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "num_problems", "eval_problems", "max_tokens", "distill_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir).resolve()
        self.recipes = self.out / "recipes"
        self.recipes.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    def path(self, name: str) -> Path:
        return self.out / name

    def stage(self, name: str, done: Path | Callable[[], bool], *command: str) -> None:
        if done.exists() if isinstance(done, Path) else done():
            print(f"\n[demo] {name}: already done", flush=True)
            return
        print(f"\n[demo] {name}\n[demo] $ sdzero {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "megatron_sdzero.cli", *command], check=True)
        self.timings[name] = time.perf_counter() - start
        print(f"[demo] {name}: {self.timings[name]:.0f}s", flush=True)

    def recipe(self, name: str, values: dict[str, Any]) -> str:
        path = self.recipes / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return str(path)


# --- the problem sets: collection, distillation and eval are held out of the warm-up ------------------


def collect_problems(cfg: DemoConfig) -> dict[str, Any]:
    return {"n": cfg.num_problems, "seed": cfg.seed, "difficulty": TOY_DIFFICULTY}


def distill_problems(cfg: DemoConfig) -> dict[str, Any]:
    return {"n": 64, "seed": cfg.seed + 1, "difficulty": TOY_DIFFICULTY}


def eval_problems(cfg: DemoConfig) -> dict[str, Any]:
    return {"n": cfg.eval_problems, "seed": EVAL_SEED, "difficulty": TOY_DIFFICULTY}


def warmup_records(cfg: DemoConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """(problem, worked answer) SFT records of the toy task, none of them a problem the demo uses later."""
    from megatron_sdzero.data.arithmetic import make_arithmetic_problems
    from megatron_sdzero.data.formatting import build_messages, chat_format

    held_out = {
        row["problem"]
        for spec in (collect_problems(cfg), distill_problems(cfg), eval_problems(cfg))
        for row in make_arithmetic_problems(**spec)
    }
    end_of_turn = chat_format(tokenizer).end_of_turn_id
    rows = make_arithmetic_problems(600, seed=cfg.seed + 555, difficulty=TOY_DIFFICULTY)
    return [
        {
            "stage": "response",
            "problem_id": f"warmup-{index}",
            "mode": "math",
            "messages": build_messages(row["problem"], "math"),
            "y_ids": tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [end_of_turn],
        }
        for index, row in enumerate(r for r in rows if r["problem"] not in held_out)
    ]


def write_warmup_data(demo: Demo) -> Path:
    from transformers import AutoTokenizer

    path = demo.path("warmup_data") / "train.jsonl"
    if not path.exists():
        records = warmup_records(demo.cfg, AutoTokenizer.from_pretrained(demo.path("base_hf")))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in records))
        partial.replace(path)
        print(f"\n[demo] warm-up data: {len(records)} worked answers in {path}", flush=True)
    return path


# --- recipes ------------------------------------------------------------------------------------------

LOCAL_FLOAT32 = {"params_dtype": "float32", "transformer_impl": "local"}


def warmup_recipe(demo: Demo, data: Path) -> dict[str, Any]:
    cfg = demo.cfg
    return {
        "init": str(demo.path("base_mcore")),
        "output_dir": str(demo.path("warmup")),
        "stages": [1],
        "model": LOCAL_FLOAT32,
        "data": {"stage1": str(data), "seq_length": 256, "pad_to_multiple_of": 8},
        "train": {
            "lr": cfg.warmup_lr,
            "min_lr": cfg.warmup_lr / 10,
            "lr_schedule": "cosine",
            "warmup_ratio": 0.05,
            "micro_batch_size": 16,
            "global_batch_size": 16,
            "epochs": None,
            "train_iters": cfg.warmup_steps,
            "seed": cfg.seed + 1234,
        },
        "checkpoint": {"interval": 300, "keep_last": 1},
        "logging": {"interval": 100, "progress": False},
    }


def phase1_recipe(demo: Demo) -> dict[str, Any]:
    cfg = demo.cfg
    return {
        "model": {"path": str(demo.path("warm_hf")), "family": cfg.family},
        "problems": {"arithmetic": collect_problems(cfg), "mode": "math"},
        "rollout": {"engine": "hf", "max_model_len": 1024, "batch_size": 32, "threads": 1, "seed": cfg.seed},
        "sampling": {"temperature": 1.0, "top_p": 0.9, "max_tokens": cfg.max_tokens},
        "reward": {"mode": "math", "math": {"num_workers": 1}},
        "collect": {
            "output_dir": str(demo.path("srt")),
            "target": 4 * cfg.num_problems,
            "batch_size": 16,
            "num_responses": 4,
            "num_revisions": 2,
            "revise_correct": True,
            "seed": cfg.seed,
        },
        "prepare": {"split": {"stage2_size": 16, "stage1_size": 64, "seed": cfg.seed}},
    }


def sft_recipe(demo: Demo) -> dict[str, Any]:
    data = demo.path("srt") / "sft"
    return {
        "init": str(demo.path("warmup") / "stage1"),
        "output_dir": str(demo.path("sft")),
        "stages": [1, 2],
        "model": LOCAL_FLOAT32,
        "data": {
            "stage1": str(data / "stage1.jsonl"),
            "stage2": str(data / "stage2.jsonl"),
            "seq_length": 256,
            "pad_to_multiple_of": 8,
        },
        "train": {
            "lr": 3.0e-4,
            "min_lr": 3.0e-5,
            "lr_schedule": "cosine",
            "warmup_ratio": 0.1,
            "micro_batch_size": 4,
            "global_batch_size": 4,
            "epochs": 2,
            "seed": 1234,
        },
        "checkpoint": {"interval": 1000, "keep_last": 1},
        "logging": {"interval": 8, "progress": False},
    }


def sampling(cfg: DemoConfig) -> dict[str, Any]:
    return {"temperature": 1.0, "top_p": 1.0, "max_tokens": cfg.max_tokens}


def distill_recipe(demo: Demo) -> dict[str, Any]:
    cfg = demo.cfg
    return {
        "student": {
            "checkpoint": str(demo.path("sft") / "stage2"),
            "family": cfg.family,
            "model": LOCAL_FLOAT32,
        },
        "teacher": {"sync": "copy", "sync_interval": 3},
        "problems": {"arithmetic": distill_problems(cfg), "mode": "math"},
        "rollout": {"engine": "hf", "max_model_len": 1024, "batch_size": 8, "threads": 1},
        "sampling": {"n": 1, **sampling(cfg)},
        "reward": {"mode": "math", "math": {"num_workers": 1}},
        "batch": {"student_max_tokens": 256, "teacher_budget": 512},
        "loss": {"kind": "reverse"},
        "train": {
            "lr": 1.0e-4,
            "min_lr": 1.0e-4,
            "lr_schedule": "constant",
            "warmup_steps": 2,
            "warmup_init_lr": 1.0e-5,
            "weight_decay": 0.01,
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "clip_grad": 1.0,
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "train_iters": cfg.distill_steps,
            "epochs": None,
        },
        "refresh": {"mode": "disk", "keep_versions": 2, "probe": {"num_tokens": 16, "atol": 1.0e-4}},
        "eval": {
            "problems": {"arithmetic": eval_problems(cfg)},
            "interval": 3,
            "at_start": True,
            "sampling": sampling(cfg),
            "options": {"k": 4, "pass_at": [1, 4]},
        },
        "checkpoint": {"save": str(demo.path("distill")), "interval": 3, "keep_last": None},
        "logging": {"interval": 1, "progress": False, "token_samples_interval": 3},
        "schedule": {"seed": cfg.seed, "keep_best": 1},
    }


def eval_recipe(demo: Demo, model: Path, name: str) -> dict[str, Any]:
    return {
        "model": {"path": str(model)},
        "problems": {"arithmetic": eval_problems(demo.cfg), "mode": "math"},
        "reward": {"mode": "math", "math": {"num_workers": 1}},
        "rollout": {"engine": "hf", "max_model_len": 1024, "batch_size": 32, "threads": 1},
        "sampling": sampling(demo.cfg),
        "eval": {"k": 4, "pass_at": [1, 4], "seed": demo.cfg.seed},
        "output": {"dir": str(demo.path("eval") / name)},
    }


# --- stages -------------------------------------------------------------------------------------------

EVALS = {  # name -> what was scored
    "random": "the random model",
    "warm": "after the warm-up (Phase 1's starting model)",
    "srt": "after Phase 1 (the SRT model: two-stage SFT on the kept tuples)",
    "distilled": "after Phase 2 (self-distillation)",
}


def evaluate(demo: Demo, name: str, model: Path) -> None:
    recipe = demo.recipe(f"eval_{name}", eval_recipe(demo, model, name))
    results = demo.path("eval") / name / "results.json"
    demo.stage(f"eval: {EVALS[name]}", results, "eval", "--config", recipe)


def make_base_model(demo: Demo) -> None:
    from megatron_sdzero.assets.tiny import make_tiny_model

    make_tiny_model(demo.path("base_hf"), family=demo.cfg.family, num_layers=4, seed=demo.cfg.seed)


def distill_done(demo: Demo) -> bool:
    from megatron_sdzero.training.checkpoint import latest_iteration

    return latest_iteration(demo.path("distill")) == demo.cfg.distill_steps


def run_demo(cfg: DemoConfig) -> int:
    demo = Demo(cfg)
    base_hf, base_mcore = demo.path("base_hf"), demo.path("base_mcore")
    if not (base_hf / "config.json").exists():
        print("[demo] make a tiny random HF model (offline)")
        make_base_model(demo)
    demo.stage(
        "HF -> Megatron at TP2 x PP2", base_mcore, "convert", "hf-to-mcore", str(base_hf), str(base_mcore),
        "--tp", "2", "--pp", "2",
    )  # fmt: skip
    evaluate(demo, "random", base_hf)
    warmup = demo.recipe("warmup", warmup_recipe(demo, write_warmup_data(demo)))
    demo.stage(
        f"warm-up: {cfg.warmup_steps} SFT steps on worked answers of the toy task",
        demo.path("warmup") / "stage1" / "sft_finished.json",
        "sft",
        "--config",
        warmup,
    )
    warm_hf = demo.path("warm_hf")
    demo.stage(
        "export the warmed-up model to HF (Phase 1 samples from it)",
        warm_hf,
        "convert",
        "mcore-to-hf",
        str(demo.path("warmup") / "stage1"),
        str(warm_hf),
    )
    evaluate(demo, "warm", warm_hf)
    phase1 = demo.recipe("phase1", phase1_recipe(demo))
    demo.stage(
        "Phase 1: SRT collection", demo.path("srt") / "summary.json", "srt-collect", "--config", phase1
    )
    demo.stage(
        "Phase 1: clean, dedupe, split",
        demo.path("srt") / "sft" / "prepare_summary.json",
        "srt-prepare",
        "--config",
        phase1,
    )
    check_tuples_kept(demo)
    sft = demo.recipe("sft", sft_recipe(demo))
    demo.stage(
        "Phase 1: two-stage SFT on the kept tuples (the SRT model)",
        demo.path("sft") / "stage2" / "sft_finished.json",
        "sft",
        "--config",
        sft,
    )
    evaluate(demo, "srt", demo.path("sft") / "stage2")
    distill = demo.recipe("distill", distill_recipe(demo))
    demo.stage(
        "Phase 2: on-policy self-distillation", lambda: distill_done(demo), "distill", "--config", distill
    )
    demo.stage(
        "export the student to HF",
        demo.path("final_hf"),
        "convert",
        "mcore-to-hf",
        str(demo.path("distill")),
        str(demo.path("final_hf")),
    )
    evaluate(demo, "distilled", demo.path("final_hf"))
    summarize(demo)
    return 0


def check_tuples_kept(demo: Demo) -> None:
    sizes = _stage_sizes(demo)
    if not all(sizes.values()):
        counts = json.loads((demo.path("srt") / "sft" / "prepare_summary.json").read_text())
        raise SystemExit(
            f"sdzero demo: Phase 1 left stage 1 {sizes['stage1']} and stage 2 {sizes['stage2']} tuples "
            f"({counts['tuples_read']} kept, {counts['unique']} unique): one stage would have no data; "
            f"raise warmup_steps or num_problems (and delete {demo.path('srt')})"
        )


def _stage_sizes(demo: Demo) -> dict[str, int]:
    data = demo.path("srt") / "sft"
    return {name: len(_jsonl(data / f"{name}.jsonl")) for name in ("stage1", "stage2")}


# --- the summary --------------------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def eval_score(demo: Demo, name: str) -> dict[str, float]:
    results = json.loads((demo.path("eval") / name / "results.json").read_text())
    benchmark = results["benchmarks"]["default"]  # eval_recipe's single-benchmark form
    return {key: float(benchmark[key]) for key in ("avg@4", "pass@4")}


def summarize(demo: Demo) -> None:
    cfg = demo.cfg
    srt = json.loads((demo.path("srt") / "summary.json").read_text())
    steps = _jsonl(demo.path("distill") / "metrics.jsonl")
    rewards = [row["reward_mean"] for row in steps if "reward_mean" in row]
    sizes = _stage_sizes(demo)
    print("\n[demo] what happened")
    for name, what in EVALS.items():
        score = eval_score(demo, name)
        print(
            f"  accuracy {what}: avg@4 {score['avg@4']:.3f}, pass@4 {score['pass@4']:.3f} "
            f"on {cfg.eval_problems} held-out problems"
        )
    print(
        f"  Phase 1 collection: {srt['problems']} problems, {srt['init_attempts']} first answers "
        f"({srt['init_accuracy']:.3f} right), {srt['revision_attempts']} revisions "
        f"({srt['revised_accuracy']:.3f} right): {srt['tuples_kept']} verified tuples kept"
    )
    print(f"  Phase 1 SFT: stage 1 on {sizes['stage1']} tuples, stage 2 on {sizes['stage2']} tuples")
    if rewards:
        print(
            f"  Phase 2: {len(steps)} distillation steps, mean reward of the student's answers "
            f"{rewards[0]:.3f} at step 1, {rewards[-1]:.3f} at step {len(rewards)}"
        )
    for name, seconds in demo.timings.items():
        print(f"  {name}: {seconds:.0f}s")
    print(f"  outputs: {demo.out} (recipes in {demo.recipes})")
    print(f"    SRT model: {demo.path('sft') / 'stage2'}   distilled student: {demo.path('distill')}")
    print(f"    exported: {demo.path('final_hf')}   eval results: {demo.path('eval')}/*/results.md")
    plots = [d / "report" for d in _run_dirs(demo) if (d / "report").is_dir()]
    print("  plots (PNG): " + ("  ".join(str(p) for p in plots) if plots else "none were written"))


def _run_dirs(demo: Demo) -> list[Path]:
    return [
        demo.path("warmup") / "stage1",
        *(demo.path("sft") / f"stage{i}" for i in (1, 2)),
        demo.path("distill"),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_command(
        "sdzero demo", "SD-Zero end to end on a tiny model (CPU)", DemoConfig, run_demo, argv or []
    )
