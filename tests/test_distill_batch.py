"""Student/teacher batches: alignment, end-of-turn handling, truncation, sample weights, micro-batches."""

from __future__ import annotations

import pytest
import torch

from megatron_sdzero.data.formatting import ChatFormat, build_messages, resolve_phrases
from megatron_sdzero.distill.batch import BatchConfig, RolloutSample, build_batch, build_row

PHRASES = resolve_phrases("qwen3")


@pytest.fixture(scope="module")
def fmt() -> ChatFormat:
    from megatron_sdzero.assets.tiny import build_tiny_tokenizer

    return ChatFormat(build_tiny_tokenizer())


def _sample(
    fmt: ChatFormat, question: str, answer: str, reward: float, stopped: bool = True
) -> RolloutSample:
    prompt = fmt.prompt_ids(build_messages(question, "math"))
    y = fmt.tokenizer(answer, add_special_tokens=False)["input_ids"]
    return RolloutSample(
        prompt, y + [fmt.end_of_turn_id] if stopped else y, reward, "stop" if stopped else "length"
    )


@pytest.fixture(scope="module")
def samples(fmt: ChatFormat) -> list[RolloutSample]:
    return [
        _sample(fmt, "What is 2 + 3?", "We add: 2 + 3 = 5. The answer is \\boxed{5}.", 1.0),
        _sample(fmt, "Ben has 4 apples and eats one.", "He has \\boxed{2}", 0.0),
        _sample(fmt, "Compute 7 * 8.", "Seven times eight is fifty six, so", 0.0, stopped=False),
    ]


