#!/usr/bin/env bash
# Multi-node training launcher for the SLURM recipe chain: one `accelerate launch` per node of the current SLURM
# allocation (DeepSpeed ZeRO-3, `--deepspeed_multinode_launcher standard`, so no ssh or hostfile), rank 0 on the
# first node. It is the srun line of train.sbatch as a command of its own, so launch/recipe.sh can use it:
#
#   TRAIN_LAUNCHER=launch/slurm/srun_accelerate.sh launch/recipe.sh CONFIG_DIR RUN_DIR --only pretrain
#   launch/slurm/srun_accelerate.sh train_pretrain.py --config CONFIG.yaml [--key value ...]
#
# recipe_stage.sbatch sets it for every training stage; it also works by hand inside `salloc --nodes=N`.
# Run it from the repository root (recipe.sh does). It must run inside a SLURM allocation: the node count comes
# from SLURM_NNODES, the GPUs per node from SLURM_GPUS_ON_NODE (default 8), the head node from
# `scontrol show hostnames`, and each task reads its machine rank from its own $SLURM_NODEID.
#
# Environment overrides: ACCELERATE_CONFIG (default launch/accelerate/multinode_zero3.yaml),
# MAIN_PROCESS_PORT (default 15000 + job id % 15000), NCCL_* (passed to every rank; NCCL_DEBUG defaults to WARN). `accelerate` is taken from PATH, else .venv/bin/accelerate.
set -euo pipefail

log() { echo "[srun_accelerate $(date '+%F %T')] $*"; }

if [[ $# -lt 1 ]]; then
    echo "usage: launch/slurm/srun_accelerate.sh SCRIPT.py [ARGS ...]   (inside a SLURM job or allocation)" >&2
    exit 2
fi
: "${SLURM_JOB_ID:?srun_accelerate.sh: not inside a SLURM job (SLURM_JOB_ID unset)}"

NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
GPUS=${SLURM_GPUS_ON_NODE:-8}
GPUS=${GPUS##*:}  # some sites report "type:count"
HOSTS=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}")  # not `| head -1`: SIGPIPE + pipefail
HEAD=${HOSTS%%$'\n'*}
[[ -n $HEAD ]] || { echo "srun_accelerate.sh: scontrol gave no host for '${SLURM_JOB_NODELIST:-}'" >&2; exit 2; }
# rendezvous port: 15000-29999, below Linux's ephemeral range (32768-60999, where an outgoing connection may
# already hold it) and above the well-known ports; jobs sharing a head node differ by job id
PORT=${MAIN_PROCESS_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/accelerate/multinode_zero3.yaml}
if [[ ! -f $ACCELERATE_CONFIG ]]; then
    echo "srun_accelerate.sh: accelerate config '$ACCELERATE_CONFIG' does not exist (cwd $PWD)" >&2
    exit 2
fi
if command -v accelerate > /dev/null; then
    ACCELERATE_BIN=accelerate
elif [[ -x .venv/bin/accelerate ]]; then
    ACCELERATE_BIN=$PWD/.venv/bin/accelerate
else
    echo "srun_accelerate.sh: no 'accelerate' on PATH and no .venv/bin/accelerate" >&2
    exit 2
fi
export HEAD PORT NNODES GPUS ACCELERATE_CONFIG ACCELERATE_BIN
export NUM_PROCESSES=$((NNODES * GPUS))
export PYTHONUNBUFFERED=1
# NCCL diagnostics reach every rank (srun passes the environment on): warnings by default (NCCL_DEBUG=INFO for a hang),
# and an NCCL error or timeout aborts the process group instead of hanging the job until the time limit
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-$TORCH_NCCL_ASYNC_ERROR_HANDLING}  # name before torch 2.2
# Slurm >= 22.05: srun no longer inherits --cpus-per-task from sbatch unless told so
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

log "$NNODES node(s) × $GPUS GPUs = $NUM_PROCESSES processes, head $HEAD:$PORT, config $ACCELERATE_CONFIG"
log "command: $*"
log "NCCL/torch diagnostics: $(env | grep -E '^(TORCH_)?NCCL_' | sort | tr '\n' ' ')"

# One task per node; $SLURM_NODEID must be expanded by each task, hence the single quotes. The script and its
# arguments travel as positional parameters, so no quoting is lost on the way.
# shellcheck disable=SC2016
exec srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec "$ACCELERATE_BIN" launch --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$NNODES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$HEAD" --main_process_port "$PORT" --deepspeed_multinode_launcher standard \
        "$@"' train-task "$@"
