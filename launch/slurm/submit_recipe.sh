#!/usr/bin/env bash
# The whole recipe (launch/recipe.sh) as a chain of SLURM jobs, one per stage, each starting when the one before it
# completed successfully (--dependency=afterok), with --kill-on-invalid-dep=yes so a failed stage cancels the rest.
#
#   launch/slurm/submit_recipe.sh CONFIG_DIR RUN_DIR [--nodes N] [--gpus_per_node G] [--from STAGE] [--dry_run]
#                                 [-- SBATCH_ARGS ...]
#   launch/slurm/submit_recipe.sh launch/configs/micrograph_vlm runs/micrograph_vlm --nodes 2 -- --partition=gpu
#
# Each job runs launch/slurm/recipe_stage.sbatch CONFIG_DIR RUN_DIR STAGE (= recipe.sh --only STAGE: a complete stage
# is skipped, an interrupted one resumes). Resources per stage:
#   training stages (a train_*.py command)  --nodes=N --gpus-per-node=G --cpus-per-task=8*G  (srun + accelerate)
#   evaluations and the GPTQ export         --nodes=1 --gpus-per-node=1 --cpus-per-task=8
#   data preparation and the report         --nodes=1, no GPU (the header's --cpus-per-task=16); annotations gets
#                                           1 GPU when annotate.yaml has `teacher: transformers` (a local model)
# Job names are semivlm-<stage>; each stage logs to RUN_DIR/logs/slurm-<stage>-<jobid>.out (appended to across
# requeues), next to recipe.sh's own RUN_DIR/logs/<stage>.log. SBATCH_ARGS (after `--`) go to every sbatch call,
# after ours, so they win: --partition, --account, --time, --qos, --constraint ...
#
# Options: --nodes N (default 1) and --gpus_per_node G (default 8) for the training stages; --from STAGE submits that
# stage and the ones after it only (the earlier ones must be complete in RUN_DIR); --dry_run prints the sbatch
# commands (as a script) without submitting. Paths are relative to the repository root, where the jobs run.
# The environment of this shell (PYTHON, ACCELERATE_CONFIG, ...) is passed to the jobs by sbatch.
set -euo pipefail

