#!/usr/bin/env bash
# Multi-host pretraining under SLURM: one process per node, each using all its GPUs.
#   sbatch --nodes=4 launch/slurm.sh configs/pretrain.py /shared/runs/pretrain --config.data.path=/shared/tokens
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
set -euo pipefail
config="$1"; workdir="$2"; shift 2
srun python -m genemamba_jax.train --config "$config" --workdir "$workdir" \
  --config.mesh.distributed=True "$@"
