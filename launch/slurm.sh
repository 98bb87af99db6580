#!/usr/bin/env bash
# Multi-host pretraining under SLURM: one process per node, each using all its GPUs.
#   sbatch --nodes=4 launch/slurm.sh configs/pretrain.py /shared/runs/pretrain --config.data.path=/shared/tokens
# srun's variables (SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID) give every process the
# coordinator (the first node), the process count and its id (train/distributed.py).
# --kill-on-bad-exit: a process that fails ends the others at once rather than leaving them
# waiting for it. Re-submitting the same command resumes from the last checkpoint.
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
set -euo pipefail
config="$1"; workdir="$2"; shift 2
srun --kill-on-bad-exit=1 python -m genemamba_jax.train --config "$config" --workdir "$workdir" \
  --config.mesh.distributed=True "$@"
