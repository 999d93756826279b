"""Chat formatting at the token level: prompts, revision prompts, SFT samples, Phase 2 teacher inputs.

Everything is built by concatenating token ids, never by joining strings and re-tokenizing, so a
response y has the same ids in every sequence it appears in::

    prompt       = chat_template([system?, user(x)], add_generation_prompt=True)   ends in the
                   assistant-start marker, so all that follows sits in the assistant turn
    delim(P_r)   = tok("\\n\\n" + P_r + "\\n\\n")
    revision     = prompt + body(y_init) + delim(P_r)                        (model continues)
    stage 1 SFT  = prompt + body(y_init) + delim + body(y_rev) + <eot>       loss on all after prompt
    stage 2 SFT  = prompt + body(y_init) + delim + body(y_rev) + <eot>       loss on body(y_rev) + <eot>
    teacher      = prompt + body(y)      + delim + y                         loss on the second y

End of turn. A rollout's y usually ends with the end-of-turn token (``<|im_end|>`` for ChatML).
``body(y)`` strips trailing end-of-turn/EOS ids, because the model must never see an end of turn in
the middle of its turn. SFT samples end with exactly one end-of-turn id, the last target, so the
model learns to stop after a revision. The teacher's second copy of y is y exactly as the student
produced it (end-of-turn included when it stopped), so the student's stop decision is distilled
too; the student sequence is prompt + y and the two align token for token.

Stage 1 and stage 2 samples hold the same tokens and differ only in the loss mask: the reference
puts y_init and P_r in the user turn for stage 2, we keep one format everywhere (assistant turn).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_sdzero.config import ConfigError

# Paper / reference phrases. Keys are explicit family names (from config), never path substrings.
_QWEN = ("Let me rephrase the above solution.", "Wait, this response is wrong. Let me correct it.")
_OLMO = ("Let me rephrase the above solution.", "Wrong. I need to redo all.")
FAMILY_PHRASES: dict[str, tuple[str, str]] = {
    "qwen": _QWEN,
    "qwen2": _QWEN,
    "qwen2.5": _QWEN,
    "qwen3": _QWEN,
    "olmo": _OLMO,
    "olmo2": _OLMO,
    "olmo3": _OLMO,
}

DEFAULT_SYSTEM = {
    "math": "You are a helpful assistant that solves math problems step by step.",
    "code": "You are a helpful assistant that solves competitive programming problems.",
    "instruct": "",  # IFEval: the prompt alone, as the benchmark's authors ran it
}
DEFAULT_INSTRUCTION = {
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "code": "",  # codeforces-style prompts carry their own output instructions
    "instruct": "",
}


@dataclass
class ControlPhrases:
    """Outcome-conditioned phrases P_r. Unset fields come from the model family's defaults."""

    correct: str | None = None  # r = 1
    incorrect: str | None = None  # r = 0

    def for_reward(self, reward: float) -> str:
        phrase = self.correct if reward > 0.5 else self.incorrect
        if phrase is None:
            raise ConfigError("control phrases are not resolved; call resolve_phrases(family, phrases) first")
        return phrase


def resolve_phrases(family: str | None, configured: ControlPhrases | None = None) -> ControlPhrases:
    """Fill unset phrases from the family defaults; an unknown family must configure both."""
    configured = configured or ControlPhrases()
    defaults = FAMILY_PHRASES.get((family or "").lower())
    correct = configured.correct if configured.correct is not None else defaults and defaults[0]
    incorrect = configured.incorrect if configured.incorrect is not None else defaults and defaults[1]
    missing = [name for name, value in (("correct", correct), ("incorrect", incorrect)) if not value]
    if missing:
        raise ConfigError(
            f"phrases.{'/'.join(missing)}: model family {family!r} has no default control phrase "
            f"(known families: {sorted(FAMILY_PHRASES)}); set model.family or phrases.{missing[0]} explicitly"
        )
    return ControlPhrases(correct=correct, incorrect=incorrect)


