#!/usr/bin/env bash
# Sets up the project (scripts/setup.sh), lints it (ruff, configured in pyproject.toml) and runs the
# whole test suite, integration tests included, on CPU. Extra arguments go to pytest:
# `bash scripts/test.sh -m "not integration"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest "$@"
