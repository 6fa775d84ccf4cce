#!/usr/bin/env bash
# README set-up command (1): install into .venv and run the main job on the bundled synthetic data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/textseg demo --out "${1:-runs/demo}" --force
