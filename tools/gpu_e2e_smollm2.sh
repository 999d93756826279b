#!/usr/bin/env bash
# SD-Zero end to end on SmolLM2-135M-Instruct with vLLM on ONE GPU (issue 7): Phase 1 (SRT
# collection, two-stage SFT), Phase 2 twice (disk and in-memory weight refresh), the exported
# student evaluated in vLLM, and a markdown summary of what the runs measured.
#
#   bash tools/gpu_e2e_smollm2.sh setup SmolLM2-135M-Instruct.Q4_1.gguf   # HF model + Megatron bf16
#   bash tools/gpu_e2e_smollm2.sh srt              # srt-collect + srt-prepare (examples/srt_smollm2_gpu.yaml)
#   bash tools/gpu_e2e_smollm2.sh sft              # examples/sft_smollm2_gpu.yaml
#   bash tools/gpu_e2e_smollm2.sh distill-disk     # examples/distill_smollm2_gpu.yaml
#   bash tools/gpu_e2e_smollm2.sh distill-memory   # the same with refresh.mode=memory
#   bash tools/gpu_e2e_smollm2.sh eval             # export the disk run's student, sdzero eval in vLLM
#   bash tools/gpu_e2e_smollm2.sh summarize        # tools/summarize_distill.py over both runs
#   bash tools/gpu_e2e_smollm2.sh all GGUF         # every phase above in order (several may be named)
#   E2E_NPROC=2 E2E_TP=2 bash tools/gpu_e2e_smollm2.sh setup distill-ranks GGUF
#                                                  # Phase 2 with several ranks (not part of `all`)
#
# A phase whose output is complete is skipped, so phases can run one per command under a time
# limit: sft and distill save and exit after E2E_MINUTES, and the same command resumes them. Each
# phase prints its wall seconds; with OUT set, its output goes to $OUT/<phase>.log too, and its
# metrics / summaries / eval report are copied to $OUT (also when it is skipped).
#
# Environment: PYTHON (python3); GGUF (the SmolLM2 GGUF, or an argument ending in .gguf);
# MODEL_DIR (models/smollm2-135m-instruct); E2E_WORK (outputs: where every run goes);
# E2E_MINUTES (8); CONVERT_DTYPE (bfloat16); E2E_TINY=1 (setup makes a tiny random Llama instead of
# SmolLM2: CPU checks of the script); SRT_OVERRIDES, SFT_OVERRIDES, DISTILL_OVERRIDES,
# EVAL_OVERRIDES (key=value words appended to that phase's commands, e.g.
# DISTILL_OVERRIDES="rollout.enable_sleep_mode=false"). Relative paths are taken from the
# repository root. The package need not be installed: PYTHONPATH is the repository root.
# Distillation runs as slurm/distill.sbatch runs it: torchrun, one rank, vLLM's engine core inside
# that rank (VLLM_ENABLE_V1_MULTIPROCESSING=0).
#
# distill-ranks: torchrun with E2E_NPROC ranks (2) at tensor parallelism E2E_TP (1), each
# data-parallel replica with its own engine core in its own process on its TP-rank-0 GPU (the
# multi-rank placement of rollout/vllm_engine.py); E2E_RANKS_STEPS steps (4), refresh
# E2E_RANKS_REFRESH (memory), into $WORK/distill/smollm2_gpu_ranks<N>_tp<TP>. It starts from the
# SRT model when the sft phase has finished, else from the converted base model
# (student.start_is_srt=false): this phase checks the machinery on several GPUs, not the method.
# E2E_DRY_RUN=1 only prints the configuration it would run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PYTHON=${PYTHON:-python3}
GGUF=${GGUF:-}
MODEL_DIR=${MODEL_DIR:-models/smollm2-135m-instruct}
WORK=${E2E_WORK:-outputs}
MINUTES=${E2E_MINUTES:-8}
MCORE=$WORK/models/smollm2_135m_mcore
SRT_DIR=$WORK/srt/smollm2_gpu
SFT_DIR=$WORK/sft/smollm2_gpu
DISK_RUN=$WORK/distill/smollm2_gpu
MEMORY_RUN=$WORK/distill/smollm2_gpu_memory
EXPORT_DIR=$WORK/export/smollm2_gpu_sdzero
EVAL_REPORT=$WORK/eval/smollm2_gpu/report.json
SRT_RECIPE=examples/srt_smollm2_gpu.yaml
SFT_RECIPE=examples/sft_smollm2_gpu.yaml
DISTILL_RECIPE=examples/distill_smollm2_gpu.yaml
EVAL_RECIPE=examples/eval_smollm2_gpu.yaml
PHASES=(setup srt sft distill-disk distill-memory eval summarize)
NPROC=${E2E_NPROC:-2}
TP=${E2E_TP:-1}
RANKS_RUN=$WORK/distill/smollm2_gpu_ranks${NPROC}_tp${TP}

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

