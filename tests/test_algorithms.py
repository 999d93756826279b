"""The baselines on the shared trainer: SDFT and GRPO batches and loops on the tiny CPU model (budget
stop, SIGKILL and resume), RFT keeps exactly the verified samples, bad input refused before any model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from megatron_sdzero.algorithms.base import BatchContext
from megatron_sdzero.algorithms.config import SDFT_TEMPLATE, GRPOConfig, SDFTConfig
from megatron_sdzero.algorithms.grpo import GRPO
from megatron_sdzero.algorithms.rft import filter_samples
from megatron_sdzero.algorithms.sdft import SDFT
from megatron_sdzero.config import ConfigError, from_dict
from megatron_sdzero.conversion.convert import hf_to_mcore
from megatron_sdzero.data.formatting import ChatFormat, PromptConfig, build_messages
from megatron_sdzero.data.problems import Problem
from megatron_sdzero.distill.batch import BatchConfig, RolloutSample
from megatron_sdzero.distill.config import DistillConfig
from megatron_sdzero.losses import DistillLossConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_hf_models["qwen3_tied"]))


def _problems() -> list[Problem]:
    return [
        Problem("p0", "math", "What is 2 + 3?", answer="5", solution="2 + 3 = 5. The answer is \\boxed{5}."),
        Problem(
            "p1", "math", "What is 4 * 4?", answer="16", solution="4 * 4 = 16. The answer is \\boxed{16}."
        ),
    ]


def _samples(fmt: ChatFormat, problems: list[Problem], rewards: list[list[float]]) -> list[RolloutSample]:
    samples = []
    for group, (problem, group_rewards) in enumerate(zip(problems, rewards, strict=True)):
        prompt = fmt.prompt_ids(build_messages(problem.text, "math"))
        for j, reward in enumerate(group_rewards):
            y = fmt.tokenizer(f"answer {j} is \\boxed{{{j}}}", add_special_tokens=False)["input_ids"]
            samples.append(RolloutSample(prompt, y + [fmt.end_of_turn_id], reward, "stop", problem.id, group))
    return samples


def _context(fmt: ChatFormat, **batch) -> BatchContext:
    return BatchContext(fmt, BatchConfig(**batch), pad_id=0, prompt=PromptConfig(), valid_vocab_size=100)


def test_sdft_teacher_reads_the_demonstration_prompt_then_the_same_response(tokenizer) -> None:
    fmt, problems = ChatFormat(tokenizer), _problems()
    samples = _samples(fmt, problems, [[1.0, 0.0], [0.0, 0.0]])
    batch = SDFT(_context(fmt), DistillLossConfig()).build_batch(samples, problems)
    for b, sample in enumerate(samples):
        problem = problems[sample.group]
        text = SDFT_TEMPLATE.format(problem=problem.text, solution=problem.solution)
        teacher_prompt = fmt.prompt_ids(build_messages(text, "math"))
        y = sample.response_ids
        n = int(batch.loss_mask[b].sum())
        assert n == len(y)
        assert batch.teacher_tokens[b, : len(teacher_prompt) + n].tolist() == teacher_prompt + y
        assert batch.student_tokens[b, : len(sample.prompt_ids) + n].tolist() == sample.prompt_ids + y
        assert "This is an example for a response" in tokenizer.decode(teacher_prompt)
        assert problem.solution.split(".")[0] in tokenizer.decode(teacher_prompt)
        for j in range(n):  # both models predict the j-th response token from the position before it
            assert batch.targets[b, j] == y[j]
            assert batch.student_tokens[b, batch.student_index[b, j] + 1] == y[j]
            assert batch.teacher_tokens[b, batch.teacher_index[b, j] + 1] == y[j]


def test_sdft_cuts_the_response_for_the_teacher_budget(tokenizer) -> None:
    fmt, problems = ChatFormat(tokenizer), _problems()
    samples = _samples(fmt, problems, [[1.0], [1.0]])
    text = SDFT_TEMPLATE.format(problem=problems[0].text, solution=problems[0].solution)
    budget = len(fmt.prompt_ids(build_messages(text, "math"))) + 3
    batch = SDFT(_context(fmt, teacher_budget=budget), DistillLossConfig()).build_batch(samples, problems)
    assert int(batch.loss_mask[0].sum()) == 3 and bool(batch.truncated[0])


def test_sdft_template_needs_both_fields() -> None:
    with pytest.raises(ConfigError, match="solution"):
        SDFTConfig(template="{problem} only")


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_grpo_batch_has_group_advantages_and_the_reference_reads_the_student_sequence(
    tokenizer, kl_coef
) -> None:
    fmt, problems = ChatFormat(tokenizer), _problems()
    samples = _samples(fmt, problems, [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    config = GRPOConfig()
    config.loss = type(config.loss)(kl_coef=kl_coef)
    grpo = GRPO(_context(fmt), config)
    batch = grpo.build_batch(samples, problems)
    first = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    want = (first - first.mean()) / (first.std() + 1e-6)
    torch.testing.assert_close(batch.advantages[:3].double(), want, rtol=1e-6, atol=1e-6)
    assert batch.advantages[3:].abs().max() == 0  # an all-correct group carries no gradient
    assert grpo.batch_metrics(batch) == {"groups": 2.0, "zero_advantage_groups": 1.0}
    if kl_coef:
        assert torch.equal(batch.teacher_tokens, batch.student_tokens)
        assert torch.equal(batch.teacher_index, batch.student_index)
    else:
        assert batch.teacher_tokens is None and not grpo.uses_frozen_model


def test_rft_keeps_exactly_the_verified_samples_once() -> None:
    records = [
        {"problem_id": "a", "index": 0, "y": "x = 5", "y_ids": [1], "messages": [], "reward": 1.0},
        {"problem_id": "a", "index": 1, "y": "x = 5 ", "y_ids": [1, 2], "messages": [], "reward": 1.0},
        {"problem_id": "a", "index": 2, "y": "x = 4", "y_ids": [3], "messages": [], "reward": 0.0},
        {"problem_id": "b", "index": 0, "y": "x = 5", "y_ids": [1], "messages": [], "reward": 1.0},
    ]
    kept = filter_samples(records)
    assert [(r["problem_id"], r["y"]) for r in kept] == [("a", "x = 5"), ("b", "x = 5")]
    assert all(r["stage"] == "response" for r in kept)


def test_rft_collection_keeps_every_correct_initial_response_and_nothing_else(tiny_hf_models) -> None:
    from test_srt_collect import ScriptedEngine, ScriptedGrader
    from transformers import AutoTokenizer

    from megatron_sdzero.data.formatting import ControlPhrases
    from megatron_sdzero.rollout.base import SamplingParams
    from megatron_sdzero.srt.collector import CollectConfig, Collector

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_hf_models["qwen3_tied"]))
    engine, grader = ScriptedEngine(tokenizer), ScriptedGrader()
    collector = Collector(
        engine, grader, ChatFormat(tokenizer), ControlPhrases("c", "w"), SamplingParams(max_tokens=8),
        CollectConfig(num_responses=4, revise=False), PromptConfig(), max_model_len=512,
    )  # fmt: skip
    problems = [Problem(f"q{i}", "math", f"What is {i} + 1?", answer=str(i + 1)) for i in range(6)]
    out = collector.run_batch(problems)
    attempts = [a for a in out.attempts if a["kind"] == "init"]
    assert len(attempts) == 24 and out.counters.init_attempts == 24
    correct = [a for a in attempts if a["reward"] > 0.5]
    assert len(out.tuples) == len(correct) == out.counters.tuples_kept > 0
    assert sorted(t["y"] for t in out.tuples) == sorted(a["text"] for a in correct)
    assert len(engine.requests) == 6  # no revision was sampled


# --- the loops on the tiny CPU model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(tiny_hf_models, tmp_path_factory) -> Path:
    return hf_to_mcore(tiny_hf_models["qwen3_tied"], tmp_path_factory.mktemp("algorithms") / "base")


def _recipe(base: Path, run_dir: Path, algorithm: str, **sections) -> dict:
    values = {
        "algorithm": algorithm,
        "student": {
            "checkpoint": str(base), "family": "qwen3",
            "model": {"params_dtype": "float32", "transformer_impl": "local"},
        },
        "problems": {"arithmetic": {"n": 12, "seed": 0}},
        "rollout": {"engine": "hf", "max_model_len": 512, "threads": 1, "batch_size": 8},
        "sampling": {"n": 2, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8},
        "reward": {"math": {"num_workers": 1}},
        "batch": {"student_max_tokens": 256, "teacher_budget": 512},
        "train": {
            "lr": 1e-3, "min_lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
            "micro_batch_size": 2, "global_batch_size": 4, "train_iters": 4, "epochs": None,
        },
        "refresh": {"mode": "memory", "probe": {"num_tokens": 4, "atol": 1e-4}},
        "checkpoint": {"save": str(run_dir), "interval": 1, "keep_last": None},
        "logging": {"progress": False, "tensorboard_dir": None, "token_samples_interval": 1},
        "budget": {"max_samples": 12},  # 3 steps of 4 samples: the run stops before step 4
        "schedule": {"seed": 0, "keep_best": 1},
    }  # fmt: skip
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return values


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["iteration"]: record for record in lines}  # a redone step's last record


def _command(algorithm: str, recipe: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_sdzero.cli", algorithm, "--config", str(recipe)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(algorithm: str, recipe: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        _command(algorithm, recipe), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _kill_after_steps(algorithm: str, recipe: Path, run_dir: Path, steps: int, extra_s: float) -> None:
    """SIGKILL the whole run once ``steps`` metrics lines exist, ``extra_s`` later (a random point)."""
    process = subprocess.Popen(
        _command(algorithm, recipe), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            time.sleep(extra_s)
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "sdft"])
def test_the_loop_stops_at_its_budget_and_a_sigkilled_run_resumes_to_the_same_metrics(
    algorithm: str, base_model: Path, tmp_path: Path
) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    extra = {
        "grpo": {"grpo": {"loss": {"kl_coef": 0.05}}},
        "sdft": {"teacher": {"sync": "ema", "sync_interval": 1}},
    }
    for run_dir in (whole, killed):
        (tmp_path / f"{run_dir.name}.yaml").write_text(
            yaml.safe_dump(_recipe(base_model, run_dir, algorithm, **extra[algorithm]))
        )
    done = _run(algorithm, tmp_path / "whole.yaml")
    metrics = _metrics(whole)
    assert sorted(metrics) == [1, 2, 3], done.stdout[-2000:]  # train_iters 4, but the budget pays for 3
    assert "sample budget is spent" in done.stdout + done.stderr
    budget = json.loads((whole / "budget.json").read_text())
    assert budget["samples_generated"] == 12 and budget["total_samples"] == 12 and budget["steps"] == 3
    assert budget["questions"] == 12 and budget["algorithm"] == algorithm
    assert budget["training_tokens"] == sum(m["num_target_tokens"] for m in metrics.values()) > 0
    assert all(budget["gpu_seconds"][phase] > 0 for phase in ("generation", "train", "refresh"))
    loss_name = {"grpo": "pg_loss", "sdft": "kl"}[algorithm]
    for record in metrics.values():
        assert not record["skipped"] and record["refresh_probe_max_diff"] < 1e-4
        assert loss_name in record and record["samples_generated_total"] == 4 * record["iteration"]
    if algorithm == "grpo":
        assert all("zero_advantage_groups" in r and 0 <= r["clip_fraction"] <= 1 for r in metrics.values())
        assert all(abs(r["ratio_mean"] - 1.0) < 1e-5 for r in metrics.values())  # one update per rollout
    else:
        assert len({round(r["kl"], 7) for r in metrics.values()}) == 3
    samples = [json.loads(line) for line in (whole / "token_samples.jsonl").read_text().splitlines()]
    assert samples and all(len(s["tokens"]) == len(s["values"]) > 0 for s in samples)

    rng = random.Random()
    _kill_after_steps(algorithm, tmp_path / "killed.yaml", killed, rng.randint(1, 2), rng.uniform(0.0, 1.5))
    _run(algorithm, tmp_path / "killed.yaml")
    resumed = _metrics(killed)
    assert sorted(resumed) == [1, 2, 3]
    for step in (1, 2, 3):
        for name in (loss_name, "grad_norm", "reward_mean", "response_length_mean", "num_target_tokens"):
            assert resumed[step][name] == metrics[step][name], (step, name)
    assert json.loads((killed / "budget.json").read_text())["samples_generated"] == 12


def _refused_before_any_model(values: dict, match: str, monkeypatch) -> None:
    from megatron_sdzero.distill.loop import distill

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the refusal")

    monkeypatch.setattr("megatron_sdzero.training.setup.setup_trainable", no_model)
    monkeypatch.setattr("megatron_sdzero.runtime.distributed.init_model_parallel", no_model)
    with pytest.raises(ConfigError, match=match) as err:
        distill(from_dict(DistillConfig, values))
    assert "\n" not in str(err.value)


def test_bad_input_is_refused_in_one_line_before_any_model(
    base_model: Path, tmp_path: Path, monkeypatch
) -> None:
    with pytest.raises(ConfigError, match="at least 2") as err:
        from_dict(DistillConfig, _recipe(base_model, tmp_path / "r", "grpo", sampling={"n": 1}))
    assert "\n" not in str(err.value)
    rows = tmp_path / "no_solutions.jsonl"
    rows.write_text(
        "".join(json.dumps({"problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(8))
    )
    values = _recipe(base_model, tmp_path / "r", "sdft", problems={"path": str(rows)})
    values["problems"] = {"path": str(rows)}
    _refused_before_any_model(values, "reference solution", monkeypatch)
    values = _recipe(base_model, tmp_path / "r", "grpo", budget={"max_samples": 3})
    _refused_before_any_model(values, "smaller than one step", monkeypatch)
    values = _recipe(base_model, tmp_path / "r", "sdzero", budget={"max_questions": 1})
    _refused_before_any_model(values, "max_questions", monkeypatch)


def test_the_algorithm_commands_and_dry_run(base_model: Path, tmp_path: Path, capsys) -> None:
    from megatron_sdzero.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(base_model, tmp_path / "run", "sdzero")))
    assert main(["grpo", "--config", str(recipe), "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["algorithm"] == "grpo" and resolved["grpo"]["loss"]["clip_eps_low"] == 0.2
    template = "Question {problem} then {solution}"
    assert main(["sdft", "--config", str(recipe), "--dry-run", f"sdft.template={template}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["sdft"]["template"] == template


class ArithmeticEngine:
    """Answers difficulty-1 arithmetic prompts; right when a seeded coin says so (about half the time)."""

    def __init__(self, tokenizer) -> None:
        import re

        self.tokenizer, self.pattern = tokenizer, re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
        self.eot = ChatFormat(tokenizer).end_of_turn_id
        self.sampled = 0

    def generate(self, prompts, params):
        from megatron_sdzero.rollout.base import Completion, mix_seed, per_prompt

        outputs = []
        for prompt, p in zip(prompts, per_prompt(prompts, params), strict=True):
            a, op, b = self.pattern.search(self.tokenizer.decode(prompt)).groups()
            right = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            group = []
            for j in range(p.n):
                value = right if mix_seed(p.seed, j) % 2 else right + 1
                text = f"{a} {op} {b} = {value}. The answer is \\boxed{{{value}}}."
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eot]
                group.append(Completion(ids, text, "stop"))
            self.sampled += p.n
            outputs.append(group)
        return outputs

    def close(self) -> None:
        pass


def test_rft_collects_within_its_budget_and_trains_on_the_kept_samples(
    tiny_hf_models, base_model: Path, tmp_path: Path
) -> None:
    from megatron_sdzero.algorithms.rft import DATA_FILE

    values = {
        "model": {"path": str(tiny_hf_models["qwen3_tied"]), "family": "qwen3"},
        "problems": {"arithmetic": {"n": 20, "seed": 3}},
        "output_dir": str(tmp_path / "rft"),
        "sampling": {"n": 3, "max_tokens": 16},
        "reward": {"math": {"num_workers": 1}},
        "collect": {"batch_size": 4, "progress": False},
        "budget": {"max_samples": 20},  # 6 questions x 3 samples fit, a 7th would not
        "sft": {
            "init": str(base_model),
            "model": {"params_dtype": "float32", "transformer_impl": "local"},
            "data": {"seq_length": 128},
            "train": {"micro_batch_size": 2, "global_batch_size": 2, "epochs": 1, "lr": 1e-4},
            "logging": {"progress": False, "tensorboard_dir": None},
        },
    }  # fmt: skip
    from megatron_sdzero.runtime.launch import run_on_ranks

    record = run_on_ranks(_rft_rank, 1, values, timeout_s=600)[0]
    assert record["questions"] == 6 and record["samples_generated"] == 18
    kept = [json.loads(line) for line in (tmp_path / "rft" / DATA_FILE).read_text().splitlines()]
    attempts = [
        json.loads(line)
        for line in (tmp_path / "rft" / "collect" / "attempts.jsonl").read_text().splitlines()
    ]
    correct = {(a["problem_id"], a["text"]) for a in attempts if a["reward"] > 0.5}
    assert {(r["problem_id"], r["y"]) for r in kept} == correct and record["samples_trained"] == len(kept) > 0
    assert record["training_tokens"] > 0 and record["steps"] == len(kept) // 2
    assert (tmp_path / "rft" / "sft" / "stage1" / "sft_finished.json").is_file()


def _rft_rank(values: dict) -> dict:
    from transformers import AutoTokenizer

    from megatron_sdzero.algorithms.rft import RFTConfig, run_rft

    config = from_dict(RFTConfig, values)
    engine = ArithmeticEngine(AutoTokenizer.from_pretrained(values["model"]["path"]))
    return run_rft(config, engine)


@pytest.mark.parametrize(
    "name, algorithm, samples_per_step",
    [
        ("grpo_qwen3_4b_math", "grpo", 128),
        ("sdft_qwen3_4b_math", "sdft", 128),
        ("grpo_smollm2_gpu", "grpo", 64),
    ],
)
def test_the_baseline_recipes_share_sd_zero_s_sample_budget(
    name: str, algorithm: str, samples_per_step: int
) -> None:
    from megatron_sdzero.config import load_config

    config = load_config(DistillConfig, str(ROOT / "examples" / f"{name}.yaml"), [])
    sdzero = load_config(DistillConfig, str(ROOT / "examples" / "distill_qwen3_4b_math.yaml"), [])
    assert config.algorithm == algorithm and config.samples_per_step == samples_per_step
    if name.endswith("qwen3_4b_math"):
        assert config.samples_per_step == sdzero.samples_per_step  # the same samples per step as SD-Zero
        assert config.budget.max_samples == sdzero.train.train_iters * sdzero.samples_per_step
        assert config.problems == sdzero.problems and config.eval.problems == sdzero.eval.problems
    if algorithm == "grpo":
        assert config.sampling.n >= 2 and config.grpo.loss.kl_coef == 0.04


def test_the_rft_recipe_spends_the_same_budget() -> None:
    from megatron_sdzero.algorithms.rft import RFTConfig
    from megatron_sdzero.config import load_config

    config = load_config(RFTConfig, str(ROOT / "examples" / "rft_qwen3_4b_math.yaml"), [])
    assert config.budget.max_samples == 128000 and config.sampling.n == 4
