"""``sdzero compare`` end to end on the tiny CPU model: six arms, selection, results.json, resume.

The machinery, not a result: a random tiny model is first taught the comparison's 8 training
questions (answers and revisions, a short SFT), so that RFT and Phase 1 find verified samples to
keep; then examples/experiment/compare_tiny_cpu.yaml runs base, RFT, GRPO, SDFT and SD-Zero without
and with teacher sync, and compare-report reads what it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_sdzero.experiment.compare import (
    ArmConfig,
    CompareConfig,
    CompareEval,
    StageConfig,
    StartModel,
    candidates,
    run_values,
    samples_by_step,
    substitute,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "experiment" / "compare_tiny_cpu.yaml"
ARMS = ["base", "grpo", "sdft", "rft", "sdzero_nosync", "sdzero_sync"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _sdzero(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "megatron_sdzero.cli", *args]
    return subprocess.run(command, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=900)


def _warm_records(tokenizer) -> tuple[list[dict], list[dict]]:
    """The 8 training questions: (answers, revisions of a wrong and of a right answer); the revision
    records are stage-2 records (loss on the revision only), so no wrong answer is ever a target."""
    from megatron_sdzero.data.arithmetic import make_arithmetic_problems
    from megatron_sdzero.data.formatting import FAMILY_PHRASES, build_messages, chat_format

    end_of_turn = chat_format(tokenizer).end_of_turn_id
    correct_phrase, incorrect_phrase = FAMILY_PHRASES["qwen3"]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [end_of_turn]

    answers, revisions = [], []
    for index, row in enumerate(make_arithmetic_problems(8, seed=0, difficulty=1)):
        messages, right = build_messages(row["problem"], "math"), f"The answer is \\boxed{{{row['answer']}}}."
        wrong = f"The answer is \\boxed{{{int(row['answer']) + 1}}}."
        answers.append({"stage": "response", "problem_id": f"a{index}", "mode": "math", "messages": messages,
                        "y_ids": ids(right)})  # fmt: skip
        for y_init, phrase, ok in ((wrong, incorrect_phrase, False), (right, correct_phrase, True)):
            revisions.append({
                "stage": 2, "problem_id": f"r{index}{ok}", "mode": "math", "messages": messages,
                "phrase": phrase, "init_correct": ok, "y_init": y_init, "y_init_ids": ids(y_init),
                "y_revised": right, "y_revised_ids": ids(right),
            })  # fmt: skip
    return answers, revisions


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory) -> tuple[Path, Path]:
    """(HF dir, Megatron checkpoint) of a tiny model that answers and revises the training questions."""
    from transformers import AutoTokenizer

    from megatron_sdzero.assets.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("compare_model")
    make_tiny_model(root / "hf", family="qwen3", num_layers=4, seed=0)
    assert (
        _sdzero(
            "convert", "hf-to-mcore", str(root / "hf"), str(root / "mcore"), "--dtype", "float32"
        ).returncode
        == 0
    )
    answers, revisions = _warm_records(AutoTokenizer.from_pretrained(root / "hf"))
    (root / "warm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers + revisions))
    recipe = {
        "init": str(root / "mcore"), "output_dir": str(root / "warm"), "stages": [1],
        "model": {"params_dtype": "float32", "transformer_impl": "local"},
        "data": {"stage1": str(root / "warm.jsonl"), "seq_length": 256},  # revisions: loss on y_rev only
        "train": {"lr": 5e-3, "min_lr": 5e-4, "lr_schedule": "cosine", "warmup_ratio": 0.05,
                  "micro_batch_size": 8, "global_batch_size": 8, "epochs": None,
                  "train_iters": 120, "seed": 1},
        "checkpoint": {"interval": 1000, "keep_last": 1},
        "logging": {"interval": 50, "progress": False, "tensorboard_dir": None},
    }  # fmt: skip
    (root / "warm.yaml").write_text(yaml.safe_dump(recipe))
    done = _sdzero("sft", "--config", str(root / "warm.yaml"))
    assert done.returncode == 0, done.stderr[-2000:]
    mcore = root / "warm" / "stage1"
    assert _sdzero("convert", "mcore-to-hf", str(mcore), str(root / "warm_hf")).returncode == 0
    return root / "warm_hf", mcore


def _compare(warm: tuple[Path, Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    hf, mcore = warm
    return _sdzero(
        "compare",
        "--config",
        str(RECIPE),
        f"model.hf={hf}",
        f"model.mcore={mcore}",
        f"output_dir={out}",
        *extra,
    )


@pytest.mark.slow
def test_the_whole_comparison_runs_resumes_and_renders(warm_model, tmp_path: Path) -> None:
    first = _compare(warm_model, tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:]
    results = json.loads((tmp_path / "tiny_cpu" / "results.json").read_text())
    assert list(results["arms"]) == ARMS and list(results["benchmarks"]) == ["in_dist", "harder"]
    assert results["validation"] == "validation" and results["benchmarks"]["in_dist"]["k"] == 4
    for name, arm in results["arms"].items():
        [run] = arm["runs"]
        assert run["status"] == "done", (name, run.get("error"))
        assert run["samples_used"] <= results["budget"]["max_samples"]
        steps = [point["step"] for point in run["curve"]]
        assert steps[0] == 0 and steps == sorted(set(steps)) and run["selected"]["step"] in steps
        best = max(point["validation"] for point in run["curve"])
        assert run["selected"]["validation"] == best
        assert (
            min(s for s, v in ((p["step"], p["validation"]) for p in run["curve"]) if v == best)
            == run["selected"]["step"]
        )  # the earliest of the best
        for benchmark in results["benchmarks"].values():
            assert benchmark["k"] == 4
        for scored in run["benchmarks"].values():
            assert len(scored["ids"]) == len(scored["outcomes"]) == 8
            assert all(len(row) == 4 and set(row) <= {0, 1} for row in scored["outcomes"])
        if name == "base":
            assert run["samples_used"] == 0 and steps == [0]
        else:
            assert run["samples_used"] > 0 and len(steps) >= 2, (name, steps)
    phase1 = json.loads((tmp_path / "tiny_cpu" / "shared" / "seed0" / "srt" / "summary.json").read_text())
    spent = phase1["init_attempts"] + phase1["revision_attempts"]
    assert phase1["tuples_kept"] > 0
    for name in ("sdzero_nosync", "sdzero_sync"):
        run = results["arms"][name]["runs"][0]
        assert run["curve"][0]["samples"] == spent  # step 0 is the SRT model: Phase 1 already spent
        assert run["samples_used"] == spent + 4 * run["curve"][-1]["step"]
        assert [p["step"] for p in run["evolution"]] == [p["step"] for p in run["curve"]]
        assert all(0 <= p["generation"] <= 1 and 0 <= p["revision"] <= 1 for p in run["evolution"])
    digests = {
        a["runs"][0]["questions_digest"] for n, a in results["arms"].items() if n not in ("base", "rft")
    }
    assert len(digests) == 1  # every on-policy arm trained on the same 8 questions

    again = _compare(warm_model, tmp_path)
    assert again.returncode == 0
    assert again.stdout.count("done earlier") == len(ARMS) and "train:" not in again.stdout

    report = _sdzero("compare-report", str(tmp_path / "tiny_cpu" / "results.json"))
    assert report.returncode == 0, report.stderr[-2000:]
    summary = (tmp_path / "tiny_cpu" / "summary.md").read_text()
    assert "SD-Zero (teacher sync)" in summary and "Goal" in summary
    for png in ("accuracy.png", "samples.png", "evolution.png"):
        assert (tmp_path / "tiny_cpu" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_stage_is_recorded_and_the_next_arm_still_runs(tmp_path: Path) -> None:
    from megatron_sdzero.config import load_config

    recipe = tmp_path / "compare.yaml"
    values = yaml.safe_load(RECIPE.read_text())
    values["arms"] = [
        {"name": "broken", "algorithm": "grpo", "stages": [{
            "name": "train", "done": "{run}/x",
            "command": ["grpo", "--config", str(tmp_path / "missing.yaml")],
        }]},
        {"name": "base", "algorithm": "base", "start": "{hf}"},
    ]  # fmt: skip
    values["reference_arms"] = ["base"]
    recipe.write_text(yaml.safe_dump(values))
    config = load_config(CompareConfig, recipe, [f"output_dir={tmp_path}", "model.hf=/nonexistent"])
    assert config.arms[0].name == "broken"
    done = _sdzero(
        "compare", "--config", str(recipe), f"output_dir={tmp_path}", "model.hf=/nonexistent", "only=[broken]"
    )
    assert done.returncode == 1
    assert "broken seed 0: FAILED: stage train exited with status 2" in done.stderr
    assert "missing.yaml does not exist" in done.stderr  # the stage's own last line, not only a status
    result = json.loads((tmp_path / "tiny_cpu" / "broken" / "seed0" / "result.json").read_text())
    assert result["status"] == "failed" and "missing.yaml" in result["error"]
    listed = json.loads((tmp_path / "tiny_cpu" / "results.json").read_text())["arms"]
    assert (
        listed["broken"]["runs"][0]["status"] == "failed" and listed["base"]["runs"][0]["status"] == "pending"
    )


def test_bad_recipes_are_one_line_errors(tmp_path: Path) -> None:
    for override, message in (
        ("only=[nope]", "'nope' names none of the arms"),
        ("reference_arms=[base,ghost]", "'ghost' names none of the arms"),
        ("max_samples=0", "max_samples must be >= 1"),
    ):
        done = _sdzero("compare", "--config", str(RECIPE), f"output_dir={tmp_path}", override)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_placeholders_candidates_and_samples(tmp_path: Path) -> None:
    config = CompareConfig(
        name="x", model=StartModel("/h", "/m", "qwen3"), eval=CompareEval("r", "v"),
        arms=[ArmConfig(name="a", algorithm="base")], max_samples=10, output_dir=str(tmp_path),
        reference_arms=["a"],
    )  # fmt: skip
    arm = ArmConfig(
        name="g", algorithm="grpo", stages=[StageConfig("t", ["grpo"], "d")], checkpoints="{run}/train",
        metrics="{run}/train/metrics.jsonl", budget="{run}/train/budget.json",
    )  # fmt: skip
    values = run_values(config, arm, 3)
    assert substitute("{run}|{seed}|{mcore}|{x}|problems={a: {b: 1}}", values) == (
        f"{tmp_path.resolve()}/x/g/seed3|3|/m|{{x}}|problems={{a: {{b: 1}}}}"
    )  # unknown braces stay as they are (YAML flow values in overrides)
    train = Path(values["run"]) / "train"
    for step in (4, 2):
        (train / f"iter_{step:07d}").mkdir(parents=True)
    (train / "iter_x").mkdir()
    assert candidates(arm, values) == [
        (0, "/m"),
        (2, str(train / "iter_0000002")),
        (4, str(train / "iter_0000004")),
    ]
    (train / "metrics.jsonl").write_text(
        json.dumps({"iteration": 2, "samples_generated_total": 18}) + "\n\n"
        + json.dumps({"iteration": 4, "samples_generated_total": 26}) + "\n"
    )  # fmt: skip
    (train / "budget.json").write_text(json.dumps({"prior_samples": 10, "total_samples": 26}))
    by_step, budget = samples_by_step(arm, values)
    assert by_step == {0: 10, 2: 18, 4: 26} and budget["total_samples"] == 26
