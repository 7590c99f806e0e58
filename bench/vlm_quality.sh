#!/usr/bin/env bash
# Held-out category accuracy of the debug VLM after each MoE-LLaVA stage, on more synthetic micrographs than
# make demo uses. Needs the debug SFT model (run `make demo` first).
#   bash bench/vlm_quality.sh [RUN_DIR=runs/quality] [N_IMAGES=3000] [LLM_STEPS=1200]
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/quality}; N=${2:-3000}; STEPS=${3:-1200}; A=$R/annotations; PY=.venv/bin/python
$PY data_prep/synth_micrographs.py --config launch/configs/debug/micrographs.yaml --out $R/micrographs --n $N | tail -1
$PY data_prep/annotate.py --teacher metadata --manifest $R/micrographs/manifest.jsonl --out $A | tail -1
D="[$A/captions.jsonl,$A/vqa.jsonl,$A/classify.jsonl,runs/demo/instructions/instructions.jsonl]"
$PY train_moe.py --config launch/configs/debug/projector.yaml --output_dir $R/projector --init_from runs/demo/sft/final \
    --train_data "[$A/captions.jsonl]" --classify_data $A/classify.jsonl --max_steps 100 --micro_batch_size 16 \
    --eval_every 0 --classify_eval 150 --log_every 20
$PY train_moe.py --config launch/configs/debug/llm.yaml --output_dir $R/llm --init_from $R/projector/final \
    --train_data "$D" --max_steps $STEPS --micro_batch_size 16 --vision_lr 2e-3 --eval_every 400 --save_every 400 \
    --classify_eval 150 --log_every 50
$PY train_moe.py --config launch/configs/debug/moe.yaml --output_dir $R/moe --init_from $R/llm/final \
    --train_data "$D" --max_steps 100 --micro_batch_size 16 --eval_every 50 --classify_eval 150 --log_every 20
for s in projector llm moe; do echo "$s: $(grep -o '"classify_accuracy": [0-9.]*' $R/$s/classification.json)"; done
