#!/usr/bin/env bash
# README set-up command (2): install into .venv and run the test suite (benchmark and parity tests deselected by pyproject addopts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest "$@"   # benchmark and parity tests are deselected in pyproject addopts
