"""The Phase 1 recipes resolve, and the sbatch script wires shards, tensor parallelism and the merge."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_sdzero.config import load_config
from megatron_sdzero.srt.collect import main as collect_main
from megatron_sdzero.srt.config import SRTConfig
from megatron_sdzero.srt.prepare import main as prepare_main
from megatron_sdzero.srt.store import CollectionStore, Counters

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples").glob("srt_*.yaml"))
SBATCH = ROOT / "slurm" / "srt_collect.sbatch"
PAPER_SCALE = {"srt_qwen3_4b_math.yaml", "srt_olmo3_7b_math.yaml", "srt_qwen3_4b_code.yaml"}


def test_the_four_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {
        "srt_qwen3_4b_math.yaml",
        "srt_olmo3_7b_math.yaml",
        "srt_qwen3_4b_code.yaml",
        "srt_tiny_cpu.yaml",
    } <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_resolves_for_both_commands(recipe: Path, capsys) -> None:
    assert collect_main(["--config", str(recipe), "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert prepare_main(["--config", str(recipe), "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == resolved
    config = load_config(SRTConfig, recipe)
    assert config.reward.mode == config.problems.mode
    if recipe.name in PAPER_SCALE:  # the paper's models carry the reference defaults
        s, c = config.sampling, config.collect
        assert (s.temperature, s.top_p, s.max_tokens) == (1.0, 0.9, 16384)
        assert (config.rollout.engine, config.rollout.max_model_len, config.rollout.seed) == (
            "vllm",
            32768,
            0,
        )
        assert (c.batch_size, c.num_responses, c.num_revisions, c.target, c.seed) == (64, 3, 3, 6000, 0)
        assert not c.revise_correct
        assert (config.prepare.split.stage2_size, config.prepare.split.stage1_size) == (1000, 4000)


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)"
)
def test_sbatch_script_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _fake_bin(tmp_path: Path) -> Path:
    """sdzero and sbatch stand-ins that record their arguments (one JSON list per line)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("sdzero", "sbatch"):
        tool = bin_dir / name
        tool.write_text(
            f"#!{sys.executable}\nimport json, sys\n"
            "import os\n"
            "extra = ['CUDA_VISIBLE_DEVICES=' + os.environ['CUDA_VISIBLE_DEVICES']] "
            "if 'CUDA_VISIBLE_DEVICES' in os.environ else []\n"
            f"log = open({str(tmp_path / name)!r} + '.calls', 'a')\n"
            "log.write(json.dumps(sys.argv[1:] + extra) + '\\n')\n"
        )
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _calls(tmp_path: Path, name: str) -> list[list[str]]:
    path = tmp_path / f"{name}.calls"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run_script(tmp_path: Path, args: list[str], **env: str) -> None:
    environment = {
        **os.environ,
        "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}",
        "SDZERO_PYTHON": sys.executable,
        "SLURM_SUBMIT_DIR": str(ROOT),
        **env,
    }
    result = subprocess.run(
        ["bash", str(SBATCH), *args], cwd=tmp_path, env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_array_tasks_run_one_engine_per_gpu_each_on_its_own_shard(tmp_path: Path) -> None:
    recipe = str(ROOT / "examples" / "srt_qwen3_4b_math.yaml")
    out = tmp_path / "out"
    slurm = {
        "SLURM_ARRAY_TASK_COUNT": "3",
        "SLURM_ARRAY_TASK_MIN": "4",
        "SLURM_ARRAY_JOB_ID": "77",
        "SLURM_GPUS_ON_NODE": "8",
        "CUDA_VISIBLE_DEVICES": "8,9,10,11,12,13,14,15",  # what Slurm hands the task
    }
    _run_script(tmp_path, [recipe, f"collect.output_dir={out}"], SLURM_ARRAY_TASK_ID="5", **slurm)
    calls = _calls(tmp_path, "sdzero")
    assert len(calls) == 8  # one engine per GPU, 3 tasks x 8 = 24 shards, task 1 holds 8..15
    by_shard = {next(a for a in c if a.startswith("collect.shard_index=")): c for c in calls}
    assert sorted(by_shard) == sorted(f"collect.shard_index={i}" for i in range(8, 16))
    for index in range(8, 16):
        collect = by_shard[f"collect.shard_index={index}"]
        assert collect[:3] == ["srt-collect", "--config", recipe]
        for override in (
            "collect.num_shards=24",
            "collect.target=250",  # ceil(6000 / 24)
            f"collect.output_dir={out}/shard_{index}_of_24",
            "rollout.tensor_parallel_size=1",
            "rollout.engine=vllm",
        ):
            assert override in collect
        assert collect.index(f"collect.output_dir={out}/shard_{index}_of_24") > collect.index(
            f"collect.output_dir={out}"
        )
        engine = index - 8
        assert f"CUDA_VISIBLE_DEVICES={8 + engine}" in collect  # the engine's own GPU of the task's
    assert _calls(tmp_path, "sbatch") == []  # only the first task submits the merge

    (tmp_path / "sdzero.calls").unlink()
    _run_script(
        tmp_path, [recipe, f"collect.output_dir={out}"], SLURM_ARRAY_TASK_ID="4", SDZERO_TP="2", **slurm
    )
    calls = _calls(tmp_path, "sdzero")
    assert len(calls) == 4 and all("rollout.tensor_parallel_size=2" in c for c in calls)
    devices = {next(a for a in c if a.startswith("CUDA_VISIBLE_DEVICES=")) for c in calls}
    assert devices == {f"CUDA_VISIBLE_DEVICES={a},{a + 1}" for a in (8, 10, 12, 14)}
    (submit,) = _calls(tmp_path, "sbatch")
    assert "--dependency=afterany:77" in submit
    wrap = next(a for a in submit if a.startswith("--wrap="))
    assert f"{SBATCH} --merge 12 {recipe} collect.output_dir={out}" in wrap


def test_tp_that_does_not_divide_the_gpus_is_refused(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}",
        "SDZERO_PYTHON": sys.executable,
    }
    recipe = str(ROOT / "examples" / "srt_qwen3_4b_math.yaml")
    done = subprocess.run(
        ["bash", str(SBATCH), recipe],
        cwd=tmp_path,
        env={**env, "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_GPUS_ON_NODE": "8", "SDZERO_TP": "3"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "SDZERO_TP=3 does not divide the node's 8 GPUs" in done.stderr
    assert _calls(tmp_path, "sdzero") == []


def _shard(directory: Path, index: int, count: int) -> None:
    store = CollectionStore.open(directory, {"collect": {"num_shards": 2, "shard_index": index}})
    records = [
        {"problem_id": f"p{index}-{k}", "init_index": 0, "revision_index": 0, "y_revised": "ok"}
        for k in range(count)
    ]
    store.commit([r["problem_id"] for r in records], records, [], Counters(problems=count, tuples_kept=count))


def test_merge_mode_merges_the_shards_and_prepares(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _shard(out / "shard_0_of_2", 0, 20)
    _shard(out / "shard_1_of_2", 1, 15)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "unused-model", "family": "qwen3"},
                "problems": {"arithmetic": {"n": 24}},
                "collect": {"target": 30, "output_dir": str(out)},
            }
        )
    )
    _run_script(tmp_path, ["--merge", "2", str(recipe)])
    summary = json.loads((out / "merged" / "summary.json").read_text())
    assert summary["tuples_kept"] == 30 and summary["problems"] == 35 and len(summary["merged_from"]) == 2
    (prepare,) = _calls(tmp_path, "sdzero")
    assert prepare[:3] == ["srt-prepare", "--config", str(recipe)]
    assert f"prepare.inputs=[{out}/merged]" in prepare and f"prepare.output_dir={out}/merged/sft" in prepare
