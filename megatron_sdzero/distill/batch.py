"""From a graded rollout batch to the padded student and teacher batches of one distillation step.

For sample b with prompt x, response y (as the rollout engine returned it) and reward r::

    student   = x + y[:keep]                         forward with gradients
    teacher   = x + body(y) + delim(P_r) + y[:keep]  forward without gradients

``keep`` is the number of response tokens that get a loss: all of y, unless the teacher budget cuts
y to (budget - |x| - |delim|) // 2 (both copies, as the reference does; see
``ChatFormat.teacher_input``) or the student's sequence limit cuts it to student_max_tokens - |x|.
Nothing after the last kept token is fed to either model, since a causal model's logits before it
do not depend on it.

End of turn: y keeps the end-of-turn token it stopped with in both the student sequence and the
teacher's second copy, so the stop decision is distilled like any other token; the teacher's first
copy (the one under review) ends with body(y), because an end of turn in the middle of the
assistant turn is a sequence the model never saw in SFT. A response cut by max_tokens has no end of
turn anywhere.

Alignment: for the j-th kept token of sample b, the student's logits at ``student_index[b, j]`` and
the teacher's at ``teacher_index[b, j]`` both predict ``targets[b, j]``; ``loss_mask[b, j]`` is
False on padding. A sample's weight is 0 when nothing of y fits (the teacher budget cannot hold x
and delim, or x alone exceeds the student limit), or, with ``correct_only``, when r = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from megatron_sdzero.data.formatting import ChatFormat, ControlPhrases


@dataclass
class BatchConfig:
    student_max_tokens: int = 8192  # x + y for the student (reference: 8192)
    teacher_budget: int = 32768  # x + y + delim + y for the teacher (reference: 32768)
    correct_only: bool = False  # weight 0 for samples with r = 0
    pad_to_multiple_of: int = 8  # sequence padding (a multiple of TP with sequence parallelism)

    def __post_init__(self) -> None:
        from megatron_sdzero.config import ConfigError

        for name in ("student_max_tokens", "teacher_budget", "pad_to_multiple_of"):
            if getattr(self, name) < 1:
                raise ConfigError(f"batch.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class RolloutSample:
    """One graded sample: token ids exactly as the engine produced them."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    finish_reason: str = "stop"
    problem_id: str = ""
    group: int = 0  # which prompt of the step (on this replica) it answers: GRPO's group


