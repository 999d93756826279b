"""The SmolLM2 one-GPU end-to-end kit (issue 7) on CPU: its recipes resolve and chain into each
other, the driver script is shellcheck-clean and skips finished phases, the summary reads metrics."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sdzero.config import load_config
from megatron_sdzero.distill.config import DistillConfig
from megatron_sdzero.distill.loop import main as distill_main
from megatron_sdzero.eval.run import EvalConfig
from megatron_sdzero.srt.config import SRTConfig
from megatron_sdzero.training.sft import SFTConfig
from megatron_sdzero.training.sft import main as sft_main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPT = ROOT / "tools" / "gpu_e2e_smollm2.sh"


def _summarize_module():
    name = "summarize_distill"
    if name not in sys.modules:  # its dataclass looks the module up there
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _recipes() -> tuple[SRTConfig, SFTConfig, DistillConfig, EvalConfig]:
    return (
        load_config(SRTConfig, EXAMPLES / "srt_smollm2_gpu.yaml"),
        load_config(SFTConfig, EXAMPLES / "sft_smollm2_gpu.yaml"),
        load_config(DistillConfig, EXAMPLES / "distill_smollm2_gpu.yaml"),
        load_config(EvalConfig, EXAMPLES / "eval_smollm2_gpu.yaml"),
    )


def test_the_recipes_resolve_through_the_cli(capsys) -> None:
    assert sft_main(["--config", str(EXAMPLES / "sft_smollm2_gpu.yaml"), "--dry-run"]) == 0
    recipe = str(EXAMPLES / "distill_smollm2_gpu.yaml")
    memory = ["refresh.mode=memory", "checkpoint.save=outputs/distill/smollm2_gpu_memory"]
    assert distill_main(["--config", recipe, *memory, "--dry-run"]) == 0
    assert "mode: memory" in capsys.readouterr().out


def test_the_recipes_chain_into_each_other() -> None:
    srt, sft, distill, evaluation = _recipes()
    prepared = Path(srt.collect.output_dir) / "sft"
    assert Path(sft.data.stage1) == prepared / "stage1.jsonl"
    assert Path(sft.data.stage2) == prepared / "stage2.jsonl"
    assert Path(distill.student.checkpoint) == Path(sft.output_dir) / "stage2"
    assert distill.phrases == srt.phrases and distill.student.family == srt.model.family
    assert distill.eval.problems == evaluation.problems and distill.eval.sampling == evaluation.sampling
    options = distill.eval.options
    assert (options.k, options.pass_at, options.seed) == (evaluation.eval.k, evaluation.eval.pass_at, 0)


def test_the_recipes_match_the_issue() -> None:
    _, sft, distill, _ = _recipes()
    for model in (sft.model, distill.student.model):
        assert (model.params_dtype, model.transformer_impl) == ("bfloat16", "local")
    assert distill.rollout.engine == "vllm" and distill.rollout.enable_sleep_mode
    assert distill.rollout.gpu_memory_utilization <= 0.35
    assert (distill.prompts_per_step, distill.sampling.n) == (64, 1)
    assert 10 <= distill.train.train_iters <= 12 and distill.train.epochs is None
    assert (distill.teacher.sync, distill.teacher.sync_interval) == ("copy", 4)
    assert distill.eval.interval == 5
    assert distill.eval.problems.arithmetic.seed != distill.problems.arithmetic.seed
    assert distill.schedule.keep_best >= 1 and distill.checkpoint.keep_last is None
    probe = distill.refresh.probe
    assert distill.refresh.mode == "disk" and probe.on_mismatch == "warn" and 0.059 < probe.atol < 2.8


def _script_path(name: str) -> Path:
    """Where the script puts ``name`` with its default E2E_WORK (outputs)."""
    match = re.search(rf"^{name}=\$WORK/(\S+)$", SCRIPT.read_text(), re.MULTILINE)
    assert match, name
    return Path("outputs", match.group(1))


def test_the_script_writes_where_the_recipes_read() -> None:
    srt, sft, distill, evaluation = _recipes()
    assert _script_path("MCORE") == Path(sft.init)
    assert _script_path("SRT_DIR") == Path(srt.collect.output_dir)
    assert _script_path("SFT_DIR") == Path(sft.output_dir)
    assert _script_path("DISK_RUN") == Path(distill.checkpoint.save)
    assert _script_path("EXPORT_DIR") == Path(evaluation.model.path)
    assert _script_path("EVAL_REPORT") == Path(evaluation.output.report)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_script_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _script(tmp_path: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("GGUF", "E2E_TINY", "OUT")},
        "PYTHON": sys.executable,
        "E2E_WORK": str(tmp_path / "work"),
        "MODEL_DIR": str(tmp_path / "model"),
        "OUT": str(tmp_path / "out"),
        **extra_env,
    }
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True)


def test_the_script_skips_finished_phases_and_copies_their_results(tmp_path: Path) -> None:
    work = tmp_path / "work"
    for path in (
        tmp_path / "model" / "config.json",
        work / "models" / "smollm2_135m_mcore" / "latest_checkpointed_iteration.txt",
        work / "srt" / "smollm2_gpu" / "sft" / "prepare_summary.json",
        work / "sft" / "smollm2_gpu" / "stage2" / "sft_finished.json",
        work / "eval" / "smollm2_gpu" / "report.json",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    result = _script(tmp_path, "setup", "srt", "sft", "eval")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("complete, skipped") == 4
    copied = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"setup.hf_config.json", "srt.prepare_summary.json", "sft.stage2.finished.json"} <= copied
    assert "eval.report.json" in copied


@pytest.mark.parametrize("tp", [1, 2])
def test_the_ranks_phase_resolves_its_configuration(tmp_path: Path, tp: int) -> None:
    """distill-ranks without the SRT model starts from the converted base model on purpose; with
    E2E_DRY_RUN=1 it only prints the configuration, so the phase is not complete (exit 3)."""
    mcore = tmp_path / "work" / "models" / "smollm2_135m_mcore" / "latest_checkpointed_iteration.txt"
    mcore.parent.mkdir(parents=True)
    mcore.write_text("release")
    result = _script(tmp_path, "distill-ranks", E2E_DRY_RUN="1", E2E_TP=str(tp))
    assert result.returncode == 3, result.stdout + result.stderr
    for expected in (f"tp: {tp}", "start_is_srt: false", "train_iters: 4", "mode: memory",
                     f"smollm2_gpu_ranks2_tp{tp}"):  # fmt: skip
        assert expected in result.stdout, expected
    assert "not complete yet" in result.stdout


# The tiny CPU stand-ins for the GPU recipe's sizes: the HF engine, float32, short responses.
TINY_DISTILL = (
    "rollout.engine=hf rollout.threads=1 rollout.batch_size=8 rollout.max_model_len=512"
    " student.model.params_dtype=float32 sampling.max_tokens=16 eval.sampling.max_tokens=16"
    " problems.arithmetic.n=32 eval.problems.arithmetic.n=4 reward.math.num_workers=1"
    " train.micro_batch_size=4 train.global_batch_size=8 batch.student_max_tokens=256"
    " batch.teacher_budget=512 refresh.probe.atol=1e-4"
)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("ranks")
    result = _script(tmp_path, "setup", E2E_TINY="1", CONVERT_DTYPE="float32")
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path


@pytest.mark.parametrize(("tp", "refresh"), [(1, "memory"), (2, "disk")])
def test_the_ranks_phase_runs_the_loop_on_two_cpu_ranks(tiny_setup: Path, tp: int, refresh: str) -> None:
    """torchrun with 2 gloo ranks: data parallel (each rank its own engine) or TP = 2 (one engine,
    rollouts broadcast), the tiny model standing in for SmolLM2; the phase then counts as done."""
    env = {"E2E_TP": str(tp), "E2E_RANKS_REFRESH": refresh, "E2E_RANKS_STEPS": "2", "OMP_NUM_THREADS": "1"}
    result = _script(tiny_setup, "distill-ranks", DISTILL_OVERRIDES=TINY_DISTILL, **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tiny_setup / "work" / "distill" / f"smollm2_gpu_ranks2_tp{tp}"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [step["iteration"] for step in steps] == [1, 2]
    assert all(step["refresh_probe_max_diff"] < 1e-4 and step["loss_tokens"] > 0 for step in steps)
    assert (tiny_setup / "out" / f"distill-ranks2-tp{tp}.metrics.jsonl").exists()
    again = _script(tiny_setup, "distill-ranks", DISTILL_OVERRIDES=TINY_DISTILL, **env)
    assert again.returncode == 0 and "complete, skipped" in again.stdout


def test_the_script_refuses_unknown_phases_and_a_missing_gguf(tmp_path: Path) -> None:
    assert _script(tmp_path).returncode == 2
    assert "unknown phase" in _script(tmp_path, "distill").stderr
    result = _script(tmp_path, "setup")
    assert result.returncode == 1 and "GGUF" in result.stdout  # the phase's output goes to $OUT/setup.log too


def _metrics(run: Path, records: list[dict]) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_summary_averages_the_steps_after_the_first(tmp_path: Path) -> None:
    step = lambda i, refresh, probe: {
        "iteration": i, "seconds": 10.0 * i, "time_refresh_s": refresh, "refresh_probe_max_diff": probe,
        "kl": 0.5, "reward_mean": 0.1 * i,
    }  # fmt: skip
    # step 2 logged twice (a resumed run appends): the last record counts
    records = [step(1, 9.0, 0.2), step(2, 5.0, 0.01), step(2, 1.0, 0.05), step(3, 3.0, 0.03)]
    _metrics(tmp_path / "disk", records)
    (tmp_path / "disk" / "eval_scores.json").write_text(json.dumps({"0": 0.25, "3": 0.5}))
    text, data = _summarize_module().summarize({"disk": tmp_path / "disk", "memory": tmp_path / "none"}, None)
    disk = data["runs"]["disk"]
    assert disk["time_refresh_s (mean)"] == pytest.approx(2.0)
    assert disk["step seconds, total (mean)"] == pytest.approx(25.0)
    assert disk["refresh_probe_max_diff (max over all steps)"] == pytest.approx(0.2)
    assert disk["reward_mean, last step"] == pytest.approx(0.3)
    assert data["steps"] == {"disk": 3, "memory": 0}
    assert "| steps logged | 3 | 0 |" in text and "step 0: 0.2500, step 3: 0.5000" in text
