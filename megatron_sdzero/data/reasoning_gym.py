"""Problems from `reasoning-gym <https://pypi.org/project/reasoning-gym/>`_ generators, graded by the
task's own ``score_answer``.

A source names a task, a seed range and the task's config keyword arguments (harder settings)::

    problems:
      reasoning_gym: {task: basic_arithmetic, seed: 0, size: 5000, config: {min_terms: 3, max_terms: 5}}

reasoning-gym draws item ``i`` of a dataset from ``Random(seed + i)``, so a source covers the item
seeds ``[seed, seed + size)``: a training source and a held-out source are disjoint when those
ranges are (``check_disjoint_seeds``). Different seeds can still produce the same question text on
small tasks; :func:`megatron_sdzero.data.problems.drop_overlap` removes those from a held-out set.

Grading: the response's final answer is extracted (:func:`extract_final_answer`), the item is
regenerated from its (task, config, seed, size, index) and ``score_answer(answer, item)`` decides;
score 1.0 is correct (reasoning-gym gives partial credit below that, which counts as wrong here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from megatron_sdzero.config import ConfigError

GYM_KEY = "reasoning_gym"  # marks a reference as graded by a reasoning-gym scorer
DEMONSTRATION_KEYS = ("answer_cot",)  # metadata keys holding a worked solution (gsm_symbolic has one)
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TEXT_WRAPPER = re.compile(r"^\\(?:text|mathrm|textbf)\{(.*)\}$", re.DOTALL)


@dataclass(frozen=True)
class ReasoningGymSpec:
    task: str  # a registered reasoning-gym dataset name, e.g. "basic_arithmetic"
    seed: int = 0  # first item seed; the source covers seeds [seed, seed + size)
    size: int = 500
    config: dict[str, Any] = field(default_factory=dict)  # the task's config kwargs (difficulty)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"problems.reasoning_gym.size: must be >= 1, got {self.size}")
        if self.seed < 0:
            raise ConfigError(f"problems.reasoning_gym.seed: must be >= 0, got {self.seed}")
        reserved = {"seed", "size"} & set(self.config)
        if reserved:
            raise ConfigError(
                f"problems.reasoning_gym.config: set {sorted(reserved)} on the source, not here"
            )

    @property
    def seeds(self) -> range:
        return range(self.seed, self.seed + self.size)


def check_disjoint_seeds(train: ReasoningGymSpec, held_out: ReasoningGymSpec) -> None:
    """Raises ConfigError when two sources of the same task share item seeds."""
    if train.task != held_out.task:
        return
    low, high = max(train.seed, held_out.seed), min(train.seeds.stop, held_out.seeds.stop)
    if low < high:
        raise ConfigError(
            f"reasoning_gym {train.task}: seeds [{low}, {high}) are in both the training and the held-out "
            "source; move the held-out seed past the training range"
        )


def gym_rows(spec: ReasoningGymSpec) -> Iterator[dict[str, Any]]:
    """One row per item: problem, answer, solution (or None) and the reference the grader needs."""
    dataset = _dataset(spec.task, _config_key(spec.config), spec.seed, spec.size)
    for index in range(spec.size):
        item = dataset[index]
        yield {
            "problem": item["question"],
            "answer": str(item["answer"]),
            "solution": demonstration(item.get("metadata") or {}),
            "reference": {
                GYM_KEY: spec.task,
                "config": dict(spec.config),
                "seed": spec.seed,
                "size": spec.size,
                "index": index,
                "answer": str(item["answer"]),
            },
        }


def demonstration(metadata: Mapping[str, Any]) -> str | None:
    for key in DEMONSTRATION_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def is_gym_reference(reference: Any) -> bool:
    return isinstance(reference, Mapping) and GYM_KEY in reference


def extract_final_answer(response: str) -> str | None:
    """The answer a response commits to, stripped: the content of its last ``\\boxed{...}`` if that
    box is closed (braces balanced; a ``\\text{...}`` wrapper removed); otherwise the content of its
    last ``<answer>...</answer>`` (reasoning-gym's own convention); otherwise None."""
    boxed = _last_boxed(response)
    if boxed is not None:
        wrapped = TEXT_WRAPPER.match(boxed.strip())
        return (wrapped.group(1) if wrapped else boxed).strip()
    tags = ANSWER_TAG.findall(response)
    return tags[-1].strip() if tags else None


def _last_boxed(response: str) -> str | None:
    start = response.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for position in range(begin - 1, len(response)):
        char = response[position]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return response[begin:position]
    return None  # cut off inside the box


def score_gym_answer(response: str, reference: Mapping[str, Any]) -> tuple[float, str, str]:
    """(score in {0, 1}, extracted answer, reason) of one response against a reasoning-gym reference."""
    answer = extract_final_answer(response)
    if not answer:
        return 0.0, "", "no_answer"
    dataset = _dataset(
        reference[GYM_KEY], _config_key(reference.get("config") or {}), reference["seed"], reference["size"]
    )
    item = dataset[int(reference["index"])]
    score = float(dataset.score_answer(answer, item))
    correct = score >= 1.0
    return (1.0 if correct else 0.0), answer, "correct" if correct else "wrong_answer"


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), sort_keys=True)


@lru_cache(maxsize=64)
def _dataset(task: str, config_key: str, seed: int, size: int) -> Any:
    try:
        import reasoning_gym
    except ImportError as err:
        raise ConfigError(
            "problems.reasoning_gym needs the reasoning-gym package (pip install reasoning-gym)"
        ) from err
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise ConfigError(f"problems.reasoning_gym.task: unknown task {task!r}; e.g. {sorted(DATASETS)[:8]}")
    kwargs = json.loads(config_key)
    try:
        return reasoning_gym.create_dataset(task, seed=seed, size=size, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"problems.reasoning_gym: {task} rejects config {kwargs}: {err}") from err
