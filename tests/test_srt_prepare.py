"""srt-prepare: cleaning, dedupe, the seeded stage split, and the stage files the SFT reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sdzero.assets.tiny import build_tiny_tokenizer
from megatron_sdzero.config import from_dict
from megatron_sdzero.data.formatting import ChatFormat, build_messages, build_sft_sample
from megatron_sdzero.srt.cleaning import (
    DEFAULT_OPENERS,
    Cleaner,
    CleaningConfig,
    opener_pattern,
    strip_openers,
    trim_repeated_tail,
)
from megatron_sdzero.srt.config import SRTConfig
from megatron_sdzero.srt.prepare import main as prepare_main
from megatron_sdzero.srt.split import SplitConfig, dedupe, split_stages
from megatron_sdzero.srt.store import CollectionStore, Counters

WRONG = "Wait, this response is wrong. Let me correct it."


@pytest.fixture(scope="module")
def fmt() -> ChatFormat:
    return ChatFormat(build_tiny_tokenizer())


def test_trim_keeps_one_copy_of_a_periodic_tail() -> None:
    ids = [5, 6, 7] + [1, 2, 3, 4] * 40 + [1, 2]  # stopped mid-loop
    assert trim_repeated_tail(ids, min_repeats=3, min_tail=16) == [5, 6, 7, 1, 2, 3, 4]
    loop = "So the answer is 12. " + "We check again. " * 12 + "We che"
    # The repeating stretch starts at "12" + ". ": the copy kept is that rotation of the period.
    assert trim_repeated_tail(loop, 3, 64) == "So the answer is 12. We check again"
    assert trim_repeated_tail("!" * 100, 3, 64) == "!"
    for untouched in ("x = 1000000000", "abab", "The answer is \\boxed{7}." + " " * 10):
        assert trim_repeated_tail(untouched, 3, 64) == untouched  # short repeats are content, not loops
    two_copies = [9] + [1, 2, 3] * 30
    assert trim_repeated_tail(two_copies, min_repeats=31, min_tail=4) == two_copies  # needs 31 repeats
    assert trim_repeated_tail([1, 2, 3] * 3, max_period=2, min_repeats=2, min_tail=1) == [1, 2, 3] * 3


def test_openers_are_stripped_but_not_the_answer() -> None:
    pattern = opener_pattern(DEFAULT_OPENERS)
    assert strip_openers("You're absolutely right! The slip was in step 2.\nSo x = 3.", pattern) == (
        "The slip was in step 2.\nSo x = 3."
    )
    assert (
        strip_openers("Good catch, thanks. I apologize for that. Let me redo it.", pattern)
        == "Let me redo it."
    )
    assert strip_openers("You’re right, the total is \\boxed{7}.", pattern) == "the total is \\boxed{7}."
    assert (
        strip_openers("Sorry-looking start? No: Sorrysome is a word.", pattern) == "No: Sorrysome is a word."
    )
    assert strip_openers("Sorrysome text.", pattern) == "Sorrysome text."
    assert strip_openers("Let me recompute: 3 + 4 = 7.", pattern) == "Let me recompute: 3 + 4 = 7."
    assert strip_openers("You're right.", opener_pattern([])) == "You're right."


def _tuple(
    fmt: ChatFormat, problem: str, y_init: str, y_revised: str, init_correct: bool = False, **extra
) -> dict:
    tok, eot = fmt.tokenizer, fmt.end_of_turn_id
    return {
        "problem_id": extra.pop("problem_id", problem[:8]),
        "mode": "math",
        "problem": problem,
        "answer": "7",
        "messages": build_messages(problem, "math"),
        "init_index": extra.pop("init_index", 0),
        "revision_index": extra.pop("revision_index", 0),
        "init_correct": init_correct,
        "phrase": WRONG,
        "y_init": y_init,
        "y_init_ids": tok(y_init, add_special_tokens=False)["input_ids"] + [eot],
        "y_revised": y_revised,
        "y_revised_ids": tok(y_revised, add_special_tokens=False)["input_ids"] + [eot],
        **extra,
    }


def test_cleaner_keeps_ids_and_text_in_step(fmt: ChatFormat) -> None:
    cleaner = Cleaner(fmt, CleaningConfig(min_tail_tokens=16))
    looping = "3 + 4 is 7." + " Check it again." * 20
    record = _tuple(fmt, "What is 3 + 4?", looping, "Good catch! It is \\boxed{7}, not 8.")
    record["y_init_ids"] = record["y_init_ids"][:-1]  # a loop is usually cut by max_tokens: no eot
    cleaned = cleaner.clean(record)
    assert cleaned["y_init"].startswith("3 + 4 is 7") and cleaned["y_init"].count("Check") == 1
    assert fmt.tokenizer.decode(cleaned["y_init_ids"]) == cleaned["y_init"]
    assert cleaned["y_revised"] == "It is \\boxed{7}, not 8."
    assert cleaned["y_revised_ids"][-1] == fmt.end_of_turn_id  # the revision still ends its turn
    assert fmt.tokenizer.decode(cleaned["y_revised_ids"], skip_special_tokens=True) == cleaned["y_revised"]
    assert dict(cleaner.stats) == {"trimmed_y_init": 1, "stripped_opener": 1}
    assert record["y_revised"].startswith("Good catch")  # the input record is not modified
    assert cleaner.clean(_tuple(fmt, "Q?", "a", "You are right.")) is None
    assert cleaner.stats["dropped_empty_revision"] == 1


def test_dedupe_and_split(fmt: ChatFormat) -> None:
    records = [
        _tuple(
            fmt, f"Problem {k}?", f"wrong {k}", f"right {k}", init_correct=k % 4 == 0, problem_id=f"p{k:02d}"
        )
        for k in range(20)
    ]
    unique, duplicates = dedupe(records + [dict(records[3]), dict(records[5], init_index=1)])
    assert duplicates == 2 and unique == records  # same text triple: a duplicate, whatever the indices

    stage1, stage2 = split_stages(records, SplitConfig(stage2_size=7, stage1_size=100, seed=0))
    correct = [r for r in records if r["init_correct"]]
    assert len(stage2) == 7 and all(r in stage2 for r in correct)  # correct-init tuples go first
    assert len(stage1) == 20 - 7 and not any(r["init_correct"] for r in stage1)
    assert {r["problem_id"] for r in stage1}.isdisjoint({r["problem_id"] for r in stage2})

    again = split_stages(records[::-1], SplitConfig(stage2_size=7, stage1_size=100, seed=0))
    assert again == (stage1, stage2)  # input order does not matter
    other = split_stages(records, SplitConfig(stage2_size=7, stage1_size=100, seed=1))
    assert other != (stage1, stage2)
    small = split_stages(records, SplitConfig(stage2_size=3, stage1_size=4, seed=0))
    assert len(small[1]) == 3 and all(r["init_correct"] for r in small[1]) and len(small[0]) == 4


def test_srt_prepare_command_writes_stage_files_the_sft_can_read(tmp_path: Path, fmt: ChatFormat) -> None:
    model_dir = tmp_path / "tok"
    fmt.tokenizer.save_pretrained(model_dir)
    run = tmp_path / "run"
    store = CollectionStore.open(run, {"identity": 1})
    records = [
        _tuple(
            fmt,
            f"Problem {k}?",
            f"wrong {k}",
            f"You're right. Fixed {k}.",
            init_correct=k < 2,
            problem_id=f"p{k}",
        )
        for k in range(8)
    ]
    store.commit(["a"], records[:5], [], Counters(tuples_kept=5))
    store.commit(["b"], records[5:] + [dict(records[0])], [], Counters(tuples_kept=4))
    with (run / "tuples.jsonl").open("a") as f:
        f.write('{"torn": ')  # an uncommitted partial line is ignored
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{path: {model_dir}, family: qwen3}}\nproblems: {{arithmetic: {{n: 1}}}}\n"
        f"collect: {{output_dir: {run}}}\nprepare: {{split: {{stage2_size: 3, stage1_size: 10}}}}\n"
    )
    assert prepare_main(["--config", str(recipe)]) == 0

    summary = json.loads((run / "sft" / "prepare_summary.json").read_text())
    assert summary["tuples_read"] == 9 and summary["duplicates_dropped"] == 1 and summary["unique"] == 8
    assert summary["cleaning"] == {"stripped_opener": 9}
    assert (summary["stage1"], summary["stage2"], summary["stage2_correct_init"]) == (5, 3, 2)
    stage1 = [json.loads(line) for line in (run / "sft" / "stage1.jsonl").read_text().splitlines()]
    stage2 = [json.loads(line) for line in (run / "sft" / "stage2.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in stage1} == {1} and {r["stage"] for r in stage2} == {2}
    for record in stage1 + stage2:
        assert record["y_revised"].startswith("Fixed")
        ids, mask = build_sft_sample(record, fmt.tokenizer)
        assert ids[-1] == fmt.end_of_turn_id and mask[-1] == 1 and 0 < sum(mask) < len(ids)
    before = (run / "sft" / "stage2.jsonl").read_bytes()
    assert prepare_main(["--config", str(recipe)]) == 0
    assert (run / "sft" / "stage2.jsonl").read_bytes() == before  # reproducible
    config = from_dict(
        SRTConfig,
        {"model": {"path": str(model_dir), "family": "qwen3"}, "problems": {"arithmetic": {"n": 1}}},
    )
    assert config.prepare.split.stage2_size == 1000 and config.prepare.split.stage1_size == 4000
