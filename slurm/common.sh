# shellcheck shell=bash
# Helpers for multi-node sbatch scripts: one srun task per node, each running torchrun.
#
#   source "$SDZERO_ROOT/slurm/common.sh"
#   sdzero_rendezvous            # MASTER_ADDR (first node, fail fast), MASTER_PORT (from the job id)
#   sdzero_job_dir sft           # SDZERO_JOB_DIR=logs/sft-<job>[-r<restart>], SDZERO_STOP_FILE in it
#   sdzero_trap_exit_signals     # USR1/TERM: ask the workers to save and exit, then requeue
#   sdzero_srun_torchrun -m megatron_sdzero.cli sft --config recipe.yaml ...
#   sdzero_requeue_if_asked
#
# Knobs (environment): SDZERO_GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else nvidia-smi),
# SDZERO_TORCHRUN (default torchrun), SDZERO_CONTAINER_IMAGE / SDZERO_CONTAINER_MOUNTS (pyxis),
# SDZERO_LOG_ROOT (default logs).

sdzero_die() {
  echo "error: $*" >&2
  exit 1
}

sdzero_rendezvous() {
  [[ -n ${SLURM_JOB_ID:-} ]] || sdzero_die "SLURM_JOB_ID is not set: submit with sbatch"
  [[ -n ${SLURM_JOB_NODELIST:-} ]] || sdzero_die "SLURM_JOB_NODELIST is not set"
  local hosts
  # No `| head -n 1`: under pipefail, scontrol's SIGPIPE on a long node list would abort the script.
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || sdzero_die "scontrol show hostnames failed"
  MASTER_ADDR=${hosts%%$'\n'*}
  [[ -n $MASTER_ADDR ]] || sdzero_die "no master address: 'scontrol show hostnames $SLURM_JOB_NODELIST' printed nothing"
  # Same port on every node, derived from the job id (a requeued job keeps its id and its port).
  MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
  NNODES=${SLURM_NNODES:-1}
  GPUS_PER_NODE=${SDZERO_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  if [[ -z $GPUS_PER_NODE ]]; then
    GPUS_PER_NODE=$(nvidia-smi -L | wc -l)
  fi
  [[ $GPUS_PER_NODE -ge 1 ]] || sdzero_die "no GPUs found on this node (set SDZERO_GPUS_PER_NODE)"
  export MASTER_ADDR MASTER_PORT NNODES GPUS_PER_NODE
}

sdzero_job_dir() {
  local name=$1
  local restart=${SLURM_RESTART_COUNT:-0}
  SDZERO_JOB_DIR=${SDZERO_LOG_ROOT:-logs}/${name}-${SLURM_JOB_ID}
  if [[ $restart -gt 0 ]]; then
    SDZERO_JOB_DIR+="-r${restart}"
  fi
  mkdir -p "$SDZERO_JOB_DIR"
  # Workers poll this file (training/signals.py): its existence means "save and exit now".
  SDZERO_STOP_FILE=$SDZERO_JOB_DIR/stop-requested
  rm -f "$SDZERO_STOP_FILE"
  export SDZERO_JOB_DIR SDZERO_STOP_FILE
}

SDZERO_REQUEUE=0

_sdzero_on_signal() {
  echo "$(date '+%F %T') received $1: asking the workers to save and exit" >&2
  touch "$SDZERO_STOP_FILE"
  SDZERO_REQUEUE=1
}

sdzero_trap_exit_signals() {
  # Slurm's --signal=B:USR1@N warns the batch shell before the time limit; TERM comes on preemption.
  # torchrun cannot forward USR1 and gives workers only 30 s after TERM, so the stop file does it.
  trap '_sdzero_on_signal USR1' USR1
  trap '_sdzero_on_signal TERM' TERM
}

sdzero_srun_torchrun() {
  local -a container=()
  if [[ -n ${SDZERO_CONTAINER_IMAGE:-} ]]; then
    container+=(--container-image="$SDZERO_CONTAINER_IMAGE" --container-workdir="$PWD")
    if [[ -n ${SDZERO_CONTAINER_MOUNTS:-} ]]; then
      container+=(--container-mounts="$SDZERO_CONTAINER_MOUNTS")
    fi
  fi
  # One task per node; each runs torchrun with its own node rank (SLURM_NODEID, read inside the task).
  # shellcheck disable=SC2016  # $0 / $@ / SLURM_NODEID must expand in the task, not here
  srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${container[@]}" \
    --output="$SDZERO_JOB_DIR/node%n.log" \
    bash -c 'exec "$0" --node-rank "${SLURM_NODEID:?}" "$@"' "${SDZERO_TORCHRUN:-torchrun}" \
    --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$@" &
  sdzero_wait $!
}

sdzero_wait() {  # sdzero_wait PID: the background process's exit status
  # A trapped signal interrupts `wait` (status > 128): wait again while the process runs; if it ended
  # in the meantime, one more `wait` returns its real status (127: it was the status already).
  local pid=$1 status again
  while true; do
    status=0
    wait "$pid" || status=$?
    if ((status > 128)) && kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    if ((status > 128)); then
      again=0
      wait "$pid" 2>/dev/null || again=$?
      ((again == 127)) || status=$again
    fi
    return "$status"
  done
}

sdzero_requeue_if_asked() {
  if [[ $SDZERO_REQUEUE -eq 1 ]]; then
    echo "requeueing job $SLURM_JOB_ID: it resumes from its last checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID"
  fi
}