usage() {
    echo "usage: launch/slurm/submit_recipe.sh CONFIG_DIR RUN_DIR [--nodes N] [--gpus_per_node G] [--from STAGE]" \
        "[--dry_run] [-- SBATCH_ARGS ...]" >&2
    exit 2
}
[[ $# -ge 2 && $1 != -* && $2 != -* ]] || usage
CFG=${1%/}
RUN=${2%/}
shift 2
NODES=1
GPUS=8
FROM=""
DRY=0
EXTRA=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) [[ $# -ge 2 ]] || usage; NODES=$2; shift ;;
        --nodes=*) NODES=${1#*=} ;;
        --gpus_per_node | --gpus-per-node) [[ $# -ge 2 ]] || usage; GPUS=$2; shift ;;
        --gpus_per_node=* | --gpus-per-node=*) GPUS=${1#*=} ;;
        --from) [[ $# -ge 2 ]] || usage; FROM=$2; shift ;;
        --from=*) FROM=${1#*=} ;;
        --dry_run | --dry-run) DRY=1 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "submit_recipe: unknown option '$1'" >&2; usage ;;
    esac
    shift
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "submit_recipe: --nodes must be a positive integer, not '$NODES'" >&2; exit 2; }
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || { echo "submit_recipe: --gpus_per_node must be a positive integer" >&2; exit 2; }

cd "$(dirname "$0")/../.."  # the repository root: the jobs run here, as recipe.sh does
SBATCH_SCRIPT=launch/slurm/recipe_stage.sbatch
LIST=$(bash launch/recipe.sh "$CFG" "$RUN" --list) || exit 2

# ------------------------------------------------------------------ the stages and their resources
NAMES=()
declare -A RES
for_stage() {  # NAME COMMAND -> the sbatch resource options for it
    local name=$1 cmd=" $2 "
    if [[ $cmd =~ [[:space:]/]train_[A-Za-z0-9_]*\.py[[:space:]] ]]; then
        echo "--nodes=$NODES --gpus-per-node=$GPUS --cpus-per-task=$((8 * GPUS))"
    elif [[ $name == annotations ]] && grep -Eq '^teacher:[[:space:]]*["'\'']?transformers' "$CFG/annotate.yaml" 2> /dev/null
    then  # a local teacher model on the job's own GPU
        echo "--nodes=1 --gpus-per-node=1 --cpus-per-task=8"
    elif [[ $name == report || $cmd =~ [[:space:]]--compare[[:space:]] || $cmd =~ [[:space:]/]data_prep/ ]]; then
        echo "--nodes=1"
    else  # evaluate.py, export_gptq.py, anything else
        echo "--nodes=1 --gpus-per-node=1 --cpus-per-task=8"
    fi
}
while read -r name out cmd; do
    [[ -n $name ]] || continue
    NAMES+=("$name")
    RES[$name]=$(for_stage "$name" "$cmd")
done <<< "$LIST"
START=0
if [[ -n $FROM ]]; then
    START=-1
    for i in "${!NAMES[@]}"; do [[ ${NAMES[i]} == "$FROM" ]] && START=$i && break; done
    if ((START < 0)); then
        echo "submit_recipe: no stage '$FROM' in $CFG (stages: ${NAMES[*]})" >&2
        exit 2
    fi
fi

# ------------------------------------------------------------------ submit
LOGS=$RUN/logs
IDS=()
SUBMITTED=()
cancel_line() { ((${#IDS[@]})) && echo "cancel the chain: scancel ${IDS[*]}"; return 0; }
if ((DRY)); then
    echo "# dry run: the jobs submit_recipe.sh would submit ($((${#NAMES[@]} - START)) stages)"
    echo "mkdir -p $(printf '%q' "$LOGS")"
else
    mkdir -p "$LOGS"
fi
prev=""
for ((i = START; i < ${#NAMES[@]}; i++)); do
    s=${NAMES[i]}
    read -r -a res <<< "${RES[$s]}"
    args=(--parsable --job-name="semivlm-$s" --output="$LOGS/slurm-$s-%j.out" "${res[@]}")
    if ((DRY)); then
        dep=""
        [[ -n $prev ]] && dep=" --dependency=afterok:\$JOB_$prev --kill-on-invalid-dep=yes"
        echo "JOB_$s=\$(sbatch$(printf ' %q' "${args[@]}")$dep$(printf ' %q' ${EXTRA[@]+"${EXTRA[@]}"} \
            "$SBATCH_SCRIPT" "$CFG" "$RUN" "$s"))"
        prev=$s
        continue
    fi
    [[ -n $prev ]] && args+=(--dependency="afterok:$prev" --kill-on-invalid-dep=yes)
    if ! reply=$(sbatch "${args[@]}" ${EXTRA[@]+"${EXTRA[@]}"} "$SBATCH_SCRIPT" "$CFG" "$RUN" "$s"); then
        echo "submit_recipe: sbatch failed for stage '$s'${SUBMITTED[*]:+ (submitted before it: ${SUBMITTED[*]})}" >&2
        cancel_line >&2
        exit 1
    fi
    id=${reply%%;*}  # --parsable prints "jobid" or "jobid;cluster"
    id=${id//[[:space:]]/}
    if [[ ! $id =~ ^[0-9]+$ ]]; then
        echo "submit_recipe: unexpected sbatch reply for stage '$s': '$reply'" >&2
        cancel_line >&2
        exit 1
    fi
    printf '%-13s job %-10s %s  log %s\n' "$s" "$id" "${RES[$s]}" "$LOGS/slurm-$s-$id.out"
    IDS+=("$id")
    SUBMITTED+=("$s")
    prev=$id
done
((DRY)) && exit 0
echo "submitted ${#IDS[@]} job(s): ${IDS[*]}"
echo "watch: squeue -j $(IFS=,; echo "${IDS[*]}")"
cancel_line
