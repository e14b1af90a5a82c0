#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU, coordinator = first node.
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm_gpu.sh \
#       --config=configs/sd15.py --workdir=/shared/runs/run1
#
# Without SLURM, set the same three things by hand on every process:
#   python -m cid_jax.train --coordinator_address=HOST0:12355 --num_processes=N --process_id=I ...
#SBATCH --job-name=cid_jax
#SBATCH --output=cid_jax-%j.out
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export JAX_COORDINATOR_ADDRESS="${head_node}:${COORDINATOR_PORT:-12355}"
srun --kill-on-bad-exit=1 bash -c '
  export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
  exec python -m cid_jax.train --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID "$@"' _ "$@"