@dataclass
class PromptConfig:
    """How a problem becomes chat messages. None: the mode's default; "": leave it out."""

    system: str | None = None
    instruction: str | None = None


def build_messages(problem_text: str, mode: str, prompt: PromptConfig | None = None) -> list[dict[str, str]]:
    prompt = prompt or PromptConfig()
    system = DEFAULT_SYSTEM[mode] if prompt.system is None else prompt.system
    instruction = DEFAULT_INSTRUCTION[mode] if prompt.instruction is None else prompt.instruction
    user = f"{problem_text}\n{instruction}" if instruction else problem_text
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}]


@dataclass
class Sample:
    """One SFT sequence; loss_mask[i] = 1 where input_ids[i] is a training target."""

    input_ids: list[int]
    loss_mask: list[int]


@dataclass
class TeacherInput:
    """Phase 2 teacher sequence and its alignment with the student sequence prompt + y.

    For each masked token k, the teacher predicts it from logits at ``teacher_positions[k] - 1`` and
    the student from logits at ``student_positions[k] - 1``.
    """

    input_ids: torch.Tensor  # [T] teacher sequence
    loss_mask: torch.Tensor  # [T] bool, True on the (kept part of the) second copy of y
    teacher_positions: torch.Tensor  # [K]
    student_positions: torch.Tensor  # [K]
    student_input_ids: torch.Tensor  # [S] prompt + y
    weight: float  # 0.0 when nothing of y fits the budget
    truncated: bool


