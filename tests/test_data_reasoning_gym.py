"""reasoning-gym problems: seeded, disjoint seed ranges, graded by the task's own scorer."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import pytest

from megatron_sdzero.config import ConfigError, from_dict
from megatron_sdzero.data.problems import (
    ArithmeticSpec,
    ProblemSource,
    drop_overlap,
    load_problems,
)
from megatron_sdzero.data.reasoning_gym import ReasoningGymSpec, check_disjoint_seeds, extract_final_answer
from megatron_sdzero.rewards import MathRewardConfig, RewardConfig, build_reward


def _gym(task: str = "basic_arithmetic", seed: int = 0, size: int = 20, **config) -> ProblemSource:
    return ProblemSource(reasoning_gym=ReasoningGymSpec(task=task, seed=seed, size=size, config=config))


@pytest.fixture(scope="module")
def grader():
    with build_reward(RewardConfig(math=MathRewardConfig(num_workers=1))) as reward:
        yield reward


def test_same_seed_same_problems_and_other_seeds_differ() -> None:
    first, report = load_problems(_gym(seed=5))
    again, _ = load_problems(_gym(seed=5))
    other, _ = load_problems(_gym(seed=6))
    assert report.rows == 20 and report.loaded + report.duplicates == 20
    assert [(p.id, p.text, p.answer, p.reference) for p in first] == [
        (p.id, p.text, p.answer, p.reference) for p in again
    ]
    # reasoning-gym draws item i from Random(seed + i): seed 6 is seed 5 shifted by one item
    assert [p.text for p in other[: len(first) - 1]] == [p.text for p in first[1:]]
    assert first[0].text not in {p.text for p in other}
    assert all(p.mode == "math" and p.reference["seed"] == 5 for p in first)


def test_task_config_reaches_the_generator() -> None:
    hard, _ = load_problems(_gym(size=10, min_terms=5, max_terms=5, min_digits=3, max_digits=3))
    easy, _ = load_problems(_gym(size=10, min_terms=2, max_terms=2, min_digits=1, max_digits=1))
    assert all(len(re.findall(r"\d+", p.text)) == 5 for p in hard)  # five terms
    assert all(
        len(re.findall(r"\d+", p.text)) == 2 and max(map(len, re.findall(r"\d+", p.text))) == 1 for p in easy
    )
    with pytest.raises(ConfigError, match="rejects config"):
        load_problems(_gym(min_terms=9, max_terms=2))
    with pytest.raises(ConfigError, match="unknown task"):
        load_problems(_gym(task="no_such_task"))
    with pytest.raises(ConfigError, match="set \\['seed'\\]"):
        ReasoningGymSpec(task="basic_arithmetic", config={"seed": 3})


def test_seed_ranges_must_be_disjoint_and_overlapping_texts_can_be_dropped() -> None:
    train = ReasoningGymSpec(task="basic_arithmetic", seed=0, size=100)
    check_disjoint_seeds(train, ReasoningGymSpec(task="basic_arithmetic", seed=100, size=50))
    check_disjoint_seeds(train, ReasoningGymSpec(task="chain_sum", seed=0, size=50))  # another task
    with pytest.raises(ConfigError, match=r"seeds \[99, 100\)"):
        check_disjoint_seeds(train, ReasoningGymSpec(task="basic_arithmetic", seed=99, size=50))
    train_problems, _ = load_problems(_gym(seed=0, size=30, min_digits=1, max_digits=1, max_terms=2))
    held_out, _ = load_problems(_gym(seed=30, size=30, min_digits=1, max_digits=1, max_terms=2))
    kept = drop_overlap(held_out, train_problems)
    train_texts = {p.text for p in train_problems}
    assert kept == [p for p in held_out if p.text not in train_texts]
    assert drop_overlap(held_out, [p.text.upper() + " " for p in held_out]) == []  # normalised text


def test_right_wrong_and_missing_answers_are_graded_by_the_task_scorer(grader) -> None:
    problems, _ = load_problems(_gym(size=6))
    responses = [f"so \\boxed{{{p.answer}}}" for p in problems]
    responses += [f"<answer>{int(p.answer) + 1}</answer>" for p in problems]
    responses += ["I do not know"] * len(problems)
    references = [p.reference for p in problems] * 3
    graded = grader.grade_batch(responses, references)
    n = len(problems)
    assert graded.scores == [1.0] * n + [0.0] * (2 * n)
    assert {r.reason for r in graded.results[n : 2 * n]} == {"wrong_answer"}
    assert {r.reason for r in graded.results[2 * n :]} == {"no_answer"}
    assert [r.extracted for r in graded.results[:n]] == [p.answer for p in problems]


def test_the_scorer_not_string_equality_decides(grader) -> None:
    problems, _ = load_problems(_gym(task="decimal_arithmetic", size=4))
    padded = [f"\\boxed{{{Decimal(p.answer) + Decimal('0'):.12f}}}" for p in problems]  # trailing zeros
    assert all(f"{Decimal(p.answer):.12f}" != p.answer for p in problems)
    assert grader.grade_batch(padded, [p.reference for p in problems]).scores == [1.0] * len(problems)


def test_gym_and_math_references_mix_in_one_batch(grader) -> None:
    gym, _ = load_problems(_gym(size=2))
    arithmetic, _ = load_problems(ProblemSource(arithmetic=ArithmeticSpec(n=2)))
    problems = [gym[0], arithmetic[0], gym[1], arithmetic[1]]
    responses = [f"\\boxed{{{p.answer}}}" for p in problems]
    responses[2] = "\\boxed{not a number}"
    scores = grader.grade_batch(responses, [p.reference for p in problems]).scores
    assert scores == [1.0, 1.0, 0.0, 1.0]


def test_final_answer_extraction_rule() -> None:
    assert extract_final_answer("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert extract_final_answer("\\boxed{ \\text{Peng} }") == "Peng"
    assert extract_final_answer("<answer> 7 </answer> and <answer>8</answer>") == "8"
    assert extract_final_answer("<answer>3</answer> \\boxed{4") == "3"  # the box was cut off
    assert extract_final_answer("\\boxed{4") is None
    assert extract_final_answer("the answer is 5") is None


def test_solutions_ride_along_from_files_generators_and_gym(tmp_path: Path) -> None:
    rows = [
        {"problem": "What is 1+1?", "solution": "1+1=2, so \\boxed{2}.", "answer": "2"},  # OpenR1-Math
        {"problem": "What is 2+2?", "answer": "4"},
        {"problem": "What is 3+3?", "solution": "\\boxed{6}"},  # the solution is the answer field
    ]
    path = tmp_path / "openr1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded, _ = load_problems(ProblemSource(path=path))
    assert [p.solution for p in loaded] == [rows[0]["solution"], None, None]
    assert loaded[2].answer == "\\boxed{6}"
    arithmetic, _ = load_problems(ProblemSource(arithmetic=ArithmeticSpec(n=5, difficulty=3)))
    assert all(p.solution and p.solution.endswith(f"\\boxed{{{p.answer}}}.") for p in arithmetic)
    gsm, _ = load_problems(_gym(task="gsm_symbolic", size=2))
    assert all(p.solution and p.solution.strip().endswith(p.answer) for p in gsm)


def test_source_config_from_yaml_values() -> None:
    source = from_dict(
        ProblemSource,
        {"reasoning_gym": {"task": "chain_sum", "seed": 1000, "size": 3, "config": {"min_terms": 3}}},
    )
    assert source.reasoning_gym.seeds == range(1000, 1003)
    with pytest.raises(ConfigError, match="exactly one"):
        from_dict(ProblemSource, {"reasoning_gym": {"task": "chain_sum"}, "arithmetic": {"n": 2}})
    with pytest.raises(ConfigError, match="math mode"):
        from_dict(ProblemSource, {"reasoning_gym": {"task": "chain_sum"}, "mode": "code"})


@pytest.mark.parametrize(
    "task",
    [
        "chain_sum",
        "gsm_symbolic",
        "leg_counting",
        "fraction_simplification",
        "prime_factorization",
        "basic_arithmetic",
    ],
)
def test_the_gold_answer_scores_one_on_word_and_arithmetic_tasks(task: str) -> None:
    from megatron_sdzero.data.reasoning_gym import score_gym_answer

    problems, _ = load_problems(_gym(task=task, size=5))
    assert [score_gym_answer(f"so \\boxed{{{p.answer}}}", p.reference)[0] for p in problems] == [1.0] * len(
        problems
    )
