"""avg@k / pass@k against brute force; the evaluator with a scripted engine; ``sdzero eval`` end to end."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

from megatron_sdzero.config import ConfigError, from_dict
from megatron_sdzero.data.formatting import ChatFormat
from megatron_sdzero.data.problems import ArithmeticSpec, ProblemSource, load_problems
from megatron_sdzero.eval.evaluate import EvalOptions, evaluate
from megatron_sdzero.eval.metrics import avg_at_k, benchmark_scores, pass_at_k
from megatron_sdzero.eval.run import EvalConfig, run_eval
from megatron_sdzero.rewards import MathRewardConfig, RewardConfig, build_reward
from megatron_sdzero.rollout.base import Completion, SamplingParams, mix_seed, per_prompt


def _brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(outcomes[i] for i in subset) for subset in subsets)
    return Fraction(hits, len(subsets))


def test_pass_at_k_equals_brute_force_enumeration() -> None:
    checked = 0
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_brute_force_pass_at_k(n, c, k)), abs=1e-12)
                checked += 1
    assert checked == 240


@pytest.mark.parametrize(("n", "c", "k"), [(200, 3, 10), (1000, 1, 500), (2000, 17, 64), (5000, 4990, 8)])
def test_pass_at_k_is_stable_where_the_binomials_overflow_floats(n: int, c: int, k: int) -> None:
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_edges_and_errors() -> None:
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 1, 1) == 0.125
    assert pass_at_k(10, 8, 3) == 1.0  # fewer than k wrong samples: every k-subset hits
    assert avg_at_k(8, 3) == 0.375
    for args in [(4, 5, 1), (4, -1, 1), (4, 2, 5), (4, 2, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)
    scores = benchmark_scores([0, 2, 8], 8, [1, 8])
    assert scores["avg@8"] == pytest.approx((0 + 0.25 + 1) / 3)
    assert scores["pass@1"] == pytest.approx(scores["avg@8"])  # pass@1 is the mean accuracy
    assert scores["pass@8"] == pytest.approx(2 / 3)


class AnsweringEngine:
    """Answers each problem's gold (read back from the prompt) with probability p_i from its seed."""

    def __init__(self, tokenizer, problems) -> None:
        self.tokenizer = tokenizer
        self.by_prompt = {}
        fmt = ChatFormat(tokenizer)
        from megatron_sdzero.data.formatting import build_messages

        for i, problem in enumerate(problems):
            self.by_prompt[tuple(fmt.prompt_ids(build_messages(problem.text, "math")))] = (i, problem.answer)
        self.eot = fmt.end_of_turn_id
        self.calls: list[SamplingParams] = []

    def generate(self, prompts, params):
        out = []
        for prompt, p in zip(prompts, per_prompt(prompts, params), strict=True):
            self.calls.append(p)
            index, gold = self.by_prompt[tuple(prompt)]
            out.append([self._sample(index, gold, p.seed, j) for j in range(p.n)])
        return out

    def _sample(self, index: int, gold: str, seed: int, j: int) -> Completion:
        right = mix_seed(seed, j) % 8 < index % 9  # problem i is right about i/8 of the time
        text = f"so the answer is \\boxed{{{gold if right else 'x'}}}"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Completion(ids + [self.eot], text, "stop")

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer():
    from megatron_sdzero.assets.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def test_evaluate_counts_every_sample_and_reproduces_with_the_same_seed(tokenizer) -> None:
    problems, _ = load_problems(ProblemSource(arithmetic=ArithmeticSpec(n=12, seed=1)))
    engine = AnsweringEngine(tokenizer, problems)
    options = EvalOptions(k=8, pass_at=[1, 4, 8], batch_size=5)
    with build_reward(RewardConfig(math=MathRewardConfig(num_workers=1))) as grader:
        report = evaluate(problems, engine, grader, ChatFormat(tokenizer), SamplingParams(), options)
        again = evaluate(
            problems, engine, grader, ChatFormat(tokenizer), SamplingParams(), EvalOptions(k=8, batch_size=12)
        )
    expected = [
        sum(mix_seed(c.seed, j) % 8 < i % 9 for j in range(8)) for i, c in enumerate(engine.calls[:12])
    ]
    assert [p.correct for p in report.problems] == expected
    assert 0 < sum(expected) < 8 * 12
    assert report.scores == benchmark_scores(expected, 8, [1, 4, 8])
    assert [p.correct for p in again.problems] == expected  # seeds per problem, not per batch
    assert all(c.n == 8 and ChatFormat(tokenizer).end_of_turn_id in c.stop_token_ids for c in engine.calls)
    assert report.tokens == sum(p.mean_tokens * 8 for p in report.problems)


def test_eval_config_checks_its_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pass_at"):
        EvalOptions(k=4, pass_at=[8])
    with pytest.raises(ConfigError, match="reward.mode"):
        from_dict(
            EvalConfig,
            {"model": {"path": "m"}, "problems": {"arithmetic": {"n": 2}}, "reward": {"mode": "code"}},
        )


@pytest.mark.slow
def test_sdzero_eval_exports_a_megatron_checkpoint_and_writes_a_report(
    tiny_hf_models, tmp_path: Path
) -> None:
    from megatron_sdzero.conversion.convert import hf_to_mcore

    megatron = hf_to_mcore(tiny_hf_models["qwen3_tied"], tmp_path / "mcore", tp=1, pp=1)
    config = from_dict(
        EvalConfig,
        {
            "model": {"path": str(megatron), "family": "qwen3"},
            "problems": {"arithmetic": {"n": 3, "seed": 0}},
            "rollout": {"engine": "hf", "max_model_len": 512, "threads": 1},
            "sampling": {"max_tokens": 6},
            "reward": {"math": {"num_workers": 1}},
            "eval": {"k": 2, "pass_at": [1, 2]},
            "output": {"report": str(tmp_path / "eval" / "report.json")},
        },
    )
    result = run_eval(config)
    on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert on_disk["num_problems"] == 3 and on_disk["k"] == 2
    assert set(on_disk) >= {"avg@2", "pass@1", "pass@2", "problems", "config"}
    assert all(p["samples"] == 2 and p["mean_tokens"] <= 6 for p in on_disk["problems"])
    assert (tmp_path / "eval" / "hf" / "model.safetensors").is_file()  # the export the engine read
    assert result["benchmarks"]["default"]["avg@2"] == on_disk["avg@2"]
    assert (tmp_path / "eval" / "results.md").read_text().count("| default | 3 |") == 1
