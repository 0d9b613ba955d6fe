#!/usr/bin/env bash
# Create .venv (if missing) and install alignloop into it, torch first so that pip never swaps in
# another build: on a machine with a local CPU wheel, `torch==2.13.0` takes it; elsewhere set
# TORCH_SPEC / TORCH_INDEX_URL (e.g. the CPU or CUDA index of your choice).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else
    .venv/bin/pip install -q "$TORCH_SPEC"
  fi
fi
.venv/bin/pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
