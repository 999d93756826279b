"""slurm/compare.sbatch under the fake Slurm of test_slurm_sft.py, with a stand-in stage interpreter.

The stand-in (the recipe's ``python``) records each stage it is asked to run and works until the
job's stop file appears, like every sdzero command does; the USR1 warning must create that file,
compare must stop without marking the arm failed, the job must requeue itself, and the requeued
job must start clean (no stale stop file) and finish the same stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from test_slurm_sft import FAKE_SCONTROL, _free_job_id

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "compare.sbatch"
EVAL_RECIPE = REPO / "examples" / "experiment" / "eval_tiny_cpu.yaml"

FAKE_STAGE_PYTHON = r"""#!/usr/bin/env bash
# Stand-in for the interpreter compare starts its stages with.
set -u
echo "$*" >> "$FAKE_PY_LOG"
if [[ $2 == megatron_sdzero.experiment.compare ]]; then  # the isolated evaluation of one run
  out=$(dirname "$3")/eval
  mkdir -p "$out"
  echo '{"curve": [[0, 0.5]], "selected": {"checkpoint": "start", "step": 0}, "benchmarks": {}}' \
    > "$out/evaluation.json"
  exit 0
fi
touch "$FAKE_STARTED"
for (( i = 0; i < 1200; i++ )); do
  if [[ -e $SDZERO_STOP_FILE ]]; then echo "stage stopped on request"; exit 0; fi
  if [[ -n ${FAKE_FINISH:-} ]]; then touch "$FAKE_DONE"; exit 0; fi
  sleep 0.05
done
exit 3
"""


def _job(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "stage-python").write_text(FAKE_STAGE_PYTHON)
    for name in ("scontrol", "stage-python"):
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "out" / "c" / "arm" / "seed0"
    recipe = tmp_path / "compare.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "c", "output_dir": str(tmp_path / "out"), "max_samples": 8,
        "model": {"hf": "/models/x", "mcore": "/models/x-mcore", "family": "qwen3"},
        "eval": {"recipe": str(EVAL_RECIPE), "validation": "validation"},
        "reference_arms": ["arm"], "python": str(bin_dir / "stage-python"),
        "arms": [{"name": "arm", "algorithm": "grpo", "stages": [
            {"name": "train", "done": "{run}/done",
             "command": ["grpo", "--config", "r.yaml", "checkpoint.save={run}"]}
        ]}],
    }))  # fmt: skip
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SDZERO_PYTHON": sys.executable,
        "SLURM_JOB_ID": str(_free_job_id()),
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "node01",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SDZERO_GPUS_PER_NODE": "1",
        "SDZERO_LOG_ROOT": str(tmp_path / "logs"),
        "FAKE_REQUEUE_LOG": str(tmp_path / "requeued.txt"),
        "FAKE_PY_LOG": str(tmp_path / "stages.txt"),
        "FAKE_STARTED": str(tmp_path / "started"),
        "FAKE_DONE": str(run_dir / "done"),
    }
    return {"recipe": recipe, "env": env, "tmp": tmp_path, "run_dir": run_dir}


def _submit(job: dict, out: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(SCRIPT), str(job["recipe"])], env={**job["env"], **env}, cwd=REPO,
        stdout=out.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def test_usr1_stops_compare_requeues_and_the_requeued_job_finishes_the_stage(tmp_path: Path) -> None:
    job = _job(tmp_path)
    job_id = job["env"]["SLURM_JOB_ID"]
    first = _submit(job, tmp_path / "job.out")
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():
        assert first.poll() is None, (tmp_path / "job.out").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)
    assert first.wait(timeout=60) == 0, (tmp_path / "job.out").read_text()[-3000:]
    out = (tmp_path / "job.out").read_text()
    assert "received USR1" in out and "stopped on request" in out and "requeueing job" in out
    assert (tmp_path / "requeued.txt").read_text().split() == [job_id]
    listed = json.loads((tmp_path / "out" / "c" / "results.json").read_text())["arms"]["arm"]["runs"]
    assert [run["status"] for run in listed] == ["pending"]  # stopped, not failed

    (tmp_path / "started").unlink()
    second = _submit(job, tmp_path / "job-r1.out", SLURM_RESTART_COUNT="1", FAKE_FINISH="1")
    assert second.wait(timeout=120) == 0, (tmp_path / "job-r1.out").read_text()[-3000:]
    assert (tmp_path / "started").exists()  # the stage ran again: the stale stop file was removed first
    result = json.loads((job["run_dir"] / "result.json").read_text())
    assert result["status"] == "done" and result["selected"]["step"] == 0
    stages = (tmp_path / "stages.txt").read_text().splitlines()
    assert sum("megatron_sdzero.cli grpo --config r.yaml" in line for line in stages) == 2
    assert (tmp_path / "requeued.txt").read_text().split() == [job_id]  # a finished job does not requeue


def test_script_is_shellcheck_clean() -> None:
    import shutil

    import pytest

    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    subprocess.run(["shellcheck", "-x", str(SCRIPT)], cwd=REPO, check=True)
