"""The Phase 1 recipe: one config tree read by both ``srt-collect`` and ``srt-prepare``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sdzero.config import ConfigError, to_dict
from megatron_sdzero.data.formatting import ControlPhrases, PromptConfig, resolve_phrases
from megatron_sdzero.data.problems import ProblemSource
from megatron_sdzero.rewards import RewardConfig
from megatron_sdzero.rollout.base import ModelSource, RolloutConfig, SamplingParams
from megatron_sdzero.srt.cleaning import CleaningConfig
from megatron_sdzero.srt.collector import CollectConfig
from megatron_sdzero.srt.split import SplitConfig


@dataclass
class PrepareConfig:
    """srt-prepare's inputs (run directories or tuples.jsonl files) and output directory.

    By default it reads the recipe's collect.output_dir and writes <collect.output_dir>/sft.
    """

    inputs: list[Path] = field(default_factory=list)
    output_dir: Path | None = None
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class SRTConfig:
    model: ModelSource
    problems: ProblemSource
    prompt: PromptConfig = field(default_factory=PromptConfig)
    phrases: ControlPhrases = field(default_factory=ControlPhrases)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, top_p=0.9))
    reward: RewardConfig = field(default_factory=RewardConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def __post_init__(self) -> None:
        resolve_phrases(self.model.family, self.phrases)  # an unknown family without phrases fails here
        if self.reward.mode != self.problems.mode:
            raise ConfigError(
                f"reward.mode: {self.reward.mode!r} does not grade {self.problems.mode!r} problems"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.collect.output_dir)


def run_identity(config: SRTConfig) -> dict[str, Any]:
    """What a restarted collection must repeat: everything that decides which samples are drawn and kept.

    The target may grow or shrink, the directory may move, and engine settings (TP size, memory) and
    the reward's worker and sandbox settings may change between restarts; the prepare section is not
    part of collection.
    """
    values = to_dict(config)
    for section in ("rollout", "prepare"):
        values.pop(section)
    values["reward"] = {"mode": config.reward.mode}  # the rest is workers, timeouts, sandbox plumbing
    values["collect"] = {
        k: v for k, v in values["collect"].items() if k not in ("target", "progress", "output_dir")
    }
    return values
