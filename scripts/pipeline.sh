#!/usr/bin/env bash
# The main job: sets up the project (scripts/setup.sh), then runs the whole pipeline on the default
# MoE (SmolLM2-135M-Instruct, upcycled) on CPU (scripts/pipeline.py, conf/pipeline.yaml): build the
# base -> generate trajectories -> train BF16 -> QAT fine-tunes -> INT4 export + PTQ baselines ->
# evaluation -> report. Extra arguments are
# Hydra overrides: `bash scripts/pipeline.sh out_dir=outputs/p2 bf16.max_steps=200`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python scripts/pipeline.py "$@"