read -ra SRT_EXTRA <<<"${SRT_OVERRIDES:-}"
read -ra SFT_EXTRA <<<"${SFT_OVERRIDES:-}"
read -ra DISTILL_EXTRA <<<"${DISTILL_OVERRIDES:-}"
read -ra EVAL_EXTRA <<<"${EVAL_OVERRIDES:-}"
SRT_ARGS=("model.path=$MODEL_DIR" "collect.output_dir=$SRT_DIR" collect.progress=false "${SRT_EXTRA[@]}")
SFT_ARGS=(
  "init=$MCORE" "output_dir=$SFT_DIR" "data.stage1=$SRT_DIR/sft/stage1.jsonl"
  "data.stage2=$SRT_DIR/sft/stage2.jsonl" "train.exit_duration_minutes=$MINUTES" "${SFT_EXTRA[@]}"
)

log() {
  echo "[e2e] $*"
}

die() {
  echo "[e2e] error: $*" >&2
  exit 1
}

sdzero() {
  log "\$ sdzero $*"
  "$PYTHON" -m megatron_sdzero.cli "$@"
}

keep() {  # keep FILE NAME: copy FILE to $OUT/NAME when OUT is set and FILE exists
  if [[ -n ${OUT:-} && -f $1 ]]; then
    cp "$1" "$OUT/$2"
  fi
}

distill_args() {  # distill_args RUN_DIR MODE: the overrides of one distillation run
  printf '%s\n' "student.checkpoint=$SFT_DIR/stage2" "checkpoint.save=$1" "refresh.mode=$2" \
    "${DISTILL_EXTRA[@]}"
}

ranks_args() {  # the overrides of the distill-ranks run
  if [[ -f $SFT_DIR/stage2/sft_finished.json ]]; then
    echo "student.checkpoint=$SFT_DIR/stage2"
  else
    printf '%s\n' "student.checkpoint=$MCORE" student.start_is_srt=false
  fi
  printf '%s\n' "checkpoint.save=$RANKS_RUN" "refresh.mode=${E2E_RANKS_REFRESH:-memory}" "parallel.tp=$TP" \
    "train.train_iters=${E2E_RANKS_STEPS:-4}" "${DISTILL_EXTRA[@]}"
}

distill_finished() {  # distill_finished RUN_DIR MODE: has the run made all its steps?
  local -a args
  mapfile -t args < <(distill_args "$1" "$2")
  finished_with "${args[@]}"
}

finished_with() {  # finished_with OVERRIDE...: has the distillation run they describe made all its steps?
  "$PYTHON" - "$DISTILL_RECIPE" "$@" <<'PY'
import sys

from megatron_sdzero.config import load_config
from megatron_sdzero.data.problems import load_problems
from megatron_sdzero.distill.config import DistillConfig
from megatron_sdzero.distill.rollout import total_steps
from megatron_sdzero.training.checkpoint import latest_iteration

config = load_config(DistillConfig, sys.argv[1], sys.argv[2:])
train = config.train
steps = total_steps(len(load_problems(config.problems)[0]), config.prompts_per_step, train.train_iters, train.epochs)
sys.exit(0 if latest_iteration(config.run_dir) == steps else 1)
PY
}