@dataclass
class DistillBatch:
    """Padded tensors of one step (or one micro-batch); row b of each is sample b.

    Every on-policy algorithm fills it: the teacher fields hold the frozen model's input (SD-Zero's
    reviser, SDFT's demonstration-conditioned teacher, GRPO's reference model; None without one),
    ``advantages`` GRPO's per-sample advantage.
    """

    student_tokens: torch.Tensor  # [B, S] long
    teacher_tokens: torch.Tensor | None  # [B, T] long
    student_index: torch.Tensor  # [B, K] long: student logit positions (p_s - 1)
    teacher_index: torch.Tensor | None  # [B, K] long: teacher logit positions (p_t - 1)
    targets: torch.Tensor  # [B, K] long: the token both predict
    loss_mask: torch.Tensor  # [B, K] bool
    sample_weights: torch.Tensor  # [B] float32
    rewards: torch.Tensor  # [B] float32
    response_lengths: torch.Tensor  # [B] long: |y| as sampled
    truncated: torch.Tensor  # [B] bool: y was cut for the teacher budget or the student limit
    advantages: torch.Tensor | None = None  # [B] float32

    @property
    def size(self) -> int:
        return self.student_tokens.shape[0]

    def valid_tokens(self) -> int:
        return int((self.loss_mask & (self.sample_weights[:, None] != 0)).sum())

    def micro_batches(self, size: int, *, trim_to_multiple: int | None = 8) -> list[DistillBatch]:
        """Consecutive micro-batches of ``size`` samples.

        ``trim_to_multiple``: cut each micro-batch's padding to its own longest row (rounded up to
        the multiple); None keeps the step's width, which pipeline parallelism needs (every
        micro-batch must have the same shape).
        """
        parts = []
        for start in range(0, self.size, size):
            part = DistillBatch(**{name: _rows(value, start, size) for name, value in self._values().items()})
            parts.append(part.trimmed(trim_to_multiple) if trim_to_multiple else part)
        return parts

    def trimmed(self, multiple: int) -> DistillBatch:
        """The same rows without the padding columns no row of this batch needs."""
        used = self.loss_mask.sum(1)
        width_k = max(1, int(used.max()))
        student = _used_width(self.student_index, used, multiple)
        values = self._values()
        values["student_tokens"] = self.student_tokens[:, : min(student, self.student_tokens.shape[1])]
        if self.teacher_tokens is not None:
            teacher = _used_width(self.teacher_index, used, multiple)
            values["teacher_tokens"] = self.teacher_tokens[:, : min(teacher, self.teacher_tokens.shape[1])]
        for name in ("student_index", "teacher_index", "targets", "loss_mask"):
            if values[name] is not None:
                values[name] = values[name][:, :width_k]
        return DistillBatch(**values)

    def to(self, device: torch.device) -> DistillBatch:
        return DistillBatch(**{n: None if v is None else v.to(device) for n, v in self._values().items()})

    def _values(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _rows(value: torch.Tensor | None, start: int, size: int) -> torch.Tensor | None:
    return None if value is None else value[start : start + size]


def _used_width(index: torch.Tensor, used: torch.Tensor, multiple: int) -> int:
    """Sequence length the rows need: up to the token after their last logit position (at least 1)."""
    last = torch.where(used > 0, index.gather(1, (used - 1).clamp(min=0)[:, None])[:, 0] + 2, 1)
    return -(-int(last.max()) // multiple) * multiple


@dataclass
class _Row:
    student: list[int]
    teacher: list[int]
    student_index: list[int]
    teacher_index: list[int]
    targets: list[int]
    weight: float
    truncated: bool


def build_row(sample: RolloutSample, fmt: ChatFormat, phrases: ControlPhrases, config: BatchConfig) -> _Row:
    """The student and teacher sequences of one sample and their aligned positions."""
    phrase = phrases.for_reward(sample.reward)
    teacher = fmt.teacher_input(sample.prompt_ids, sample.response_ids, phrase, config.teacher_budget)
    prompt_len = len(sample.prompt_ids)
    keep = min(len(teacher.teacher_positions), max(0, config.student_max_tokens - prompt_len))
    weight = teacher.weight if keep > 0 else 0.0
    if config.correct_only and sample.reward <= 0.5:
        weight = 0.0
    if weight == 0.0:  # nothing to learn from: the shortest sequences that still run through the models
        stub = list(sample.prompt_ids[:1])
        return _Row(stub, stub, [], [], [], 0.0, keep < len(sample.response_ids))
    t_pos = teacher.teacher_positions[:keep].tolist()
    s_pos = teacher.student_positions[:keep].tolist()
    teacher_ids = teacher.input_ids[: t_pos[-1] + 1].tolist()
    student_ids = teacher.student_input_ids[: s_pos[-1] + 1].tolist()
    return _Row(
        student=student_ids,
        teacher=teacher_ids,
        student_index=[p - 1 for p in s_pos],
        teacher_index=[p - 1 for p in t_pos],
        targets=[student_ids[p] for p in s_pos],
        weight=weight,
        truncated=teacher.truncated or keep < len(sample.response_ids),
    )


def conditioned_row(sample: RolloutSample, teacher_prompt: Sequence[int] | None, config: BatchConfig) -> _Row:
    """student = x + y[:keep] and, with a teacher prompt c, teacher = c + y[:keep] (SDFT's teacher
    reads the demonstration-conditioned prompt; GRPO's reference model reads x itself). ``keep``
    is cut by the student's limit and, for the teacher, by ``teacher_budget``."""
    prompt, y = list(sample.prompt_ids), list(sample.response_ids)
    keep = min(len(y), max(0, config.student_max_tokens - len(prompt)))
    if teacher_prompt is not None:
        keep = min(keep, max(0, config.teacher_budget - len(teacher_prompt)))
    if keep == 0:
        stub = prompt[:1]
        return _Row(stub, stub if teacher_prompt is not None else [], [], [], [], 0.0, len(y) > 0)
    student = prompt + y[:keep]
    teacher = list(teacher_prompt) + y[:keep] if teacher_prompt is not None else []
    return _Row(
        student=student,
        teacher=teacher,
        student_index=list(range(len(prompt) - 1, len(prompt) - 1 + keep)),
        teacher_index=list(range(len(teacher) - keep - 1, len(teacher) - 1)) if teacher else [],
        targets=y[:keep],
        weight=1.0,
        truncated=keep < len(y),
    )


def build_batch(
    samples: Sequence[RolloutSample],
    fmt: ChatFormat,
    phrases: ControlPhrases,
    config: BatchConfig,
    pad_id: int = 0,
) -> DistillBatch:
    """SD-Zero's padded student and teacher batches of ``samples`` (see the module docstring)."""
    if not samples:
        raise ValueError("build_batch: no samples")
    return assemble([build_row(s, fmt, phrases, config) for s in samples], samples, config, pad_id)


def assemble(
    rows: Sequence[_Row],
    samples: Sequence[RolloutSample],
    config: BatchConfig,
    pad_id: int = 0,
    *,
    with_teacher: bool = True,
    advantages: torch.Tensor | None = None,
) -> DistillBatch:
    """Pad the rows into one batch (teacher fields None when ``with_teacher`` is false)."""
    multiple = config.pad_to_multiple_of
    return DistillBatch(
        student_tokens=_pad([r.student for r in rows], pad_id, multiple),
        teacher_tokens=_pad([r.teacher for r in rows], pad_id, multiple) if with_teacher else None,
        student_index=_pad([r.student_index for r in rows], 0, 1),
        teacher_index=_pad([r.teacher_index for r in rows], 0, 1) if with_teacher else None,
        targets=_pad([r.targets for r in rows], pad_id, 1),
        loss_mask=_pad([[1] * len(r.targets) for r in rows], 0, 1).bool(),
        sample_weights=torch.tensor([r.weight for r in rows], dtype=torch.float32),
        rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
        response_lengths=torch.tensor([len(s.response_ids) for s in samples], dtype=torch.long),
        truncated=torch.tensor([r.truncated for r in rows], dtype=torch.bool),
        advantages=advantages,
    )


def _pad(rows: Sequence[Sequence[int]], value: int, multiple: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    width = -(-width // multiple) * multiple
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
