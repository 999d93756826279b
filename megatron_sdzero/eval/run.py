"""``sdzero eval``: avg@k and pass@k of a checkpoint on a problem source, as a JSON report.

    sdzero eval --config examples/eval_qwen3_4b_aime24.yaml model.path=outputs/distill/qwen3_4b/hf/step_000200

``model.path`` is a Hugging Face directory (or hub name) or a Megatron checkpoint written by
``sdzero convert`` or a training run; a Megatron checkpoint is exported to HF first (into
``eval.export_dir``, default ``<output dir>/hf``) and the rollout engine reads the export.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sdzero.checks import check_model_path, check_output_dir
from megatron_sdzero.config import ConfigError, run_config_command, to_dict
from megatron_sdzero.data.formatting import ChatFormat, PromptConfig
from megatron_sdzero.data.problems import ProblemSource, load_problems
from megatron_sdzero.eval.evaluate import EvalOptions, evaluate
from megatron_sdzero.rewards import RewardConfig, build_reward
from megatron_sdzero.rollout.base import ModelSource, RolloutConfig, SamplingParams, build_engine


@dataclass
class EvalOutput:
    report: Path = Path("outputs/eval/report.json")
    export_dir: Path | None = None  # where a Megatron checkpoint is exported; default <report dir>/hf


@dataclass
class EvalConfig:
    model: ModelSource
    problems: ProblemSource
    prompt: PromptConfig = field(default_factory=PromptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, top_p=1.0))
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalOptions = field(default_factory=EvalOptions)
    output: EvalOutput = field(default_factory=EvalOutput)

    def __post_init__(self) -> None:
        if self.reward.mode != self.problems.mode:
            raise ConfigError(
                f"reward.mode: {self.reward.mode!r} does not grade {self.problems.mode!r} problems"
            )

    @property
    def run_dir(self) -> Path:
        return self.output.report.parent


def is_megatron_checkpoint(path: Path) -> bool:
    from megatron_sdzero.conversion.megatron_io import MODEL_META, TRACKER

    return (path / TRACKER).is_file() or (path / MODEL_META).is_file() or (path / "metadata.json").is_file()


def hf_model_dir(config: EvalConfig) -> Path:
    """The HF directory the engine loads: the model path, or its export if it is a Megatron checkpoint."""
    path = Path(config.model.path)
    if not path.is_dir() or not is_megatron_checkpoint(path):
        return path
    from megatron_sdzero.conversion.convert import mcore_to_hf

    export = config.output.export_dir or config.output.report.parent / "hf"
    return mcore_to_hf(path, export, overwrite=True)


def run_eval(config: EvalConfig, engine: Any = None) -> dict[str, Any]:
    """Evaluate and write the report; ``engine``: injected by tests."""
    started = time.perf_counter()
    problems, load_report = load_problems(config.problems)
    owned = engine is None
    check_output_dir(config.output.report.parent, "output.report")
    if owned:
        check_model_path(config.model.path, "model.path")
        engine = build_engine(ModelSource(hf_model_dir(config), config.model.family), config.rollout)
    try:
        with build_reward(config.reward) as grader:
            report = evaluate(
                problems, engine, grader, ChatFormat(engine.tokenizer), config.sampling, config.eval,
                config.prompt,
            )  # fmt: skip
    finally:
        if owned:
            engine.close()
    result = {
        "model": str(config.model.path),
        "source": load_report.as_dict(),
        "k": config.eval.k,
        **report.as_dict(),
        "seconds": round(time.perf_counter() - started, 3),
        "config": to_dict(config),
    }
    config.output.report.parent.mkdir(parents=True, exist_ok=True)
    config.output.report.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    def run(config: EvalConfig) -> int:
        result = run_eval(config)
        scores = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith(("avg@", "pass@")))
        skipped = sum(result["source"]["skipped"].values())
        malformed = f" ({skipped} malformed rows skipped)" if skipped else ""
        print(
            f"sdzero eval: {result['num_problems']} problems{malformed}, {scores}; "
            f"report in {config.output.report}"
        )
        return 0

    argv = sys.argv[1:] if argv is None else argv
    return run_config_command("sdzero eval", __doc__.split("\n\n")[0], EvalConfig, run, argv)