def _gathered(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return tokens.gather(1, index + 1)


def test_teacher_and_student_logits_predict_the_same_tokens(fmt, samples) -> None:
    batch = build_batch(samples, fmt, PHRASES, BatchConfig())
    mask = batch.loss_mask
    assert torch.equal(_gathered(batch.student_tokens, batch.student_index)[mask], batch.targets[mask])
    assert torch.equal(_gathered(batch.teacher_tokens, batch.teacher_index)[mask], batch.targets[mask])
    for b, sample in enumerate(samples):
        assert batch.targets[b][mask[b]].tolist() == sample.response_ids  # all of y, end of turn included
        prompt = len(sample.prompt_ids)
        assert batch.student_index[b][mask[b]].tolist() == list(
            range(prompt - 1, prompt - 1 + len(sample.response_ids))
        )
        assert batch.student_tokens[b, :prompt].tolist() == sample.prompt_ids
        assert batch.teacher_tokens[b, :prompt].tolist() == sample.prompt_ids
    assert batch.sample_weights.tolist() == [1.0, 1.0, 1.0]
    assert batch.student_tokens.shape[1] % 8 == 0 and batch.teacher_tokens.shape[1] % 8 == 0


def test_end_of_turn_is_a_target_only_in_the_second_copy(fmt, samples) -> None:
    eot = fmt.end_of_turn_id
    for sample in samples:
        row = build_row(sample, fmt, PHRASES, BatchConfig())
        prompt = len(sample.prompt_ids)
        assistant_turn = row.teacher[prompt:]
        second_start = row.teacher_index[0] + 1
        first_copy, second_copy = row.teacher[prompt:second_start], row.teacher[second_start:]
        assert second_copy == sample.response_ids
        assert eot not in first_copy  # the reviewed copy never closes the turn
        stopped = sample.finish_reason == "stop"
        assert assistant_turn.count(eot) == (1 if stopped else 0)
        assert (row.targets[-1] == eot) == stopped and (row.student[-1] == eot) == stopped
        phrase = PHRASES.for_reward(sample.reward)
        delim = list(fmt.delimiter_ids(phrase))
        assert first_copy == fmt.body(sample.response_ids) + delim
        assert fmt.tokenizer.decode(delim).strip() == phrase


def test_teacher_budget_cuts_both_copies_and_the_student(fmt, samples) -> None:
    sample = samples[0]
    prompt, y = len(sample.prompt_ids), len(sample.response_ids)
    delim = len(fmt.delimiter_ids(PHRASES.correct))
    budget = prompt + delim + 2 * (y // 2) - 1  # room for (y // 2) - 1 tokens of each copy
    keep = (budget - prompt - delim) // 2
    assert 0 < keep < y
    batch = build_batch([sample], fmt, PHRASES, BatchConfig(teacher_budget=budget, pad_to_multiple_of=1))
    assert int(batch.loss_mask.sum()) == keep and bool(batch.truncated[0])
    assert batch.targets[0].tolist() == sample.response_ids[:keep]
    assert batch.teacher_tokens.shape[1] == prompt + keep + delim + keep <= budget
    assert batch.student_tokens.shape[1] == prompt + keep
    assert batch.sample_weights.tolist() == [1.0]


def test_student_limit_cuts_y_and_the_teacher_follows(fmt, samples) -> None:
    sample = samples[0]
    prompt = len(sample.prompt_ids)
    batch = build_batch(
        [sample], fmt, PHRASES, BatchConfig(student_max_tokens=prompt + 4, pad_to_multiple_of=1)
    )
    assert batch.targets[0].tolist() == sample.response_ids[:4] and bool(batch.truncated[0])
    assert batch.student_tokens.shape[1] == prompt + 4
    full_first_copy = prompt + len(fmt.body(sample.response_ids)) + len(fmt.delimiter_ids(PHRASES.correct))
    assert batch.teacher_tokens.shape[1] == full_first_copy + 4  # the teacher still reviews all of y
    assert torch.equal(_gathered(batch.teacher_tokens, batch.teacher_index)[0], batch.targets[0])


def test_weights_zero_when_nothing_fits_or_when_only_correct_samples_count(fmt, samples) -> None:
    prompt = len(samples[1].prompt_ids)
    tight = BatchConfig(teacher_budget=prompt + 3)  # not even x + delim + one token of each copy
    assert build_batch(samples[1:2], fmt, PHRASES, tight).sample_weights.tolist() == [0.0]
    no_room = BatchConfig(student_max_tokens=prompt)
    assert build_batch(samples[1:2], fmt, PHRASES, no_room).sample_weights.tolist() == [0.0]
    only_correct = build_batch(samples, fmt, PHRASES, BatchConfig(correct_only=True))
    assert only_correct.sample_weights.tolist() == [1.0, 0.0, 0.0]
    assert only_correct.loss_mask[1:].sum() == 0 and only_correct.valid_tokens() == len(
        samples[0].response_ids
    )
    assert only_correct.rewards.tolist() == [1.0, 0.0, 0.0]
    assert only_correct.response_lengths.tolist() == [len(s.response_ids) for s in samples]


def test_reward_picks_the_control_phrase(fmt, samples) -> None:
    for sample, phrase in zip(samples, [PHRASES.correct, PHRASES.incorrect, PHRASES.incorrect], strict=True):
        row = build_row(sample, fmt, PHRASES, BatchConfig())
        delim = list(fmt.delimiter_ids(phrase))
        start = len(sample.prompt_ids) + len(fmt.body(sample.response_ids))
        assert row.teacher[start : start + len(delim)] == delim


def test_micro_batches_keep_the_alignment_and_drop_unneeded_padding(fmt, samples) -> None:
    batch = build_batch([samples[0], samples[2], samples[1]], fmt, PHRASES, BatchConfig(pad_to_multiple_of=4))
    parts = batch.micro_batches(2, trim_to_multiple=4)
    assert [p.size for p in parts] == [2, 1]
    last = parts[1]
    assert (
        last.student_tokens.shape[1] < batch.student_tokens.shape[1] and last.student_tokens.shape[1] % 4 == 0
    )
    assert (
        last.teacher_tokens.shape[1] < batch.teacher_tokens.shape[1]
        and last.loss_mask.shape[1] < batch.loss_mask.shape[1]
    )
    for part, rows in zip(parts, [slice(0, 2), slice(2, 3)], strict=True):
        mask = part.loss_mask
        assert torch.equal(part.targets[mask], batch.targets[rows][batch.loss_mask[rows]])
        assert torch.equal(_gathered(part.student_tokens, part.student_index)[mask], part.targets[mask])
        assert torch.equal(_gathered(part.teacher_tokens, part.teacher_index)[mask], part.targets[mask])
    untrimmed = batch.micro_batches(2, trim_to_multiple=None)
    assert all(p.teacher_tokens.shape[1] == batch.teacher_tokens.shape[1] for p in untrimmed)
