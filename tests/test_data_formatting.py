"""Token-level formatting: every sequence type holds y's exact ids, inside the assistant turn."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_sdzero.assets.tiny import build_tiny_tokenizer
from megatron_sdzero.config import ConfigError
from megatron_sdzero.data.formatting import (
    ChatFormat,
    ControlPhrases,
    PromptConfig,
    build_messages,
    build_sft_sample,
    resolve_phrases,
)

QWEN_WRONG = "Wait, this response is wrong. Let me correct it."
OLMO_WRONG = "Wrong. I need to redo all."
REPHRASE = "Let me rephrase the above solution."

# A Llama-3 style template: BOS, header tokens, and an end-of-turn token that is not the EOS token.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def _llama3_style_tokenizer():
    tok = build_tiny_tokenizer()
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ]
        }
    )
    tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def fmt(request) -> ChatFormat:
    tok = build_tiny_tokenizer() if request.param == "chatml" else _llama3_style_tokenizer()
    return ChatFormat(tok)


def _random_ids(fmt: ChatFormat, n: int, seed: int) -> list[int]:
    """Ids no tokenizer would produce from text (so any re-tokenization would show)."""
    special = set(fmt.tokenizer.all_special_ids)
    pool = [i for i in range(len(fmt.tokenizer)) if i not in special]
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]


def _generation_marker(fmt: ChatFormat, messages) -> list[int]:
    with_marker = fmt.prompt_ids(messages)
    without = fmt.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert with_marker[: len(without)] == list(without)
    return with_marker[len(without) :]


def test_end_of_turn_is_read_from_the_template(fmt: ChatFormat) -> None:
    token = fmt.tokenizer.convert_ids_to_tokens(fmt.end_of_turn_id)
    expected = "<|im_end|>" if "im_start" in fmt.tokenizer.chat_template else "<|eot_id|>"
    assert token == expected
    assert fmt.end_of_turn_id in fmt.stop_ids and fmt.tokenizer.eos_token_id in fmt.stop_ids


def test_y_ids_are_identical_in_every_sequence_and_sit_in_the_assistant_turn(fmt: ChatFormat) -> None:
    messages = build_messages("What is 12 + 7?", "math")
    prompt = fmt.prompt_ids(messages)
    eot = fmt.end_of_turn_id
    y_init = _random_ids(fmt, 23, seed=1) + [eot]  # as a rollout returns it: ends with end of turn
    y_rev = _random_ids(fmt, 17, seed=2) + [eot]
    body_init, body_rev = y_init[:-1], y_rev[:-1]
    delim = list(fmt.delimiter_ids(QWEN_WRONG))
    p, b = len(prompt), len(body_init)

    revision = fmt.revision_prompt(prompt, y_init, QWEN_WRONG)
    stage1 = fmt.stage1_sample(prompt, y_init, QWEN_WRONG, y_rev)
    stage2 = fmt.stage2_sample(prompt, y_init, QWEN_WRONG, y_rev)
    teacher = fmt.teacher_input(prompt, y_init, QWEN_WRONG, budget=10_000)

    for seq in (revision, stage1.input_ids, stage2.input_ids, teacher.input_ids.tolist()):
        assert seq[:p] == prompt
        assert seq[p : p + b] == body_init  # y_init: same ids, right after the assistant marker
        assert seq[p + b : p + b + len(delim)] == delim  # P_r inside the same turn
        assert eot not in seq[p : p + b + len(delim)]  # no end of turn in the middle of the turn
    assert revision == stage1.input_ids[: len(revision)] == stage2.input_ids[: len(revision)]
    for sample in (stage1, stage2):
        assert sample.input_ids[len(revision) :] == body_rev + [eot]  # y_revised, then one end of turn
    assert teacher.input_ids[len(revision) :].tolist() == y_init  # the second copy is y as sampled
    marker = _generation_marker(fmt, messages)
    assert marker and prompt[-len(marker) :] == marker  # the prompt ends by opening the assistant turn


def test_stage_masks_cover_exactly_their_targets(fmt: ChatFormat) -> None:
    prompt = fmt.prompt_ids(build_messages("What is 3 * 4?", "math"))
    y_init, y_rev = _random_ids(fmt, 9, 3), _random_ids(fmt, 11, 4)  # no end of turn: cut by max_tokens
    stage1 = fmt.stage1_sample(prompt, y_init, REPHRASE, y_rev)
    stage2 = fmt.stage2_sample(prompt, y_init, REPHRASE, y_rev)
    assert stage1.input_ids == stage2.input_ids
    assert stage1.input_ids[-1] == fmt.end_of_turn_id  # appended: the sample still ends the turn
    n_rev = len(y_rev) + 1
    assert stage2.loss_mask == [0] * (len(stage2.input_ids) - n_rev) + [1] * n_rev
    assert stage1.loss_mask == [0] * len(prompt) + [1] * (len(stage1.input_ids) - len(prompt))


def test_samples_match_the_chat_template_rendering_of_the_assistant_turn(fmt: ChatFormat) -> None:
    tok = fmt.tokenizer
    messages = build_messages("Ava has 3 apples and buys 4 more. How many?", "math")
    y_init_text, y_rev_text = "She has 3 + 4 = 8 apples.", "She has 3 + 4 = 7 apples, so \\boxed{7}."
    y_init = tok(y_init_text, add_special_tokens=False)["input_ids"] + [fmt.end_of_turn_id]
    y_rev = tok(y_rev_text, add_special_tokens=False)["input_ids"] + [fmt.end_of_turn_id]
    sample = fmt.stage2_sample(fmt.prompt_ids(messages), y_init, QWEN_WRONG, y_rev)
    content = f"{y_init_text}\n\n{QWEN_WRONG}\n\n{y_rev_text}"
    rendered = tok.apply_chat_template(messages + [{"role": "assistant", "content": content}], tokenize=False)
    assert rendered.startswith(tok.decode(sample.input_ids))


def test_teacher_alignment_and_budget_truncation(fmt: ChatFormat) -> None:
    prompt = fmt.prompt_ids(build_messages("What is 5 + 5?", "math", PromptConfig(system="")))
    y = _random_ids(fmt, 30, 5) + [fmt.end_of_turn_id]
    delim = len(fmt.delimiter_ids(REPHRASE))

    full = fmt.teacher_input(prompt, y, REPHRASE, budget=10_000)
    student = full.student_input_ids
    assert student.tolist() == prompt + y and not full.truncated and full.weight == 1.0
    assert torch.equal(full.input_ids[full.teacher_positions], student[full.student_positions])
    assert student[full.student_positions].tolist() == y
    assert full.loss_mask.nonzero().flatten().tolist() == full.teacher_positions.tolist()
    assert len(full.input_ids) == len(prompt) + (len(y) - 1) + delim + len(y)  # first copy without eot

    budget = len(prompt) + delim + 2 * 12 + 1
    cut = fmt.teacher_input(prompt, y, REPHRASE, budget=budget)
    assert cut.truncated and cut.weight == 1.0 and len(cut.input_ids) <= budget
    assert len(cut.teacher_positions) == 12 == (budget - len(prompt) - delim) // 2
    assert cut.input_ids[cut.teacher_positions].tolist() == y[:12]
    assert cut.input_ids[len(prompt) : len(prompt) + 12].tolist() == y[:12]  # both copies cut alike
    assert cut.student_positions.tolist() == list(range(len(prompt), len(prompt) + 12))

    none = fmt.teacher_input(prompt, y, REPHRASE, budget=len(prompt) + delim - 1)
    assert none.weight == 0.0 and not none.loss_mask.any() and len(none.teacher_positions) == 0


def test_build_sft_sample_reads_stage_records(fmt: ChatFormat) -> None:
    messages = build_messages("What is 9 - 4?", "math")
    record = {
        "stage": 2,
        "messages": messages,
        "phrase": OLMO_WRONG,
        "y_init_ids": _random_ids(fmt, 8, 6),
        "y_revised_ids": _random_ids(fmt, 8, 7) + [fmt.end_of_turn_id],
    }
    expected = fmt.stage2_sample(
        fmt.prompt_ids(messages), record["y_init_ids"], OLMO_WRONG, record["y_revised_ids"]
    )
    assert build_sft_sample(record, fmt.tokenizer, fmt) == (expected.input_ids, expected.loss_mask)
    ids, mask = build_sft_sample({**record, "stage": 1}, fmt.tokenizer, fmt)
    assert ids == expected.input_ids and mask != expected.loss_mask
    with pytest.raises(ValueError, match="stage"):
        build_sft_sample({**record, "stage": 3}, fmt.tokenizer, fmt)


def test_phrases_come_from_the_family_or_config_never_a_default() -> None:
    assert resolve_phrases("qwen3").for_reward(0.0) == QWEN_WRONG
    assert resolve_phrases("qwen3").for_reward(1.0) == REPHRASE
    assert resolve_phrases("olmo3").for_reward(0.0) == OLMO_WRONG
    assert resolve_phrases("OLMo").for_reward(0.0) == OLMO_WRONG
    with pytest.raises(ConfigError, match="correct/incorrect"):
        resolve_phrases("llama")
    with pytest.raises(ConfigError, match="no default"):
        resolve_phrases(None)
    with pytest.raises(ConfigError, match="phrases.correct"):
        resolve_phrases("llama", ControlPhrases(incorrect="No."))
    explicit = resolve_phrases("llama", ControlPhrases(correct="Again:", incorrect="No."))
    assert (explicit.for_reward(1), explicit.for_reward(0)) == ("Again:", "No.")
    assert resolve_phrases("qwen3", ControlPhrases(incorrect="No.")).for_reward(0) == "No."


def test_messages_follow_the_prompt_config() -> None:
    default = build_messages("Find x.", "math")
    assert [m["role"] for m in default] == ["system", "user"]
    assert (
        default[1]["content"]
        == "Find x.\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    bare = build_messages("Find x.", "math", PromptConfig(system="", instruction=""))
    assert bare == [{"role": "user", "content": "Find x."}]
    assert build_messages("Print 1.", "code")[1]["content"] == "Print 1."
