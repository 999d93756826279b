"""What a run spent: questions, generated samples, trained samples and tokens, GPU-seconds per phase.

Every algorithm keeps a :class:`Ledger`, saves it with its checkpoints (so a resumed run continues
the count) and writes it to ``RUN_DIR/budget.json``. Conventions (docs/algorithms.md):

- ``samples_generated``: responses sampled from the model being trained or its starting point, for
  training (evaluation samples are not counted). SD-Zero's Phase 1 collection (initial answers and
  revisions) and RFT's collection count; they enter an on-policy run as ``prior``.
- ``samples_trained``: samples that carried a nonzero loss weight; ``training_tokens``: loss tokens.
- ``gpu_seconds``: wall seconds x GPUs of the job, per phase (generation, grading, train, refresh,
  eval).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_sdzero.algorithms.config import BudgetConfig
from megatron_sdzero.config import ConfigError

BUDGET_FILE = "budget.json"


def question_digest(ids: Iterable[str]) -> str:
    """An order-free fingerprint of a question set: two runs on the same questions share it."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def prior_samples(config: BudgetConfig) -> int:
    """Samples spent before this run: ``prior_samples`` plus what ``prior`` records."""
    if config.prior is None:
        return config.prior_samples
    path = Path(config.prior)
    if path.is_dir():
        path = next((path / name for name in (BUDGET_FILE, "summary.json") if (path / name).is_file()), path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"budget.prior: cannot read {path}: {err}") from None
    if "samples_generated" in record:  # a budget.json
        spent = record["samples_generated"]
    elif "init_attempts" in record:  # an srt-collect summary.json: initial answers and revisions
        spent = record["init_attempts"] + record.get("revision_attempts", 0)
    else:
        raise ConfigError(
            f"budget.prior: {path} records no generated samples (a budget.json or summary.json)"
        )
    return config.prior_samples + int(spent)


@dataclass
class Ledger:
    algorithm: str
    questions: int = 0
    questions_digest: str = ""
    prior_samples: int = 0
    samples_generated: int = 0  # in this run
    samples_trained: int = 0
    training_tokens: int = 0
    steps: int = 0
    gpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return self.prior_samples + self.samples_generated

    def add_step(
        self, generated: int, trained: int, tokens: int, seconds: dict[str, float], gpus: int
    ) -> None:
        self.steps += 1
        self.samples_generated += generated
        self.samples_trained += trained
        self.training_tokens += tokens
        self.add_seconds(seconds, gpus)

    def add_seconds(self, seconds: dict[str, float], gpus: int) -> None:
        for phase, value in seconds.items():
            self.gpu_seconds[phase] = self.gpu_seconds.get(phase, 0.0) + value * gpus

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Ledger:
        return cls(**state)

    def write(self, run_dir: Path, limits: BudgetConfig) -> None:
        record = {
            **self.state(),
            "total_samples": self.total_samples,
            "max_questions": limits.max_questions,
            "max_samples": limits.max_samples,
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{BUDGET_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(run_dir / BUDGET_FILE)


def samples_left_error(limits: BudgetConfig, spent: int, per_step: int) -> str | None:
    """Why the next step (``per_step`` new samples) would exceed ``max_samples``, or None."""
    if limits.max_samples is None or spent + per_step <= limits.max_samples:
        return None
    return (
        f"the sample budget is spent: {spent} of budget.max_samples={limits.max_samples} samples used, "
        f"a step needs {per_step} more"
    )


def check_budget_allows_a_step(
    limits: BudgetConfig, prior: int, per_step: int, questions_per_step: int
) -> None:
    """Refuse, before any model is built, a budget too small for one step."""
    if limits.max_samples is not None and prior + per_step > limits.max_samples:
        raise ConfigError(
            f"budget.max_samples={limits.max_samples} is smaller than one step: {prior} samples spent before "
            f"this run + {per_step} per step"
        )
    if limits.max_questions is not None and limits.max_questions < questions_per_step:
        raise ConfigError(
            f"budget.max_questions={limits.max_questions} is smaller than one step's "
            f"{questions_per_step} prompts"
        )
