#!/usr/bin/env bash
# N training processes on this machine, talking over 127.0.0.1 (on CPU each process has one
# device; the global batch is split over them as over N hosts):
#   launch/local_multiprocess.sh 2 configs/demo.py runs/demo_mp [--config.key=value ...]
# Each process's output lines start with [i]. Ctrl-C or SIGTERM reaches every process: they
# agree on a step, save a checkpoint there and stop; re-running the command resumes.
# $PYTHON (default python) runs them; $JAX_PLATFORMS defaults to cpu; $JAX_COORDINATOR_PORT
# picks the port (default: a free one). Exit status: the first non-zero one of the processes.
set -uo pipefail
if (($# < 3)); then
  echo "usage: $0 N CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
n="$1"; config="$2"; workdir="$3"; shift 3
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: N=$n must be a positive number of processes" >&2
  exit 2
fi
python="${PYTHON:-python}"
port="${JAX_COORDINATOR_PORT:-$("$python" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
    "$python" -u -m genemamba_jax.train --config "$config" --workdir "$workdir" "$@" \
    > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=("$!")
  echo "local_multiprocess.sh: process $i of $n is pid $! (coordinator 127.0.0.1:$port)" >&2
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM

status=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break  # a trapped signal interrupted the wait: wait again
  done
  if ((rc != 0 && status == 0)); then status=$rc; fi
done
wait  # the output filters
exit "$status"
