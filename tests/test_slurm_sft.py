"""slurm/sft.sbatch under a fake 2-node Slurm on localhost (gloo): rendezvous, per-node ranks, the
USR1 warning -> save, exit and requeue, and the requeued job resuming to the end. Also: an empty
master address fails fast, and both scripts are shellcheck clean.

The fake `srun` starts one copy of the task per node with SLURM_NODEID/SLURM_PROCID set (honouring
--output's %n); the fake `scontrol` prints the node names and records `requeue` calls.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [REPO / "slurm" / "sft.sbatch", REPO / "slurm" / "common.sh"]

FAKE_SRUN = r"""#!/usr/bin/env bash
# Fake srun: run the command once per node of the allocation, in parallel, on this machine.
set -u
output=""
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    --output=*) output=${1#--output=} ;;
  esac
  shift
done
pids=()
for (( node = 0; node < SLURM_NNODES; node++ )); do
  log=/dev/stdout
  [[ -n $output ]] && log=${output//%n/$node}
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" > "$log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
set -u
if [[ $1 == show && $2 == hostnames ]]; then
  [[ -n ${FAKE_NO_HOSTS:-} ]] && exit 0
  for (( i = 0; i < SLURM_NNODES; i++ )); do echo localhost; done
elif [[ $1 == requeue ]]; then
  echo "$2" >> "$FAKE_REQUEUE_LOG"
fi
"""


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _free_job_id() -> int:
    """A job id whose derived port (20000 + id % 20000) is free right now."""
    from megatron_sdzero.runtime.distributed import free_port

    for _ in range(50):
        port = free_port()
        if 20000 <= port < 40000:
            return 100000 + port - 20000
    pytest.skip("no free port in 20000-39999")


def _env(tmp_path: Path, job_id: int, **extra: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{_fake_bin_path(tmp_path)}:{venv_bin}:{os.environ['PATH']}",
        "SLURM_JOB_ID": str(job_id),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SDZERO_GPUS_PER_NODE": "1",
        "SDZERO_TORCHRUN": str(Path(venv_bin) / "torchrun"),
        "SDZERO_LOG_ROOT": str(tmp_path / "logs"),
        "FAKE_REQUEUE_LOG": str(tmp_path / "requeued.txt"),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _fake_bin_path(tmp_path: Path) -> Path:
    path = tmp_path / "bin"
    return path if path.is_dir() else _fake_bin(tmp_path)


@pytest.fixture(scope="module")
def recipe(tiny_hf_models, tmp_path_factory) -> Path:
    from test_training_parallel import training_setup

    setup = training_setup(tiny_hf_models, tmp_path_factory)
    root = tmp_path_factory.mktemp("slurm")
    values = {
        "init": setup["mcore"],
        "output_dir": str(root / "run"),
        "model": {"params_dtype": "float32", "transformer_impl": "local"},
        "data": {
            "stage1": str(setup["paths"][1]),
            "stage2": str(setup["paths"][2]),
            "seq_length": 256,
            "packing": True,
        },
        "train": {
            "lr": 1e-3,
            "warmup_steps": 0,
            "micro_batch_size": 1,
            "global_batch_size": 4,
            "epochs": None,
            "train_iters": 5,
            "seed": 5,
        },
        "checkpoint": {"interval": 100},
        "logging": {"interval": 1, "progress": False},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _iterations(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]


def _sbatch(recipe: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    sink = log.open("w")
    return subprocess.Popen(
        ["bash", str(SCRIPTS[0]), str(recipe)], env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT
    )


def test_two_nodes_usr1_saves_requeues_and_the_requeued_job_finishes(recipe, tmp_path) -> None:
    run_dir = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    job_id = _free_job_id()

    first = _sbatch(recipe, _env(tmp_path, job_id), tmp_path / "job.out")
    deadline = time.monotonic() + 300
    while not _iterations(run_dir / "stage1"):
        assert first.poll() is None, (tmp_path / "job.out").read_text()[-3000:]
        assert time.monotonic() < deadline, "stage 1 did not start"
        time.sleep(0.1)
    first.send_signal(signal.SIGUSR1)  # Slurm's --signal=B:USR1@300 warning to the batch shell
    assert first.wait(timeout=300) == 0, (tmp_path / "job.out").read_text()[-3000:]
    job_out = (tmp_path / "job.out").read_text()
    assert "received USR1" in job_out and "requeueing job" in job_out
    assert (tmp_path / "requeued.txt").read_text().split() == [str(job_id)]
    job_dir = tmp_path / "logs" / f"sft-{job_id}"
    assert (job_dir / "stop-requested").is_file()
    node0, node1 = (job_dir / "node0.log").read_text(), (job_dir / "node1.log").read_text()
    assert "exit requested (stop file)" in node0 + node1
    saved = int((run_dir / "stage1" / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= saved < 5 and not (run_dir / "stage1" / "sft_finished.json").exists()

    env = _env(tmp_path, job_id, SLURM_RESTART_COUNT="1")
    second = _sbatch(recipe, env, tmp_path / "job-r1.out")
    assert second.wait(timeout=400) == 0, (tmp_path / "job-r1.out").read_text()[-3000:]
    rerun_dir = tmp_path / "logs" / f"sft-{job_id}-r1"
    rerun_logs = (rerun_dir / "node0.log").read_text() + (rerun_dir / "node1.log").read_text()
    assert f"stage 1: resumed from {run_dir / 'stage1'}/iter_{saved:07d}" in rerun_logs
    assert (run_dir / "stage2" / "sft_finished.json").is_file()
    assert _iterations(run_dir / "stage2") == [1, 2, 3, 4, 5]
    assert "SFT done" in rerun_logs


def test_empty_master_address_fails_fast(recipe, tmp_path) -> None:
    env = _env(tmp_path, _free_job_id(), FAKE_NO_HOSTS="1")
    done = subprocess.run(
        ["bash", str(SCRIPTS[0]), str(recipe)], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "no master address" in done.stderr


def test_scripts_are_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (CI installs it: apt-get install shellcheck)")
    done = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
