"""The algorithm-specific sections of an on-policy recipe, and the sample budget they share.

algorithm: sdzero | sdft | grpo
sdft:   the demonstration template of SDFT's teacher prompt
grpo:   advantage normalisation and the clipped surrogate's settings
budget: max questions / max generated samples, the same stopping point for every algorithm
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_sdzero.config import ConfigError
from megatron_sdzero.losses.policy import GRPOLossConfig

AlgorithmName = Literal["sdzero", "sdft", "grpo"]

# The SDFT paper's in-context demonstration prompt (Shenfeld et al. 2026), as the user turn.
SDFT_TEMPLATE = (
    "{problem}\n\nThis is an example for a response to the question:\n{solution}\n\n"
    "Now answer with a response of your own, including the thinking process."
)


@dataclass
class SDFTConfig:
    """SDFT's teacher reads chat(template(problem, solution)) + y; the student chat(problem) + y."""

    template: str = SDFT_TEMPLATE  # must contain {problem} and {solution}

    def __post_init__(self) -> None:
        missing = [key for key in ("{problem}", "{solution}") if key not in self.template]
        if missing:
            raise ConfigError(f"sdft.template: must contain {' and '.join(missing)}")


@dataclass
class GRPOConfig:
    """Group-relative advantages over the sampling.n responses of each prompt."""

    scale_by_std: bool = True  # false: Dr. GRPO (no division by the group's standard deviation)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)


@dataclass
class BudgetConfig:
    """The same question set and training-sample budget for every algorithm (see docs/algorithms.md).

    max_questions: the question set is the first max_questions problems of the source.
    max_samples: generated samples (responses sampled from the model) the run may spend, counting
        ``prior_samples`` and the samples recorded at ``prior`` (SD-Zero's Phase 1 collection, an
        RFT collection, another run's budget.json). The run stops before a step that would exceed it.
    """

    max_questions: int | None = None
    max_samples: int | None = None
    prior_samples: int = 0
    prior: Path | None = None  # a budget.json, or an srt-collect output dir / its summary.json

    def __post_init__(self) -> None:
        for name in ("max_questions", "max_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"budget.{name}: must be >= 1 (or unset), got {value}")
        if self.prior_samples < 0:
            raise ConfigError(f"budget.prior_samples: must be >= 0, got {self.prior_samples}")
