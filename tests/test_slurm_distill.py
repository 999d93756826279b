"""slurm/distill.sbatch under the fake 2-node Slurm of test_slurm_sft.py, with a stand-in torchrun.

The stand-in records how it was started and waits for the run directory's STOP file the way the
distill loop does (the loop's own reaction to STOP is tested in test_distill_loop.py): the USR1
warning must create <checkpoint.save>/STOP, the job must requeue itself with `scontrol requeue`, the
requeued job must clear the stale STOP before it starts, and the container flags must reach srun.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_slurm_sft import FAKE_SCONTROL, FAKE_SRUN, _free_job_id

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "distill.sbatch"

FAKE_TORCHRUN = r"""#!/usr/bin/env bash
# Stand-in torchrun: record the command line, then run until <run dir>/STOP (or at once with FAKE_FINISH).
set -u
echo "$*" >> "$FAKE_TORCHRUN_LOG"
touch "$FAKE_RUN_DIR/started.$2"
for (( i = 0; i < 1200; i++ )); do
  if [[ -e $FAKE_RUN_DIR/STOP ]]; then echo "exit requested (stop file) on node $2"; exit 0; fi
  if [[ -n ${FAKE_FINISH:-} ]]; then echo "finished on node $2"; exit 0; fi
  sleep 0.05
done
exit 3
"""


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = FAKE_SRUN.replace("set -u\n", 'set -u\necho "$*" >> "$FAKE_SRUN_LOG"\n', 1)
    for name, text in (("srun", srun), ("scontrol", FAKE_SCONTROL), ("torchrun", FAKE_TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.fixture
def job(tmp_path: Path) -> dict:
    run_dir = tmp_path / "run"
    recipe = tmp_path / "distill.yaml"
    values = {
        "student": {"checkpoint": str(tmp_path / "srt"), "family": "qwen3"},
        "problems": {"arithmetic": {"n": 8}, "mode": "math"},
        "checkpoint": {"save": str(run_dir)},
    }
    recipe.write_text(yaml.safe_dump(values))
    bin_dir = _fake_bin(tmp_path)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": str(_free_job_id()),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SDZERO_GPUS_PER_NODE": "1",
        "SDZERO_TORCHRUN": str(bin_dir / "torchrun"),
        "SDZERO_LOG_ROOT": str(tmp_path / "logs"),
        "SDZERO_CONTAINER_IMAGE": "nvcr.io#nvidia/pytorch:25.01-py3",
        "SDZERO_CONTAINER_MOUNTS": "/lustre:/lustre",
        "FAKE_REQUEUE_LOG": str(tmp_path / "requeued.txt"),
        "FAKE_SRUN_LOG": str(tmp_path / "srun.txt"),
        "FAKE_TORCHRUN_LOG": str(tmp_path / "torchrun.txt"),
        "FAKE_RUN_DIR": str(run_dir),
    }
    return {"recipe": recipe, "run_dir": run_dir, "env": env, "tmp": tmp_path}


def _submit(job: dict, out: Path, *overrides: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(SCRIPT), str(job["recipe"]), *overrides],
        env={**job["env"], **env},
        cwd=REPO,
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
    )


def _wait_for(path: Path, process: subprocess.Popen, out: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, out.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_usr1_stops_the_run_requeues_and_the_requeued_job_starts_clean(job) -> None:
    tmp, run_dir, job_id = job["tmp"], job["run_dir"], job["env"]["SLURM_JOB_ID"]
    first = _submit(job, tmp / "job.out", "train.lr=1e-5")
    for node in (0, 1):
        _wait_for(run_dir / f"started.{node}", first, tmp / "job.out")
    first.send_signal(signal.SIGUSR1)  # Slurm's --signal=B:USR1@300 warning to the batch shell
    assert first.wait(timeout=60) == 0, (tmp / "job.out").read_text()[-3000:]
    out = (tmp / "job.out").read_text()
    assert "received USR1" in out and "requeueing job" in out
    assert (tmp / "requeued.txt").read_text().split() == [job_id]
    assert (run_dir / "STOP").is_file()
    logs = tmp / "logs" / f"distill-{job_id}"
    assert "exit requested (stop file) on node" in (logs / "node0.log").read_text()
    assert "exit requested (stop file) on node" in (logs / "node1.log").read_text()

    torchruns = (tmp / "torchrun.txt").read_text().splitlines()
    assert sorted(re.match(r"--node-rank (\d)", line).group(1) for line in torchruns) == ["0", "1"]
    for line in torchruns:
        assert "--nnodes 2 --nproc-per-node 1 --master-addr localhost" in line
        assert (
            f"-m megatron_sdzero.cli distill --config {job['recipe']} train.lr=1e-5 logging.progress=false"
            in line
        )
    srun = (tmp / "srun.txt").read_text()
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in srun
    assert "--container-mounts=/lustre:/lustre" in srun and "--kill-on-bad-exit=1" in srun

    second = _submit(job, tmp / "job-r1.out", SLURM_RESTART_COUNT="1", FAKE_FINISH="1")
    assert second.wait(timeout=60) == 0, (tmp / "job-r1.out").read_text()[-3000:]
    rerun = tmp / "logs" / f"distill-{job_id}-r1"
    assert "finished on node 0" in (rerun / "node0.log").read_text()  # the stale STOP was removed first
    assert (tmp / "requeued.txt").read_text().split() == [job_id]  # a finished job does not requeue


def test_a_failed_run_is_not_requeued_and_its_status_is_kept(job) -> None:
    tmp = job["tmp"]
    (tmp / "bin" / "torchrun").write_text("#!/usr/bin/env bash\nexit 7\n")
    done = _submit(job, tmp / "job.out").wait(timeout=60)
    assert done == 7 and not (tmp / "requeued.txt").exists()


def test_usr1_margin_covers_a_step_and_a_checkpoint() -> None:
    text = SCRIPT.read_text()
    margin = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M).group(1))
    assert margin >= 300 and "#SBATCH --requeue" in text


def test_a_bad_recipe_fails_before_anything_starts(job) -> None:
    tmp = job["tmp"]
    job["recipe"].write_text(
        "student: {checkpoint: x}\nproblems: {arithmetic: {n: 2}}\ncheckpoint: {save: [\n"
    )
    done = subprocess.run(
        ["bash", str(SCRIPT), str(job["recipe"])], env=job["env"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode != 0 and "cannot read checkpoint.save" in done.stderr
    assert "YAML syntax error" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp / "srun.txt").exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_is_shellcheck_clean() -> None:
    done = subprocess.run(
        ["shellcheck", "-x", str(SCRIPT), str(REPO / "slurm" / "common.sh")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout
