#!/usr/bin/env bash
# Fresh machine -> working environment -> demo or tests.
#   bash tools/dev.sh demo      SD-Zero end to end on a tiny model (CPU, offline)
#   bash tools/dev.sh test      the CPU test suite (GPU tests are deselected)
#   bash tools/dev.sh setup     only create .venv
# Needs Python >= 3.12 (megatron-core >= 0.17 requires it): $PYTHON, python3.12, or pyenv's 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidates=("${PYTHON:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 python3)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || [ -x "$py" ] || continue
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$py"
      return 0
    fi
  done
  echo "error: Python >= 3.12 not found; set PYTHON=/path/to/python3.12" >&2
  return 1
}

setup() {
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import megatron_sdzero, megatron.core, pytest' 2>/dev/null; then
    return 0
  fi
  local py
  py=$(find_python)
  echo "creating .venv with $py ($("$py" --version))"
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
}

case "${1:-}" in
  setup) setup ;;
  demo) setup; shift; exec .venv/bin/sdzero demo "$@" ;;
  test) setup; shift; exec .venv/bin/python -m pytest -m "not gpu" "$@" ;;
  *) echo "usage: bash tools/dev.sh {demo|test|setup} [args]" >&2; exit 2 ;;
esac
