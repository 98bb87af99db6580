#!/usr/bin/env bash
# N processes on one machine (e.g. to test multi-process data sharding on CPU):
#   launch/local_multiprocess.sh 2 configs/demo.py runs/demo_mp
set -euo pipefail
n="$1"; config="$2"; workdir="$3"; shift 3
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
    python -m genemamba_jax.train --config "$config" --workdir "$workdir" \
    --config.mesh.distributed=True "$@" &
done
wait
