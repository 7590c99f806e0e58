#!/usr/bin/env bash
# The whole recipe, stage by stage, from one config directory:
#   [base: a pretrained LLM from a GGUF file] → corpus → micrographs (synthetic, or your files via ingest.yaml)
#   → annotations → instructions → pretrain → sft → dpo → vision → projector → llm → moe → moe_dpo → evaluations
#   → GPTQ W4A16 export → evaluation of it → report.md
#
#   launch/recipe.sh launch/configs/debug runs/demo              # CPU, ~20 min on 2 cores (what `make demo` runs)
#   TRAIN_LAUNCHER="accelerate launch --config_file launch/accelerate/node_8gpu_zero3.yaml" \
#       launch/recipe.sh launch/configs/micrograph_vlm runs/micrograph_vlm        # one node
#   launch/slurm/submit_recipe.sh launch/configs/micrograph_vlm runs/micrograph_vlm --nodes 2   # SLURM chain
#
# A stage runs when CONFIG_DIR has its YAML (base.yaml, corpus.yaml, micrographs.yaml or ingest.yaml, annotate.yaml
# [optional, default teacher: metadata], instructions.yaml [optional], pretrain.yaml, sft.yaml, dpo.yaml, vision.yaml,
# projector.yaml, llm.yaml, moe.yaml, moe_dpo.yaml, evaluate.yaml, gptq.yaml); each reads the previous stage's output in RUN_DIR,
# whatever paths its YAML names. A stage is complete when RUN_DIR/.recipe/<stage>.done holds the fingerprint of its
# command, its YAML and the completion record of the stage before it. So a rerun skips complete stages; a stage
# whose output lacks the record (killed midway) reruns its same command, and training resumes from its newest
# checkpoint; a stage whose inputs changed (a stage before it reran, or its YAML changed) starts again from an empty
# directory. The first failing stage stops the recipe with its name and log path (RUN_DIR/logs/<stage>.log).
#
# Options: --list (print stage, output, command per line and exit), --only STAGE (run one stage; the SLURM chain does
# this). Exit status: 0 done, 1 a stage failed, 2 bad usage, 3 a training stage stopped early on request (STOP file or
# SIGUSR1) after writing a checkpoint: rerunning resumes it.
# Environment: PYTHON (default .venv/bin/python, else python3; either with this repository installed, `pip install -e .`,
# which makes semivlm and data_prep importable from every script) runs data preparation, evaluation and export;
# TRAIN_LAUNCHER (default $PYTHON) runs the training scripts (split on spaces: no spaces inside its arguments).
set -euo pipefail