distill() {  # distill RUN_DIR MODE
  local -a args
  mapfile -t args < <(distill_args "$1" "$2")
  log "\$ torchrun (1 rank) sdzero distill --config $DISTILL_RECIPE ${args[*]}"
  VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0} CUDA_DEVICE_MAX_CONNECTIONS=1 \
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 \
    -m megatron_sdzero.cli distill --config "$DISTILL_RECIPE" \
    "train.exit_duration_minutes=$MINUTES" "${args[@]}"
}

distill_ranks() {
  local -a args
  mapfile -t args < <(ranks_args)
  log "\$ torchrun ($NPROC ranks) sdzero distill --config $DISTILL_RECIPE ${args[*]}"
  if [[ ${E2E_DRY_RUN:-0} == 1 ]]; then  # resolve and print the configuration only (CPU tests)
    "$PYTHON" -m megatron_sdzero.cli distill --config "$DISTILL_RECIPE" "${args[@]}" --dry-run
    return
  fi
  # VLLM_ENABLE_V1_MULTIPROCESSING is left alone: with several ranks the engine cores need their own
  # processes, and the run refuses =0 with a message saying so.
  CUDA_DEVICE_MAX_CONNECTIONS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m megatron_sdzero.cli distill --config "$DISTILL_RECIPE" "train.exit_duration_minutes=$MINUTES" "${args[@]}"
}

# --- phases: is_done_<name>, phase_<name>, keep_<name> ---------------------------------------------

is_done_setup() {
  [[ -f $MODEL_DIR/config.json && -f $MCORE/latest_checkpointed_iteration.txt ]]
}

phase_setup() {
  if [[ ! -f $MODEL_DIR/config.json ]]; then
    if [[ ${E2E_TINY:-0} == 1 ]]; then
      log "a tiny random Llama in $MODEL_DIR (E2E_TINY=1)"
      "$PYTHON" -c 'import sys; from megatron_sdzero.assets.tiny import make_tiny_model as m; m(sys.argv[1], "llama")' \
        "$MODEL_DIR"
    else
      [[ -n $GGUF ]] || die "setup needs the SmolLM2 GGUF: an argument ending in .gguf, or GGUF=PATH"
      "$PYTHON" tools/get_smollm2.py "$MODEL_DIR" --source "$GGUF"
    fi
  fi
  if [[ ! -f $MCORE/latest_checkpointed_iteration.txt ]]; then
    sdzero convert hf-to-mcore "$MODEL_DIR" "$MCORE" --dtype "${CONVERT_DTYPE:-bfloat16}" --overwrite
  fi
}

keep_setup() {
  keep "$MODEL_DIR/config.json" setup.hf_config.json
}

is_done_srt() {
  [[ -f $SRT_DIR/sft/prepare_summary.json ]]
}

phase_srt() {
  sdzero srt-collect --config "$SRT_RECIPE" "${SRT_ARGS[@]}"
  sdzero srt-prepare --config "$SRT_RECIPE" "${SRT_ARGS[@]}"
}

keep_srt() {
  keep "$SRT_DIR/summary.json" srt.summary.json
  keep "$SRT_DIR/sft/prepare_summary.json" srt.prepare_summary.json
}

is_done_sft() {
  [[ -f $SFT_DIR/stage2/sft_finished.json ]]
}

phase_sft() {
  CUDA_DEVICE_MAX_CONNECTIONS=1 sdzero sft --config "$SFT_RECIPE" "${SFT_ARGS[@]}"
}

keep_sft() {
  local stage
  for stage in 1 2; do
    keep "$SFT_DIR/stage$stage/metrics.jsonl" "sft.stage$stage.metrics.jsonl"
    keep "$SFT_DIR/stage$stage/sft_finished.json" "sft.stage$stage.finished.json"
  done
}

is_done_distill_disk() {
  distill_finished "$DISK_RUN" disk
}

phase_distill_disk() {
  distill "$DISK_RUN" disk
}

keep_distill_disk() {
  keep "$DISK_RUN/metrics.jsonl" distill-disk.metrics.jsonl
  keep "$DISK_RUN/eval_scores.json" distill-disk.eval_scores.json
}

is_done_distill_memory() {
  distill_finished "$MEMORY_RUN" memory
}

