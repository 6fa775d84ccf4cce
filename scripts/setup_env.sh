#!/usr/bin/env bash
# Create (or reuse) the project-local virtual environment .venv and install textseg into it.
# Usage: bash scripts/setup_env.sh [extras]   e.g. "test"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extras=${1:-}
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# torch 2.14.1 + torchvision 0.29.1 is the pair that imports together with open_clip on CPU machines here.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import textseg_cli, torch, torchvision, open_clip" >/dev/null