usage() { echo "usage: launch/recipe.sh CONFIG_DIR [RUN_DIR] [--list | --only STAGE]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
CFG=${1%/}; shift
RUN=runs/$(basename "$CFG")
if [[ $# -ge 1 && $1 != --* ]]; then RUN=${1%/}; shift; fi
MODE=all; ONLY=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --list) MODE=list ;;
        --only) [[ $# -ge 2 ]] || usage; MODE=only; ONLY=$2; shift ;;
        *) usage ;;
    esac
    shift
done
# paths stay relative when given from the repository root (where every command runs), else become absolute
CALLER=$PWD
cd "$(dirname "$0")/.."
if [[ $CALLER != "$PWD" ]]; then
    [[ $CFG == /* ]] || CFG=$CALLER/$CFG
    [[ $RUN == /* ]] || RUN=$CALLER/$RUN
fi
[[ -d $CFG ]] || { echo "recipe: config directory '$CFG' does not exist" >&2; exit 2; }
if [[ -z ${PYTHON:-} ]]; then [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python || PYTHON=python3; fi
read -r -a TRAIN <<< "${TRAIN_LAUNCHER:-$PYTHON}"
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------- the stages this config directory asks for
# The wiring (which output feeds which stage) lives here, once; the recipe values live in the YAML files. Each stage
# has an output path (OUT) and a command (CMD, shell-quoted, appended to with `arg`).
has() { [[ -f $CFG/$1.yaml ]]; }
# SIG is the command from the script on, without the launcher, so that the same stage run by another launcher
# (python here, accelerate or srun on the cluster) counts as the same work.
STAGES=(); declare -A OUT CMD SIG
add() {
    local name=$1 out=$2; shift 2
    STAGES+=("$name"); OUT[$name]=$out; CMD[$name]=$(printf '%q ' "$@")
    while [[ $# -gt 0 && $1 != *.py ]]; do shift; done
    SIG[$name]=$(printf '%q ' "$@")
}
arg() { local name=$1; shift; CMD[$name]+=$(printf '%q ' "$@"); SIG[$name]+=$(printf '%q ' "$@"); }
A=$RUN/annotations
LLM=""; VLM=""; FINAL=""; EVALS=(); TRAINED=()

if has base; then  # a real pretrained LLM (data_prep/gguf_to_hf.py): the corpus uses its tokenizer, training starts from it
    add base "$RUN/base" "$PYTHON" data_prep/gguf_to_hf.py --config "$CFG/base.yaml" --out "$RUN/base"
    LLM=$RUN/base
fi
if has corpus; then
    add corpus "$RUN/corpus" "$PYTHON" data_prep/build_corpus.py --config "$CFG/corpus.yaml" --out "$RUN/corpus"
    [[ -n ${OUT[base]:-} ]] && arg corpus --tokenizer "$RUN/base"
fi
if has ingest; then
    add micrographs "$RUN/micrographs" "$PYTHON" data_prep/ingest.py --config "$CFG/ingest.yaml" --out "$RUN/micrographs"
elif has micrographs; then
    add micrographs "$RUN/micrographs" "$PYTHON" data_prep/synth_micrographs.py --config "$CFG/micrographs.yaml" \
        --out "$RUN/micrographs"
fi
if [[ -n ${OUT[micrographs]:-} ]]; then
    add annotations "$A" "$PYTHON" data_prep/annotate.py --manifest "$RUN/micrographs/manifest.jsonl" --out "$A"
    has annotate && arg annotations --config "$CFG/annotate.yaml"   # default teacher: metadata (synthetic ground truth)
fi
if [[ -n ${OUT[corpus]:-} ]]; then
    add instructions "$RUN/instructions" "$PYTHON" data_prep/make_instructions.py \
        --documents "$RUN/corpus/documents.jsonl" --out "$RUN/instructions"
    has instructions && arg instructions --config "$CFG/instructions.yaml"
    [[ -n ${OUT[annotations]:-} ]] && arg instructions --annotations "$A"
fi
if has pretrain; then
    add pretrain "$RUN/pretrain" "${TRAIN[@]}" train_pretrain.py --config "$CFG/pretrain.yaml" --output_dir "$RUN/pretrain" \
        --tokenizer "$RUN/corpus/tokenizer" --train_data "$RUN/corpus/train" --eval_data "$RUN/corpus/validation"
    [[ -n $LLM ]] && arg pretrain --init_from "$LLM"   # continued pretraining of the base model
    LLM=$RUN/pretrain/final; TRAINED+=(pretrain)
fi
for stage in sft dpo; do
    has $stage || continue
    data=$RUN/instructions/$([[ $stage == sft ]] && echo instructions || echo preferences).jsonl
    add $stage "$RUN/$stage" "${TRAIN[@]}" train_sft.py --config "$CFG/$stage.yaml" --output_dir "$RUN/$stage" \
        --train_data "$data"
    [[ -n $LLM ]] && arg $stage --init_from "$LLM" --tokenizer "$LLM"
    LLM=$RUN/$stage/final; TRAINED+=($stage)
done
FINAL=$LLM
if has vision; then  # the debug recipe's stand-in for a web-pretrained CLIP: trained on the micrographs' labels
    add vision "$RUN/vision" "${TRAIN[@]}" train_vision.py --config "$CFG/vision.yaml" --output_dir "$RUN/vision"
    [[ -n $LLM ]] && arg vision --tokenizer "$LLM"
    # train_vision.py keeps the records its objective reads: captions (contrastive) or class labels (classify)
    [[ -n ${OUT[annotations]:-} ]] && arg vision --train_data "[$A/captions.jsonl,$A/classify.jsonl]"
    TRAINED+=(vision)
fi
VLM_DATA="[$A/captions.jsonl,$A/vqa.jsonl,$A/classify.jsonl${OUT[instructions]:+,$RUN/instructions/instructions.jsonl}]"
for stage in projector llm moe; do
    has $stage || continue
    add $stage "$RUN/$stage" "${TRAIN[@]}" train_moe.py --config "$CFG/$stage.yaml" --output_dir "$RUN/$stage"
    if [[ $stage == projector ]]; then
        [[ -n $LLM ]] && arg $stage --init_from "$LLM"
        [[ -n ${OUT[vision]:-} ]] && arg $stage --vision_tower "$RUN/vision/final"
        [[ -n ${OUT[annotations]:-} ]] && arg $stage --train_data "[$A/captions.jsonl]" --classify_data "$A/classify.jsonl"
    else
        [[ -n $VLM ]] && arg $stage --init_from "$VLM"
        [[ -n ${OUT[annotations]:-} ]] && arg $stage --train_data "$VLM_DATA"
    fi
    VLM=$RUN/$stage/final; FINAL=$VLM; TRAINED+=($stage)
done
if has moe_dpo && [[ -n ${OUT[moe]:-} ]]; then  # DPO on the MoE VLM as it is: image pairs and text pairs
    add moe_dpo "$RUN/moe_dpo" "${TRAIN[@]}" train_moe.py --config "$CFG/moe_dpo.yaml" --output_dir "$RUN/moe_dpo" \
        --init_from "$RUN/moe/final"
    [[ -n ${OUT[instructions]:-} ]] && arg moe_dpo --train_data "[$RUN/instructions/preferences.jsonl]"
    VLM=$RUN/moe_dpo/final; FINAL=$VLM; TRAINED+=(moe_dpo)  # GPTQ quantises the model after DPO
fi

# evaluations: the chat LLM, the dense VLM, the MoE VLM (before and after its DPO), and the GPTQ export of the last
# model trained
add_eval() {  # NAME MODEL_DIR text|vlm
    has evaluate || return 0
    add "eval_$1" "$RUN/eval/$1" "$PYTHON" evaluate.py --config "$CFG/evaluate.yaml" --model "$2" \
        --output_dir "$RUN/eval/$1" --name "$1"
    if [[ $3 == vlm ]]; then arg "eval_$1" --data "[$A/captions.jsonl,$A/vqa.jsonl,$A/classify.jsonl]"
    else arg "eval_$1" --data "$RUN/instructions/instructions.jsonl" --split validation --corpus "$RUN/corpus/validation"
    fi
    EVALS+=("$RUN/eval/$1")
}
[[ -n $LLM && -n ${OUT[instructions]:-} ]] && add_eval "$(basename "$(dirname "$LLM")")" "$LLM" text
[[ -n ${OUT[llm]:-} && -n ${OUT[annotations]:-} ]] && add_eval llm "$RUN/llm/final" vlm
[[ -n ${OUT[moe]:-} && -n ${OUT[annotations]:-} ]] && add_eval moe "$RUN/moe/final" vlm
[[ -n ${OUT[moe_dpo]:-} && -n ${OUT[annotations]:-} ]] && add_eval moe_dpo "$RUN/moe_dpo/final" vlm
if has gptq && [[ -n $FINAL ]]; then
    add gptq "$RUN/gptq" "$PYTHON" export_gptq.py --config "$CFG/gptq.yaml" --model "$FINAL" --output_dir "$RUN/gptq"
    if [[ $FINAL == "$VLM" ]]; then
        arg gptq --calibration "[$A/captions.jsonl,$A/vqa.jsonl${OUT[instructions]:+,$RUN/instructions/instructions.jsonl}]" \
            --eval_data "[$A/classify.jsonl]"
        add_eval gptq "$RUN/gptq" vlm
    else
        arg gptq --calibration "[$RUN/instructions/instructions.jsonl]" \
            --eval_data "[$RUN/instructions/instructions.jsonl]" --eval_split validation
        add_eval gptq "$RUN/gptq" text
    fi
fi
if ((${#EVALS[@]})); then
    add report "$RUN/report.md" "$PYTHON" evaluate.py --config "$CFG/evaluate.yaml" --compare "[$(IFS=,; echo "${EVALS[*]}")]" --output_dir "$RUN" \
        --training "[$(IFS=,; echo "${TRAINED[*]/#/$RUN/}")]" --name "$RUN"
fi
((${#STAGES[@]})) || { echo "recipe: no stage YAML in $CFG" >&2; exit 2; }

if [[ $MODE == list ]]; then
    for s in "${STAGES[@]}"; do printf '%-13s %-28s %s\n' "$s" "${OUT[$s]}" "${CMD[$s]}"; done
    exit 0
fi
if [[ $MODE == only && -z ${OUT[$ONLY]:-} ]]; then
    echo "recipe: no stage '$ONLY' in $CFG (stages: ${STAGES[*]})" >&2; exit 2
fi

# ---------------------------------------------------------------- run, skip, resume
# RUN/.recipe/<stage>.started and .done hold the stage's fingerprint: its command, the YAML files it names, and the
# .done record of the stage before it (which carries that stage's completion time, so any rerun upstream shows here).
STATE=$RUN/.recipe
mkdir -p "$STATE" "$RUN/logs"
fingerprint() {  # STAGE PREVIOUS_STAGE
    {
        echo "${SIG[$1]}"
        for word in ${SIG[$1]}; do if [[ $word == *.yaml && -f $word ]]; then cat "$word"; fi; done
        if [[ -n $2 && -f $STATE/$2.done ]]; then cat "$STATE/$2.done"; fi
    } | sha256sum | cut -d' ' -f1
}
elapsed() { local s=$((SECONDS - T0)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }
T0=$SECONDS; n=${#STAGES[@]}; prev=""; ran=0
for i in "${!STAGES[@]}"; do
    s=${STAGES[i]}; out=${OUT[$s]}; tag="[recipe $((i + 1))/$n $s]"
    if [[ $MODE == only && $s != "$ONLY" ]]; then prev=$s; continue; fi
    fp=$(fingerprint "$s" "$prev")
    prev=$s
    if [[ -e $out && -f $STATE/$s.done ]] && grep -qx "fingerprint $fp" "$STATE/$s.done"; then
        echo "$tag complete, skipped ($out)"
        continue
    fi
    if [[ -e $out ]] && ! { [[ -f $STATE/$s.started ]] && grep -qx "fingerprint $fp" "$STATE/$s.started"; }; then
        echo "$tag inputs or config changed since $out was written: starting it again"
        rm -rf "$out"
    elif [[ -e $out ]]; then
        echo "$tag interrupted before: running it again (training resumes from its newest checkpoint)"
    fi
    rm -f "$STATE/$s.done"
    echo "fingerprint $fp" > "$STATE/$s.started"
    log=$RUN/logs/$s.log
    echo "$tag start | elapsed $(elapsed) | log $log"
    t=$SECONDS
    if ! (eval "${CMD[$s]}") > >(tee -a "$log") 2>&1; then
        wait  # let tee finish the log
        echo "recipe: stage '$s' ($((i + 1))/$n) failed after $((SECONDS - t))s; log: $log" >&2
        echo "recipe: fix it and rerun the same command: complete stages are skipped" >&2
        exit 1
    fi
    wait
    if [[ " ${TRAINED[*]} " == *" $s "* && ! -f $out/final/config.json ]]; then  # a STOP file or SIGUSR1
        echo "recipe: stage '$s' stopped before its last step (checkpoint written); rerun the same command to resume" >&2
        exit 3
    fi
    # the run id makes every completion distinct (two within one second too), so the stages after it see the change
    printf 'fingerprint %s\nfinished %s\nrun %s\nseconds %d\n' "$fp" "$(date '+%F %T')" "$(date +%s%N)-$$-$RANDOM" \
        $((SECONDS - t)) > "$STATE/$s.done"
    ran=$((ran + 1))
    echo "$tag done in $((SECONDS - t))s | elapsed $(elapsed)"
done
if [[ $MODE == all ]]; then
    echo "recipe: $ran stage(s) run, $((n - ran)) already complete, $(elapsed) | report: $RUN/report.md"
    [[ -f $RUN/report.md ]] && cat "$RUN/report.md"
fi
exit 0
