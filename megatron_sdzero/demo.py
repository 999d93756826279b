"""``sdzero demo``: SD-Zero end to end on a tiny model, on CPU, offline.

Every stage is the command a user would run (``sdzero convert``, ``srt-collect``, ``srt-prepare``,
``sft``, ``distill``, ``eval``), with its recipe written to ``<output_dir>/recipes/``. A stage whose
output is complete is skipped, so an interrupted demo picks up where it stopped.

What a tiny random model can show: that every stage runs, hands its output to the next one, logs
what it measured and resumes. It cannot show the method's gains: a random model solves no
arithmetic, so Phase 1 keeps (almost) no revision tuples, and the demo trains the two SFT stages on
synthetic SRT records instead (wrong first answer, the control phrase, a correct revision; see
training/demo_data.py), clearly a stand-in for what collection gives a real model.
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

from megatron_sdzero.config import run_config_command


@dataclass
class DemoConfig:
    output_dir: str = "outputs/demo"
    family: str = "qwen3"
    num_problems: int = 24
    max_tokens: int = 32
    synthetic_records: int = 64
    distill_steps: int = 6
    seed: int = 0


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


def phase1_recipe(demo: Demo) -> dict[str, Any]:
    cfg = demo.cfg
    return {
        "model": {"path": str(demo.path("base_hf")), "family": cfg.family},
        "problems": {
            "arithmetic": {"n": cfg.num_problems, "seed": cfg.seed, "difficulty": 1},
            "mode": "math",
        },
        "rollout": {"engine": "hf", "max_model_len": 1024, "batch_size": 16, "threads": 1, "seed": cfg.seed},
        "sampling": {"temperature": 1.0, "top_p": 0.9, "max_tokens": cfg.max_tokens},
        "reward": {"mode": "math", "math": {"num_workers": 1}},
        "collect": {
            "output_dir": str(demo.path("srt")),
            "target": cfg.num_problems,
            "batch_size": 8,
            "num_responses": 2,
            "num_revisions": 1,
            "revise_correct": True,
            "seed": cfg.seed,
        },
        "prepare": {"split": {"stage2_size": 4, "stage1_size": 8, "seed": cfg.seed}},
    }


def sft_recipe(demo: Demo) -> dict[str, Any]:
    data = demo.path("sft_data")
    return {
        "init": str(demo.path("base_mcore")),
        "output_dir": str(demo.path("sft")),
        "stages": [1, 2],
        "model": {"params_dtype": "float32", "transformer_impl": "local"},
        "data": {
            "stage1": str(data / "stage1.jsonl"),
            "stage2": str(data / "stage2.jsonl"),
            "seq_length": 256,
        },
        "train": {
            "lr": 1.0e-3,
            "min_lr": 1.0e-4,
            "lr_schedule": "cosine",
            "warmup_ratio": 0.1,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "epochs": 2,
            "seed": 1234,
        },
        "checkpoint": {"interval": 1000, "keep_last": 1},
        "logging": {"interval": 8, "progress": False},
    }


def distill_recipe(demo: Demo) -> dict[str, Any]:
    cfg = demo.cfg
    return {
        "student": {
            "checkpoint": str(demo.path("sft") / "stage2"),
            "family": cfg.family,
            "model": {"params_dtype": "float32", "transformer_impl": "local"},
        },
        "teacher": {"sync": "copy", "sync_interval": 3},
        "problems": {"arithmetic": {"n": 64, "seed": cfg.seed + 1, "difficulty": 1}, "mode": "math"},
        "rollout": {"engine": "hf", "max_model_len": 1024, "batch_size": 8, "threads": 1},
        "sampling": {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": cfg.max_tokens},
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
            "problems": {"arithmetic": {"n": 8, "seed": 1000, "difficulty": 1}},
            "interval": 3,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": cfg.max_tokens},
            "options": {"k": 4, "pass_at": [1, 4]},
        },
        "checkpoint": {"save": str(demo.path("distill")), "interval": 3, "keep_last": None},
        "logging": {"interval": 1, "progress": False},
        "schedule": {"seed": cfg.seed, "keep_best": 1},
    }


def make_base_model(demo: Demo) -> None:
    from megatron_sdzero.assets.tiny import make_tiny_model

    make_tiny_model(demo.path("base_hf"), family=demo.cfg.family, num_layers=4, seed=demo.cfg.seed)


def write_synthetic_sft_data(demo: Demo) -> None:
    from megatron_sdzero.training.demo_data import write_demo_data

    write_demo_data(
        demo.path("base_hf"), demo.path("sft_data"), n=demo.cfg.synthetic_records, seed=demo.cfg.seed
    )


def distill_done(demo: Demo) -> bool:
    from megatron_sdzero.training.checkpoint import latest_iteration

    return latest_iteration(demo.path("distill")) == demo.cfg.distill_steps


def _jsonl(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def report(demo: Demo) -> None:
    srt = json.loads((demo.path("srt") / "summary.json").read_text())
    print("\n[demo] summary")
    print(
        f"  Phase 1 collection: {srt['problems']} problems, initial accuracy {srt['init_accuracy']:.3f}, "
        f"revised accuracy {srt['revised_accuracy']:.3f}, tuples kept {srt['tuples_kept']}"
    )
    sft_done = [
        json.loads((demo.path("sft") / f"stage{i}" / "sft_finished.json").read_text()) for i in (1, 2)
    ]
    for i, done in enumerate(sft_done, start=1):
        print(f"  SFT stage {i}: {json.dumps(done, default=str)[:300]}")
    steps = _jsonl(demo.path("distill") / "metrics.jsonl")
    for row in steps:
        shown = {k: row[k] for k in ("iteration", "reward_mean", "kl", "loss", "grad_norm") if k in row}
        print(f"  distill step: {shown}")
    scores = demo.path("distill") / "eval_scores.json"
    if scores.exists():
        print(f"  distill eval avg@k by step: {scores.read_text()}")
    for name, seconds in demo.timings.items():
        print(f"  {name}: {seconds:.0f}s")
    print(f"  outputs: {demo.out}")
    print(f"    recipes: {demo.recipes}   SRT model: {demo.path('sft') / 'stage2'}")
    print(f"    distilled student: {demo.path('distill')}   exported: {demo.path('final_hf')}")


def run_demo(cfg: DemoConfig) -> int:
    demo = Demo(cfg)
    base_hf, base_mcore = demo.path("base_hf"), demo.path("base_mcore")
    if not (base_hf / "config.json").exists():
        print("[demo] make a tiny random HF model (offline)")
        make_base_model(demo)
    demo.stage(
        "HF -> Megatron at TP2 x PP2",
        base_mcore,
        "convert",
        "hf-to-mcore",
        str(base_hf),
        str(base_mcore),
        "--tp",
        "2",
        "--pp",
        "2",
    )
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
    if not (demo.path("sft_data") / "stage1.jsonl").exists():
        print("\n[demo] a random model keeps no tuples: write synthetic SRT records for the SFT stages")
        write_synthetic_sft_data(demo)
    sft = demo.recipe("sft", sft_recipe(demo))
    demo.stage(
        "Phase 1: two-stage SFT (the SRT model)",
        demo.path("sft") / "stage2" / "sft_finished.json",
        "sft",
        "--config",
        sft,
    )
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
    report(demo)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_command(
        "sdzero demo", "SD-Zero end to end on a tiny model (CPU)", DemoConfig, run_demo, argv or []
    )
