#!/usr/bin/env bash
# Multi-node pretraining under SLURM: one torchrun launcher per node, a c10d rendezvous on the first
# node of the allocation, one process per GPU (nccl), DDP over all of them.
#
# Usage (from the repository root, or with holons installed in the job's Python):
#   CONFIG=configs/pretrain/gpu_convnext_b.yaml OUT=/shared/runs/adamv2 \
#     sbatch --nodes 4 --gpus-per-node 8 tools/slurm_pretrain.sh [key.sub=value ...]
#
# Environment:
#   CONFIG          pretraining YAML (required)
#   OUT             run folder (required); on a filesystem every node sees: rank 0 writes it and every
#                   rank reads the checkpoint it resumes from
#   GPUS_PER_NODE   processes per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   PORT            rendezvous port on the first node (default 29500)
#   PYTHON          the Python that runs holons (default python3)
# The extra arguments are config overrides (`data.cache_dir=/shared/cache data.batch_size=2048`);
# data.batch_size is the global batch, split evenly over nodes x GPUS_PER_NODE processes.
#
# Resume: when OUT already holds a checkpoint, the run continues from it (`--resume`), under any
# number of nodes that divides the global batch; so a requeued or resubmitted job picks up where the
# last one stopped. The run gets SIGTERM 5 minutes before the time limit (`--signal` below): torchrun
# forwards it to the workers, which write a checkpoint at the next step and exit.
#
# The node list comes from `scontrol show hostnames "$SLURM_JOB_NODELIST"`; its first host holds the
# rendezvous store (c10d), so no fixed master address is configured anywhere.
#SBATCH --job-name=holons-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
: "${CONFIG:?set CONFIG=configs/pretrain/NAME.yaml}"
: "${OUT:?set OUT=/shared/runs/NAME (a folder every node sees)}"
: "${SLURM_JOB_NODELIST:?run this under sbatch / salloc}"
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
PORT=${PORT:-29500}
PYTHON=${PYTHON:-python3}
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
resume=()
if compgen -G "$OUT/checkpoints/step_*.pt" > /dev/null; then
  resume=(--resume)
fi
echo "holons pretrain: ${#nodes[@]} node(s) x $GPUS_PER_NODE GPU(s), rendezvous $head_node:$PORT, run $OUT" \
  "${resume[*]:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "$PYTHON" -m torch.distributed.run \
    --nnodes "${#nodes[@]}" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "${SLURM_JOB_ID:-holons}" --rdzv_backend c10d --rdzv_endpoint "$head_node:$PORT" \
    -m holons pretrain --config "$CONFIG" --out "$OUT" "${resume[@]}" "$@"
