"""``sdzero demo``: the method end to end on a tiny model, on CPU, offline.

Each stage writes under ``demo.output_dir`` and prints what it measured; a stage whose output is
already complete is skipped, so an interrupted demo picks up where it stopped.

A tiny random model cannot solve arithmetic, so Phase 1 keeps few or no revision tuples: the demo
shows that every stage runs and hands its output to the next one, not that the method works.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sdzero.config import from_dict, run_config_command


@dataclass
class DemoConfig:
    output_dir: str = "outputs/demo"
    family: str = "qwen3"
    num_problems: int = 24
    max_tokens: int = 32
    tp: int = 2
    pp: int = 2
    seed: int = 0


def stage(name: str, done: Path, run: Callable[[], Any]) -> None:
    if done.exists():
        print(f"[demo] {name}: already done ({done})")
        return
    start = time.perf_counter()
    print(f"[demo] {name} ...", flush=True)
    run()
    print(f"[demo] {name}: {time.perf_counter() - start:.1f}s", flush=True)


def make_model(cfg: DemoConfig, path: Path) -> None:
    from megatron_sdzero.assets.tiny import make_tiny_model

    make_tiny_model(path, family=cfg.family, num_layers=4, seed=cfg.seed)


def srt_config(cfg: DemoConfig, model_dir: Path, out: Path):
    from megatron_sdzero.srt.config import SRTConfig

    return from_dict(
        SRTConfig,
        {
            "model": {"path": str(model_dir), "family": cfg.family},
            "problems": {"arithmetic": {"n": cfg.num_problems, "seed": cfg.seed, "difficulty": 1}, "mode": "math"},
            "rollout": {"engine": "hf", "max_model_len": 1024, "batch_size": 16, "threads": 1, "seed": cfg.seed},
            "sampling": {"temperature": 1.0, "top_p": 0.9, "max_tokens": cfg.max_tokens},
            "reward": {"mode": "math", "math": {"num_workers": 1}},
            "collect": {
                "output_dir": str(out / "srt"),
                "target": cfg.num_problems,
                "batch_size": 8,
                "num_responses": 2,
                "num_revisions": 1,
                "revise_correct": True,
                "seed": cfg.seed,
            },
            "prepare": {"split": {"stage2_size": 4, "stage1_size": 8, "seed": cfg.seed}},
        },
    )


def run_demo(cfg: DemoConfig) -> int:
    from megatron_sdzero.conversion.convert import hf_to_mcore, mcore_to_hf
    from megatron_sdzero.srt.collect import collect
    from megatron_sdzero.srt.prepare import prepare

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base, mcore, exported = out / "base_hf", out / "base_mcore", out / "base_export_hf"
    srt = srt_config(cfg, base, out)

    stage("make a tiny HF model", base / "config.json", lambda: make_model(cfg, base))
    stage(f"convert HF -> Megatron (tp={cfg.tp}, pp={cfg.pp})", mcore, lambda: hf_to_mcore(base, mcore, tp=cfg.tp, pp=cfg.pp))
    stage("convert Megatron -> HF", exported, lambda: mcore_to_hf(mcore, exported))
    stage("Phase 1: SRT collection", out / "srt" / "summary.json", lambda: collect(srt))
    stage("Phase 1: prepare the two SFT stages", out / "srt" / "stage1.jsonl", lambda: prepare(srt))

    summary = json.loads((out / "srt" / "summary.json").read_text())
    print(json.dumps({"outputs": str(out.resolve()), "srt_summary": summary}, indent=2, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_command(
        "sdzero demo", "SD-Zero end to end on a tiny model (CPU)", DemoConfig, run_demo, argv or []
    )