phase_distill_memory() {
  distill "$MEMORY_RUN" memory
}

keep_distill_memory() {
  keep "$MEMORY_RUN/metrics.jsonl" distill-memory.metrics.jsonl
  keep "$MEMORY_RUN/eval_scores.json" distill-memory.eval_scores.json
}

is_done_distill_ranks() {
  local -a args
  mapfile -t args < <(ranks_args)
  finished_with "${args[@]}"
}

phase_distill_ranks() {
  [[ -f $MCORE/latest_checkpointed_iteration.txt ]] || die "distill-ranks: run the setup phase first"
  distill_ranks
}

keep_distill_ranks() {
  keep "$RANKS_RUN/metrics.jsonl" "distill-ranks${NPROC}-tp${TP}.metrics.jsonl"
  keep "$RANKS_RUN/eval_scores.json" "distill-ranks${NPROC}-tp${TP}.eval_scores.json"
}

is_done_eval() {
  [[ -f $EVAL_REPORT ]]
}

phase_eval() {
  distill_finished "$DISK_RUN" disk || die "eval: the disk distillation run is not finished"
  if [[ ! -f $EXPORT_DIR/config.json ]]; then
    sdzero convert mcore-to-hf "$DISK_RUN" "$EXPORT_DIR" --overwrite
  fi
  sdzero eval --config "$EVAL_RECIPE" "model.path=$EXPORT_DIR" "output.report=$EVAL_REPORT" "${EVAL_EXTRA[@]}"
}

keep_eval() {
  keep "$EVAL_REPORT" eval.report.json
}

is_done_summarize() {
  false  # cheap: always run
}

phase_summarize() {
  local -a json=()
  if [[ -n ${OUT:-} ]]; then
    json=(--json "$OUT/summary.json")
  fi
  "$PYTHON" tools/summarize_distill.py --run "disk=$DISK_RUN" --run "memory=$MEMORY_RUN" \
    --eval "$EVAL_REPORT" "${json[@]}"
}

keep_summarize() {
  :
}

# --- driver ----------------------------------------------------------------------------------------

run_phase() {  # run_phase PHASE: skip, or run it (errexit inside, output teed) and check it finished
  local phase=$1 name=${1//-/_} began=$SECONDS status
  if "is_done_$name"; then
    log "$phase: complete, skipped"
    "keep_$name"
    return 0
  fi
  log "$phase: started $(date -u '+%F %T') UTC"
  # Not inside `||` or `if`: bash would ignore errexit in the phase's commands there.
  set +e
  if [[ -n ${OUT:-} ]]; then
    (set -e; "phase_$name") 2>&1 | tee -a "$OUT/$phase.log"
    status=${PIPESTATUS[0]}
  else
    (set -e; "phase_$name")
    status=$?
  fi
  set -e
  log "$phase: $((SECONDS - began)) s wall, exit status $status"
  "keep_$name"
  if [[ $status -ne 0 ]]; then
    die "$phase failed (exit status $status)"
  fi
  if [[ $name != summarize ]] && ! "is_done_$name"; then
    log "$phase: not complete yet (stopped after E2E_MINUTES=$MINUTES?): run the same phase again to resume"
    exit 3
  fi
}

usage() {
  echo "usage: bash tools/gpu_e2e_smollm2.sh PHASE... [SmolLM2.gguf]   PHASE: ${PHASES[*]} distill-ranks all"
}

main() {
  local -a phases=()
  local arg
  for arg in "$@"; do
    case $arg in
      *.gguf) GGUF=$arg ;;
      all) phases+=("${PHASES[@]}") ;;
      setup | srt | sft | distill-disk | distill-memory | distill-ranks | eval | summarize) phases+=("$arg") ;;
      -h | --help) usage; return 0 ;;
      *) usage >&2; die "unknown phase: $arg" ;;
    esac
  done
  if [[ ${#phases[@]} -eq 0 ]]; then
    usage >&2
    exit 2
  fi
  if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
  fi
  for arg in "${phases[@]}"; do
    run_phase "$arg"
  done
}

main "$@"