class ChatFormat:
    """Token-level builder for every sequence type, bound to one tokenizer (and its chat template)."""

    def __init__(self, tokenizer: Any, end_of_turn: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.end_of_turn_id = _end_of_turn_id(tokenizer, end_of_turn)
        eos = tokenizer.eos_token_id
        self.stop_ids: frozenset[int] = frozenset(
            {self.end_of_turn_id} | ({eos} if eos is not None else set())
        )
        self._delimiters: dict[str, tuple[int, ...]] = {}

    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def delimiter_ids(self, phrase: str) -> tuple[int, ...]:
        if phrase not in self._delimiters:
            encoded = self.tokenizer(f"\n\n{phrase}\n\n", add_special_tokens=False)["input_ids"]
            self._delimiters[phrase] = tuple(encoded)
        return self._delimiters[phrase]

    def body(self, y_ids: Sequence[int]) -> list[int]:
        """y without its trailing end-of-turn / EOS ids (for use in the middle of a turn)."""
        end = len(y_ids)
        while end and y_ids[end - 1] in self.stop_ids:
            end -= 1
        return list(y_ids[:end])

    def finished(self, y_ids: Sequence[int]) -> list[int]:
        """body(y) + exactly one end-of-turn id (the last target of an SFT sample)."""
        return self.body(y_ids) + [self.end_of_turn_id]

    def revision_prompt(self, prompt_ids: Sequence[int], y_init_ids: Sequence[int], phrase: str) -> list[int]:
        return list(prompt_ids) + self.body(y_init_ids) + list(self.delimiter_ids(phrase))

    def response_sample(self, prompt_ids: Sequence[int], y_ids: Sequence[int]) -> Sample:
        """prompt + finished(y), the loss on the response (RFT's training samples)."""
        completion = self.finished(y_ids)
        return Sample(list(prompt_ids) + completion, [0] * len(prompt_ids) + [1] * len(completion))

    def stage1_sample(
        self, prompt_ids: Sequence[int], y_init_ids: Sequence[int], phrase: str, y_revised_ids: Sequence[int]
    ) -> Sample:
        """Generation stage: the whole completion y_init + P_r + y_revised is the target."""
        revision = self.revision_prompt(prompt_ids, y_init_ids, phrase)
        completion = self.finished(y_revised_ids)
        mask = [0] * len(prompt_ids) + [1] * (len(revision) - len(prompt_ids) + len(completion))
        return Sample(revision + completion, mask)

    def stage2_sample(
        self, prompt_ids: Sequence[int], y_init_ids: Sequence[int], phrase: str, y_revised_ids: Sequence[int]
    ) -> Sample:
        """Revision stage: only y_revised (+ end of turn) is the target."""
        revision = self.revision_prompt(prompt_ids, y_init_ids, phrase)
        completion = self.finished(y_revised_ids)
        return Sample(revision + completion, [0] * len(revision) + [1] * len(completion))

    def teacher_input(
        self, prompt_ids: Sequence[int], y_ids: Sequence[int], phrase: str, budget: int
    ) -> TeacherInput:
        """prompt + body(y) + delim + y, with y cut to (budget - |x| - |delim|) // 2 when too long."""
        prompt, delim, y = list(prompt_ids), list(self.delimiter_ids(phrase)), list(y_ids)
        first = self.body(y)
        truncated = len(prompt) + len(first) + len(delim) + len(y) > budget
        if truncated:
            keep = max(0, (budget - len(prompt) - len(delim)) // 2)
            y = y[:keep]
            first = self.body(y)
        if not y:  # even x + delim (+ one token of y) does not fit: a zero-weight placeholder
            ids = (prompt + delim)[:budget]
            return _teacher(ids, len(ids), 0, prompt + list(y_ids), len(prompt), truncated, weight=0.0)
        ids = prompt + first + delim + y
        return _teacher(ids, len(ids) - len(y), len(y), prompt + list(y_ids), len(prompt), truncated, 1.0)


def _teacher(
    ids: list[int],
    start: int,
    count: int,
    student: list[int],
    student_start: int,
    truncated: bool,
    weight: float,
) -> TeacherInput:
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[start : start + count] = True
    return TeacherInput(
        input_ids=torch.tensor(ids, dtype=torch.long),
        loss_mask=mask,
        teacher_positions=torch.arange(start, start + count, dtype=torch.long),
        student_positions=torch.arange(student_start, student_start + count, dtype=torch.long),
        student_input_ids=torch.tensor(student, dtype=torch.long),
        weight=weight,
        truncated=truncated,
    )


_MARKER = "SDZERO_ASSISTANT_CONTENT_END"


def _end_of_turn_id(tokenizer: Any, configured: str | None) -> int:
    """The token the chat template closes an assistant turn with (else the tokenizer's EOS)."""
    if configured is not None:
        ids = tokenizer.convert_tokens_to_ids([configured])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ConfigError(f"end_of_turn: {configured!r} is not a token of this tokenizer")
        return ids[0]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": _MARKER}], tokenize=False
    )
    suffix = rendered.split(_MARKER, 1)[1] if _MARKER in rendered else ""
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    if suffix_ids and suffix_ids[0] in special:
        return suffix_ids[0]
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ConfigError("cannot tell this chat template's end-of-turn token; set it explicitly (end_of_turn)")


@functools.lru_cache(maxsize=4)
def chat_format(tokenizer: Any) -> ChatFormat:
    return ChatFormat(tokenizer)


def build_sft_sample(
    record: Mapping[str, Any], tokenizer: Any, fmt: ChatFormat | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one stage1.jsonl / stage2.jsonl record (see docs/phase1.md)."""
    fmt = fmt or chat_format(tokenizer)
    stage = record.get("stage")
    if stage not in (1, 2, "response"):
        raise ValueError(f"SFT record has stage {stage!r}; expected 1, 2 or 'response'")
    prompt = fmt.prompt_ids(record["messages"])
    if stage == "response":  # a plain (prompt, response) pair: RFT's kept samples
        sample = fmt.response_sample(prompt, record["y_ids"])
        return sample.input_ids, sample.loss_mask
    build = fmt.stage1_sample if stage == 1 else fmt.stage2_sample
    sample = build(prompt, record["y_init_ids"], record["phrase"], record["y_revised_ids"])
    return sample.input_ids, sample.loss_mask
