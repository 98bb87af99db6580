#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM slice (e.g. v5e-32: 8 hosts): the same command on every host.
#   launch/tpu_vm.sh NAME ZONE configs/pretrain.py gs://bucket/runs/pretrain \
#     --config.data.path=gs://bucket/tokens
# Every host needs this repository at $GENEMAMBA_DIR (default ~/genemamba-jax) with the package
# installed (pip install -e '.[tpu]'); JAX finds the other hosts itself (its Cloud TPU cluster
# detection). The workdir and data must be where every host sees them (a gs:// bucket).
# DRY_RUN=1 prints the gcloud command instead of running it.
set -euo pipefail
if (($# < 4)); then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
name="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
dir="${GENEMAMBA_DIR:-~/genemamba-jax}"
if [[ "$dir" == "~/"* ]]; then  # the remote home: ~ stays for the remote shell to expand
  remote="cd ~/$(printf '%q' "${dir#\~/}")"
else
  remote="cd $(printf '%q' "$dir")"
fi
remote+=" && python -m genemamba_jax.train"
for arg in --config "$config" --workdir "$workdir" --config.mesh.distributed=True "$@"; do
  remote+=" $(printf '%q' "$arg")"
done
cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$remote")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
