#!/usr/bin/env bash
# The main job: sets up the project, then runs the whole pipeline on the tiny default model, on CPU.
# (Until the pipeline lands, this prints the INT4 fake-quant report of the tiny default model.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -c "
from qat import QuantConfig, prepare, quant_error_stats
from train.models import build_model, load_preset
model = build_model(load_preset('tiny_qwen3_moe'))
print(prepare(model, QuantConfig()).summary())
for name, s in quant_error_stats(model).items():
    print(f'{name:45s} SQNR {s[\"sqnr_db\"]:.2f} dB')
"
