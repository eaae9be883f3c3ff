#!/usr/bin/env bash
# Multi-node training: runs `accelerate launch -m train` on THIS node with the rank, master
# address and run dir every node must agree on. Start it once per node (SSH), or let SLURM start
# it once per node (sbatch). Everything after the script's name goes to the job as Hydra overrides.
#
# Plain SSH, 2 nodes with 8 GPUs each (run on every node, NODE_RANK 0 on the master):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 RUN_DIR=/shared/runs/q30b bash scripts/launch_multinode.sh \
#       experiment=qwen3_30b_a3b_int4_qat model.path=/models/qwen3_30b_a3b data.path=/shared/trajectories
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 RUN_DIR=/shared/runs/q30b bash scripts/launch_multinode.sh <same overrides>
#
# SLURM (one task per node; NNODES, NODE_RANK and MASTER_ADDR come from SLURM's variables):
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --wrap \
#     "srun bash scripts/launch_multinode.sh experiment=qwen3_30b_a3b_int4_qat model.path=... data.path=..."
#
# RUN_DIR must be on a file system all nodes share: checkpoints are written there by all ranks
# (DeepSpeed shards) and renamed into place by rank 0. Resume after a crash by running the same
# command again with resume=auto. Settings (environment variables, with defaults):
#   ACCEL_CONFIG=conf/accelerate/multinode_zero3.yaml   GPUS_PER_NODE=8   MASTER_PORT=29500
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
ACCEL_CONFIG=${ACCEL_CONFIG:-conf/accelerate/multinode_zero3.yaml}
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  elif [ "$NNODES" = 1 ]; then
    MASTER_ADDR=127.0.0.1
  else
    echo "launch_multinode.sh: set MASTER_ADDR to the hostname of the node with NODE_RANK=0" >&2
    exit 2
  fi
fi
# One run dir for every rank of every node: Hydra's ${now:...} would differ per process and node.
# Under SLURM the job id makes it unique and identical everywhere; otherwise pass RUN_DIR.
if [ -z "${RUN_DIR:-}" ]; then
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    RUN_DIR=outputs/train/slurm-${SLURM_JOB_ID}
  else
    echo "launch_multinode.sh: set RUN_DIR to a directory on a file system shared by all nodes" >&2
    exit 2
  fi
fi

PY=${PYTHON:-.venv/bin/python}
echo "[launch] node ${NODE_RANK}/${NNODES}, ${GPUS_PER_NODE} processes here, master ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}"
exec "$PY" -m accelerate.commands.accelerate_cli launch \
  --config_file "$ACCEL_CONFIG" \
  --num_machines "$NNODES" \
  --machine_rank "$NODE_RANK" \
  --num_processes $((NNODES * GPUS_PER_NODE)) \
  --main_process_ip "$MASTER_ADDR" \
  --main_process_port "$MASTER_PORT" \
  -m train output_dir="$RUN_DIR" "$@"
