"""``sdzero eval`` over a list of benchmarks: resume exactness, identity checks, bootstrap, table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_sdzero.config import ConfigError, from_dict
from megatron_sdzero.data.formatting import ChatFormat, build_messages
from megatron_sdzero.data.problems import load_problems
from megatron_sdzero.eval.metrics import bootstrap_interval
from megatron_sdzero.eval.report import markdown_table
from megatron_sdzero.eval.run import EvalConfig, run_eval
from megatron_sdzero.rollout.base import Completion, mix_seed, per_prompt


class Killed(RuntimeError):
    pass


class GoldEngine:
    """Right on a sample when its seed says so (about 3 in 8); raises Killed on call ``die_at``."""

    def __init__(self, tokenizer, problems, die_at: int | None = None) -> None:
        self.tokenizer, self.fmt = tokenizer, ChatFormat(tokenizer)
        self.gold = {tuple(self.fmt.prompt_ids(build_messages(p.text, "math"))): p.answer for p in problems}
        self.die_at, self.calls, self.prompts = die_at, 0, 0

    def generate(self, prompts, params):
        self.calls += 1
        if self.calls == self.die_at:
            raise Killed(f"killed at call {self.calls}")
        self.prompts += len(prompts)
        return [
            [self._sample(self.gold[tuple(prompt)], p.seed, j) for j in range(p.n)]
            for prompt, p in zip(prompts, per_prompt(prompts, params), strict=True)
        ]

    def _sample(self, gold: str, seed: int, j: int) -> Completion:
        text = f"\\boxed{{{gold if mix_seed(seed, j) % 8 < 3 else 'x'}}}"
        return Completion(
            self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.fmt.end_of_turn_id],
            text,
            "stop",
        )

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer():
    from megatron_sdzero.assets.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _config(directory: Path, **eval_values) -> EvalConfig:
    return from_dict(
        EvalConfig,
        {
            "model": {"path": "scripted"},
            "benchmarks": [
                {"name": "easy", "problems": {"arithmetic": {"n": 10, "seed": 1}}},
                {
                    "name": "words",
                    "problems": {"arithmetic": {"n": 7, "seed": 2, "difficulty": 3}},
                    "k": 6,
                    "pass_at": [1, 2, 6],
                    "sampling": {"max_tokens": 64},
                },
            ],
            "reward": {"math": {"num_workers": 1}},
            "eval": {"k": 4, "pass_at": [1, 4], "batch_size": 3, **eval_values},
            "output": {"dir": str(directory)},
        },
    )


def _all_problems(config: EvalConfig):
    return [p for b in config.suite for p in load_problems(b.problems)[0]]


def _scores(results: dict) -> dict:
    drop = {"resumed_problems", "tokens_this_run", "generation_s", "grading_s", "log"}
    return {name: {k: v for k, v in s.items() if k not in drop} for name, s in results["benchmarks"].items()}


class RecordingBar:
    made: list[RecordingBar] = []

    def __init__(self, total: int, initial: int, desc: str) -> None:
        self.total, self.initial, self.desc, self.updates = total, initial, desc, []
        RecordingBar.made.append(self)

    def update(self, n: int) -> None:
        self.updates.append(n)

    def close(self) -> None:
        pass


def test_a_killed_run_resumes_to_the_uninterrupted_result(tokenizer, tmp_path: Path) -> None:
    config = _config(tmp_path / "whole")
    problems = _all_problems(config)
    whole = run_eval(config, engine=GoldEngine(tokenizer, problems))

    killed = _config(tmp_path / "killed")
    with pytest.raises(Killed):  # calls 1-4 finish "easy" (10 problems), call 6 dies inside "words"
        run_eval(killed, engine=GoldEngine(tokenizer, problems, die_at=6))
    log = tmp_path / "killed" / "words.jsonl"
    assert len(log.read_text().splitlines()) == 1 + 3  # identity + the first batch of "words"
    with log.open("a") as f:
        f.write('{"id": "torn mid-wri')  # the kill hit a write
    resumed_engine = GoldEngine(tokenizer, problems)
    RecordingBar.made = []
    resumed = run_eval(killed, engine=resumed_engine, progress=RecordingBar)

    assert resumed_engine.prompts == 7 - 3  # only the unfinished problems were sampled again
    assert _scores(resumed) == _scores(whole)
    assert resumed["benchmarks"]["words"]["resumed_problems"] == 3
    assert resumed["benchmarks"]["easy"]["resumed_problems"] == 10
    assert [(b.desc, b.total, b.initial, sum(b.updates)) for b in RecordingBar.made] == [
        ("easy", 10, 10, 0),
        ("words", 7, 3, 4),
    ]
    assert len(log.read_text().splitlines()) == 1 + 7 and log.read_text().endswith("\n")
    on_disk = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert _scores(on_disk) == _scores(whole)
    words = whole["benchmarks"]["words"]
    assert words["k"] == 6 and set(words) >= {"avg@6", "pass@1", "pass@2", "pass@6"}
    assert "pass@4" not in words and whole["benchmarks"]["easy"]["k"] == 4
    assert 0 < words["avg@6"] < 1 and words["ci95"]["avg@6"][0] <= words["avg@6"] <= words["ci95"]["avg@6"][1]


def test_a_log_from_another_config_is_refused(tokenizer, tmp_path: Path) -> None:
    config = _config(tmp_path)
    run_eval(config, engine=GoldEngine(tokenizer, _all_problems(config)))
    changed = _config(tmp_path, seed=7)
    with pytest.raises(
        ConfigError, match=r"easy.jsonl: written by a different eval config \(differs in \['seed'\]\)"
    ):
        run_eval(changed, engine=GoldEngine(tokenizer, _all_problems(config)))
    (tmp_path / "easy.jsonl").write_text('{"identity": {}}\nnot json\n{}\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        run_eval(config, engine=GoldEngine(tokenizer, _all_problems(config)))


def test_benchmark_list_checks(tmp_path: Path) -> None:
    def build(values: dict) -> EvalConfig:
        return from_dict(EvalConfig, {"model": {"path": "m"}, **values})

    one = {"name": "a", "problems": {"arithmetic": {"n": 2}}}
    with pytest.raises(ConfigError, match="unique"):
        build({"benchmarks": [one, one]})
    with pytest.raises(ConfigError, match="either benchmarks"):
        build({"benchmarks": [one], "problems": {"arithmetic": {"n": 2}}})
    with pytest.raises(ConfigError, match="either benchmarks"):
        build({})
    with pytest.raises(ConfigError, match="name"):
        build({"benchmarks": [{**one, "name": "../x"}]})
    with pytest.raises(ConfigError, match=r"benchmarks.a: eval.pass_at"):
        build({"benchmarks": [{**one, "k": 2, "pass_at": [4]}]})
    with pytest.raises(ConfigError, match="does not grade"):
        build({"benchmarks": [{**one, "reward_mode": "code"}]})
    with pytest.raises(ConfigError, match="a.sampling.max_tokens"):
        build({"benchmarks": [{**one, "sampling": {"max_tokens": "many"}}]}).suite[0].sampling_params(
            build({"benchmarks": [one]}).sampling
        )
    assert build({"benchmarks": [{**one, "k": 2}]}).suite[0].options(
        build({"benchmarks": [one]}).eval
    ).pass_at == [1]


@pytest.mark.parametrize(("p", "n"), [(0.3, 4000), (0.05, 2000)])
def test_bootstrap_interval_of_a_bernoulli_mean(p: float, n: int) -> None:
    import numpy as np

    values = (np.random.default_rng(123).random(n) < p).astype(float).tolist()
    low, high = bootstrap_interval(values, seed=0)
    mean = sum(values) / n
    assert low < p < high and low < mean < high
    expected_width = 2 * 1.96 * math.sqrt(p * (1 - p) / n)
    assert high - low == pytest.approx(expected_width, rel=0.1)
    assert bootstrap_interval(values, seed=0) == (low, high)  # seeded
    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_markdown_table_by_hand() -> None:
    benchmarks = {
        "aime24": {
            "avg@8": 0.25,
            "pass@8": 0.5,
            "ci95": {"avg@8": [0.1, 0.4], "pass@8": [0.3, 0.7]},
            "num_problems": 30,
        },
        "ifeval": {"avg@4": 0.8125, "ci95": {"avg@4": [0.75, 0.875]}, "num_problems": 541},
    }
    assert markdown_table("m", benchmarks).splitlines()[2:] == [
        "| benchmark | problems | avg@8 | pass@8 | avg@4 |",
        "|---|---:|---:|---:|---:|",
        "| aime24 | 30 | 25.0 [10.0, 40.0] | 50.0 [30.0, 70.0] | - |",
        "| ifeval | 541 | - | - | 81.2 [75.0, 87.5] |",
    ]


def test_validation_set_scores_and_must_not_overlap_reported_benchmarks(tokenizer) -> None:
    from megatron_sdzero.eval.selection import ValidationConfig, load_validation
    from megatron_sdzero.rewards import MathRewardConfig, RewardConfig, build_reward

    def validation(**values) -> ValidationConfig:
        return from_dict(
            ValidationConfig,
            {
                "benchmark": {"name": "val", "problems": {"arithmetic": {"n": 6, "seed": 9}}, "k": 4},
                "options": {"k": 8, "pass_at": [1, 4, 8]},
                **values,
            },
        )

    chosen = load_validation(validation(metric="pass@4", reported=[{"arithmetic": {"n": 20, "seed": 1}}]))
    assert chosen.options.k == 4 and chosen.options.pass_at == [1, 4] and chosen.metric == "pass@4"
    engine = GoldEngine(tokenizer, chosen.problems)
    with build_reward(RewardConfig(math=MathRewardConfig(num_workers=1))) as grader:
        score, report = chosen.score(engine, grader, ChatFormat(tokenizer))
    assert score == report.scores["pass@4"] and len(report.problems) == 6
    with pytest.raises(ConfigError, match="6 of the 6 problems of 'val' are also in the reported benchmark"):
        load_validation(validation(reported=[{"arithmetic": {"n": 30, "seed": 9}}]))
    with pytest.raises(ConfigError, match="validation.metric"):
        validation(metric="pass@8")


def test_sdzero_eval_keeps_its_validation_benchmark_apart(tokenizer, tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.validation = "words"
    results = run_eval(config, engine=GoldEngine(tokenizer, _all_problems(config)))
    table = (tmp_path / "results.md").read_text()
    reported, validation = table.split("Validation set")
    assert "| easy |" in reported and "| words |" not in reported and "| words |" in validation
    assert results["validation"] == "words"
    overlapping = from_dict(
        EvalConfig,
        {
            "model": {"path": "m"},
            "validation": "val",
            "benchmarks": [
                {"name": "val", "problems": {"arithmetic": {"n": 4, "seed": 1}}},
                {"name": "test", "problems": {"arithmetic": {"n": 8, "seed": 1}}},
            ],
            "output": {"dir": str(tmp_path / "overlap")},
        },
    )
    with pytest.raises(ConfigError, match="also in the reported benchmark test"):
        run_eval(overlapping, engine=GoldEngine(tokenizer, _all_problems(overlapping)))
    with pytest.raises(ConfigError, match="names none"):
        from_dict(
            EvalConfig, {"model": {"path": "m"}, "validation": "x", "problems": {"arithmetic": {"n": 2}}}
        )


def test_the_paper_recipe_resolves() -> None:
    from megatron_sdzero.config import load_config

    root = Path(__file__).resolve().parents[1]
    config = load_config(EvalConfig, root / "examples" / "eval_qwen3_4b_paper.yaml")
    names = [b.name for b in config.suite]
    assert names[:8] == ["aime24", "aime25", "hmmt_feb25", "amo_bench", "openr1_heldout", "livecodebench",
                         "codeforces", "ifeval"]  # fmt: skip
    assert config.validation == "openr1_val" and {b.mode for b in config.suite} == {
        "math",
        "code",
        "instruct",
    }
    assert all(b.options(config.eval).k == 8 for b in config.suite)
    assert config.suite[5].sampling_params(config.sampling).max_tokens == 16384


def test_the_offline_suite_recipe_resolves_and_its_gym_seeds_are_disjoint() -> None:
    from megatron_sdzero.config import load_config
    from megatron_sdzero.data.reasoning_gym import check_disjoint_seeds

    root = Path(__file__).resolve().parents[1]
    config = load_config(EvalConfig, root / "examples" / "eval_smollm2_suite_gpu.yaml")
    gym = [b.problems.reasoning_gym for b in config.suite if b.problems.reasoning_gym is not None]
    assert len(gym) == 2
    check_disjoint_seeds(gym[0], gym[1])
    assert [b.mode for b in config.suite] == ["math", "math", "math", "code"]


def test_each_checkpoint_gets_its_own_output_dir() -> None:
    one = {"name": "a", "problems": {"arithmetic": {"n": 2}}}
    config = from_dict(EvalConfig, {"model": {"path": "runs/x/hf/step_000200"}, "benchmarks": [one]})
    assert config.output_dir == Path("outputs/eval/step_000200")
