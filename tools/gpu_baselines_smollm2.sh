#!/usr/bin/env bash
# The four algorithms on SmolLM2-135M-Instruct with vLLM on ONE GPU (issue 13): SD-Zero Phase 2, SDFT,
# GRPO, RFT, each 10 steps / 640 generated samples from the same base model, in-memory refresh, then a
# markdown table of the step-time split and the budgets (tools/summarize_distill.py).
#
#   bash tools/gpu_baselines_smollm2.sh setup SmolLM2-135M-Instruct.Q4_1.gguf   # HF model + Megatron bf16
#   bash tools/gpu_baselines_smollm2.sh sdzero sdft grpo rft summary
#
# SD-Zero runs from the base conversion here (student.start_is_srt=false: the machinery, not the
# method; tools/gpu_e2e_smollm2.sh trains the SRT model first). Each run is resumable: rerunning a
# phase continues it. With OUT set, each phase's log and the run's metrics.jsonl / budget.json go to
# $OUT (as one tar file per phase, to stay within few files). Environment: PYTHON (python3), E2E_WORK
# (outputs), BASELINE_OVERRIDES (key=value words appended to every run).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
WORK=${E2E_WORK:-outputs}
MCORE=$WORK/models/smollm2_135m_mcore
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0} CUDA_DEVICE_MAX_CONNECTIONS=1
read -ra EXTRA <<<"${BASELINE_OVERRIDES:-}"

log() {
  echo "[baselines] $*"
}

run_dir() {  # run_dir ALGORITHM
  case $1 in
    sdzero) echo "$WORK/distill/smollm2_gpu_base_memory" ;;
    rft) echo "$WORK/rft/smollm2_gpu" ;;
    *) echo "$WORK/$1/smollm2_gpu" ;;
  esac
}

torchrun1() {
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m megatron_sdzero.cli "$@"
}

run_algorithm() {  # run_algorithm ALGORITHM
  local algorithm=$1 dir
  dir=$(run_dir "$algorithm")
  case $algorithm in
    sdzero)
      torchrun1 distill --config examples/distill_smollm2_gpu.yaml "student.checkpoint=$MCORE" \
        student.start_is_srt=false train.train_iters=10 refresh.mode=memory eval.problems=null \
        rollout.enforce_eager=true budget.max_samples=640 "checkpoint.save=$dir" "${EXTRA[@]}" ;;
    sdft | grpo)
      torchrun1 "$algorithm" --config "examples/${algorithm}_smollm2_gpu.yaml" "student.checkpoint=$MCORE" \
        "checkpoint.save=$dir" "${EXTRA[@]}" ;;
    rft)
      # One process, not torchrun: vLLM's engine core runs in its own process while collecting (under
      # torchrun's environment an in-process engine waits for a process group that never forms),
      # then the SFT stage initialises its own single-rank group.
      VLLM_ENABLE_V1_MULTIPROCESSING=1 "$PYTHON" -m megatron_sdzero.cli rft --config examples/rft_smollm2_gpu.yaml \
        "sft.init=$MCORE" "output_dir=$dir" "${EXTRA[@]}" ;;
  esac
}

keep() {  # keep PHASE DIR...: the phase's log and its runs' small files into $OUT/PHASE.tar
  local phase=$1
  shift
  [[ -n ${OUT:-} ]] || return 0
  local -a files=()
  local dir name
  for dir in "$@"; do
    for name in metrics.jsonl budget.json token_samples.jsonl sft/stage1/metrics.jsonl rft.jsonl; do
      [[ -f $dir/$name ]] && files+=("$dir/$name")
    done
  done
  [[ -f $OUT/$phase.log ]] && files+=("$OUT/$phase.log")
  tar -cf "$OUT/$phase.tar" "${files[@]}"
  rm -f "$OUT/$phase.log"
}

phase() {  # phase NAME ARG...: run do_NAME ARG..., its output teed to $OUT/NAME.log
  local name=$1 began=$SECONDS status=0
  shift
  log "$name: started $(date -u '+%F %T') UTC"
  set +e
  if [[ -n ${OUT:-} ]]; then
    (set -e; "do_$name" "$@") 2>&1 | tee -a "$OUT/$name.log"
    status=${PIPESTATUS[0]}
  else
    (set -e; "do_$name" "$@")
    status=$?
  fi
  set -e
  log "$name: $((SECONDS - began)) s wall, exit status $status"
  return "$status"
}

do_sdzero() { run_algorithm sdzero; }
do_sdft() { run_algorithm sdft; }
do_grpo() { run_algorithm grpo; }
do_rft() { run_algorithm rft; }

do_setup() {
  bash tools/gpu_e2e_smollm2.sh setup "$@"
}

do_summary() {
  "$PYTHON" tools/summarize_distill.py --run "sdzero=$(run_dir sdzero)" --run "sdft=$(run_dir sdft)" \
    --run "grpo=$(run_dir grpo)" --budget "rft=$(run_dir rft)" | tee "${OUT:-/tmp}/baselines.md"
}

main() {
  local -a phases=() gguf=()
  local arg status=0
  for arg in "$@"; do
    case $arg in
      *.gguf) gguf=("$arg") ;;
      setup | sdzero | sdft | grpo | rft | summary) phases+=("$arg") ;;
      *) echo "usage: bash tools/gpu_baselines_smollm2.sh {setup GGUF|sdzero|sdft|grpo|rft|summary}..." >&2; exit 2 ;;
    esac
  done
  [[ -n ${OUT:-} ]] && mkdir -p "$OUT"
  for arg in "${phases[@]}"; do
    case $arg in
      setup) phase setup "${gguf[@]}" || status=$? ;;
      summary) phase summary || status=$? ;;
      *)
        phase "$arg" || status=$?
        keep "$arg" "$(run_dir "$arg")" ;;
    esac
    [[ $status -eq 0 ]] || { log "$arg failed (exit status $status)"; exit "$status"; }
  done
}

main "$@"
