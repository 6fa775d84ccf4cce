#!/usr/bin/env bash
# README set-up command (2): install into .venv and run the test suite (benchmark and parity tests deselected by
# pyproject addopts). The tests run in parallel (pytest-xdist), one worker per core up to 4, one thread each;
# TEXTSEG_TEST_WORKERS=0 runs them in this process (pytest's own -n given after it wins as well).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
workers=${TEXTSEG_TEST_WORKERS:-$(.venv/bin/python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$workers" -gt 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec .venv/bin/python -m pytest -n "$workers" --dist worksteal "$@"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest "$@"
