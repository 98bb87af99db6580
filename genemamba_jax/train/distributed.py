"""Multi-process start-up and agreement: jax.distributed from a launcher's variables.

Where the settings come from, first match wins:

  config       --config.mesh.coordinator_address / num_processes / process_id
  environment  JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID
               (launch/local_multiprocess.sh sets them)
  SLURM        inside `srun` with > 1 task: the first host of SLURM_STEP_NODELIST,
               SLURM_NTASKS, SLURM_PROCID (JAX's own SlurmCluster reads them)
  JAX          mesh.distributed=True and none of the above: JAX's cluster
               detection (Cloud TPU VMs, Open MPI, Kubernetes)

On CPU the processes' collectives go over gloo (TCP). A process that dies is noticed
by the others at their next collective (it fails at once: `lost_peer` makes it a
one-line error) or, whatever they are doing, by a watchdog thread within
mesh.heartbeat_timeout (+ a few seconds): the coordination service stops seeing the
dead process's heartbeats. Either way the others end with one line, not JAX's fatal
abort with a C++ stack trace: JAX runs with `jax_enable_recoverability`, so the
service reports a dead process instead of killing the others itself.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from genemamba_jax.errors import DataError

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")


class PeerLost(RuntimeError):
  """Another process of the run died or lost its connection; this one cannot go on."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `jax.distributed.initialize` is called with (None: JAX detects it)."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  source: str  # "config", "environment", "SLURM" or "JAX cluster detection"


def _int(value: Any, name: str, lo: int) -> int:
  try:
    number = int(str(value).strip())
  except ValueError:
    number = None
  if number is None or number < lo:
    raise DataError(f"{name}={value!r} must be an integer >= {lo}")
  return number


def _check(s: Settings) -> Settings:
  where = {"config": "--config.mesh.", "environment": "$JAX_", "SLURM": "$SLURM_"}[s.source]
  if s.coordinator_address is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+",
                                                            s.coordinator_address):
    raise DataError(f"coordinator address {s.coordinator_address!r} (from {s.source}) is not "
                    "host:port; e.g. 127.0.0.1:12355")
  if s.process_id is not None and s.num_processes is not None \
      and s.process_id >= s.num_processes:
    raise DataError(f"process id {s.process_id} (from {s.source}) must be < the number of "
                    f"processes {s.num_processes}; number them 0..{s.num_processes - 1}")
  missing = [name for name, v in (("coordinator_address", s.coordinator_address),
                                  ("num_processes", s.num_processes),
                                  ("process_id", s.process_id)) if v is None]
  if missing and len(missing) < 3:
    raise DataError(f"multi-process settings from {s.source} lack {', '.join(missing)} "
                    f"({where}...); give all three (address, count, id) or none")
  return s


def _slurm(environ: Mapping[str, str]) -> Settings | None:
  """Settings of an `srun` step with > 1 task (None outside one), as JAX's SlurmCluster reads."""
  if not all(k in environ for k in _SLURM):  # sbatch's own script has no step node list
    return None
  count = _int(environ["SLURM_NTASKS"], "SLURM_NTASKS", 1)
  if count == 1:
    return None
  from jax._src.clusters import slurm_cluster  # pylint: disable=g-import-not-at-top
  saved = dict(os.environ)
  try:  # SlurmCluster reads os.environ: the first host of the node list and a port from the job id
    os.environ.update({k: environ[k] for k in _SLURM})
    address = slurm_cluster.SlurmCluster.get_coordinator_address(None, environ.get(
        "JAX_COORDINATOR_PORT"))
  finally:
    os.environ.clear()
    os.environ.update(saved)
  return Settings(address, count, _int(environ["SLURM_PROCID"], "SLURM_PROCID", 0), "SLURM")


def settings(cfg: Any, environ: Mapping[str, str] | None = None) -> Settings | None:
  """The multi-process settings `cfg` (the config's mesh section) and the environment give.

  None: a single-process run. cfg.distributed False never distributes, True
  always does (with JAX's detection if nothing else is set), None when a
  launcher's variables say so. DataError (one line) for inconsistent settings.
  """
  environ = os.environ if environ is None else environ
  wanted = getattr(cfg, "distributed", None)
  if wanted is False:
    return None
  given = [getattr(cfg, k, None) for k in ("coordinator_address", "num_processes", "process_id")]
  found = None
  if any(v is not None for v in given):
    found = Settings(given[0], None if given[1] is None else _int(given[1], "num_processes", 1),
                     None if given[2] is None else _int(given[2], "process_id", 0), "config")
  elif any(environ.get(k) for k in (ENV_ADDRESS, ENV_COUNT, ENV_ID)):
    count, pid = environ.get(ENV_COUNT), environ.get(ENV_ID)
    found = Settings(environ.get(ENV_ADDRESS) or None,
                     None if not count else _int(count, ENV_COUNT, 1),
                     None if not pid else _int(pid, ENV_ID, 0), "environment")
  else:
    found = _slurm(environ)
  if found is None:
    return Settings(None, None, None, "JAX cluster detection") if wanted else None
  found = _check(found)
  if found.num_processes == 1 and not wanted:
    return None
  return found


def initialize(cfg: Any, environ: Mapping[str, str] | None = None) -> bool:
  """Starts jax.distributed when `settings` says so (before anything touches a device).

  Returns whether JAX runs distributed. Timeouts come from cfg (seconds):
  init_timeout (waiting for all processes to join), heartbeat_timeout (a silent
  process is declared dead), shutdown_timeout (the exit barrier).
  """
  if jax.distributed.is_initialized():
    return True
  s = settings(cfg, environ)
  if s is None:
    return False
  # CPU collectives between processes (a no-op for GPUs and TPUs, which have their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_enable_recoverability", True)  # see the module docstring
  _RUN["timeout_ms"] = 1000 * int(getattr(cfg, "init_timeout", 300))
  try:
    jax.distributed.initialize(
        coordinator_address=s.coordinator_address, num_processes=s.num_processes,
        process_id=s.process_id,
        initialization_timeout=int(getattr(cfg, "init_timeout", 300)),
        heartbeat_timeout_seconds=int(getattr(cfg, "heartbeat_timeout", 60)),
        shutdown_timeout_seconds=int(getattr(cfg, "shutdown_timeout", 60)))
  except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"jax.distributed could not start (settings from {s.source}: "
                    f"coordinator {s.coordinator_address}, {s.num_processes} processes, "
                    f"this one {s.process_id}): {first[:300]}; start every process, with the "
                    "same address and count") from None
  if jax.process_count() > 1:
    threading.Thread(target=_watch, args=(float(getattr(cfg, "heartbeat_timeout", 60)),),
                     name="genemamba-peer-watchdog", daemon=True).start()
  return True


_RUN = {"timeout_ms": 300_000, "finished": False}


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def _watch(heartbeat_timeout: float) -> None:
  """Ends this process in one line when the coordination service misses another process."""
  n = jax.process_count()
  while not _RUN["finished"]:
    try:
      live = _client().get_live_nodes(list(range(n)))
    except Exception:  # pylint: disable=broad-exception-caught
      live = set(range(1, n))  # no answer: the coordinator (process 0) is gone
    if _RUN["finished"]:
      return
    gone = sorted(set(range(n)) - set(live))
    if gone:
      print(f"error: process {jax.process_index()} of {n}: another process stopped or lost its "
            f"connection (process {', '.join(map(str, gone))} is gone); this one stops too. "
            "Re-run the same command on every process to resume from the last checkpoint",
            file=sys.stderr, flush=True)
      exit_now(2)
    threading.Event().wait(min(2.0, heartbeat_timeout / 4))


def sync(name: str) -> None:
  """Every process waits here until all have arrived (no-op for one process).

  A barrier of the coordination service, not a device collective: the wait may
  be long (process 0 preparing data) without a collective timing out.
  """
  if jax.process_count() == 1:
    return
  try:
    _client().wait_at_barrier(name, _RUN["timeout_ms"])
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise lost_peer(e, 0, None) from None


def finish() -> None:
  """The run's end: the watchdog stops, every process waits for the others to get here, and
  process 0 (the coordination service's host) leaves last, once the others disconnected."""
  if jax.process_count() == 1 or _RUN["finished"]:
    return
  _RUN["finished"] = True
  sync("genemamba end of run")
  if jax.process_index() != 0:
    jax.distributed.shutdown()
    return
  everyone = list(range(jax.process_count()))
  deadline = time.monotonic() + _RUN["timeout_ms"] / 1000
  while time.monotonic() < deadline:
    try:  # (the asking process must be among the processes asked about)
      if set(_client().get_live_nodes(everyone)) == {0}:
        return
    except Exception:  # pylint: disable=broad-exception-caught
      return
    time.sleep(0.1)


def is_collective_failure(error: BaseException) -> bool:
  """Whether `error` is a failed collective or coordination call (a dead peer, usually)."""
  if isinstance(error, jax.errors.JaxRuntimeError):
    return True
  # gloo's failures can surface as ValueErrors
  return isinstance(error, ValueError) and any(
      k in str(error) for k in ("Gloo", "UNAVAILABLE", "DEADLINE_EXCEEDED", "Connection closed"))


class StopVote:
  """Agrees, across processes, on whether (and why) to stop: every process stops at one step.

  `vote(signum)` casts this process's vote (0: go on, else the signal that
  asked to stop) and returns the agreed signal: the largest vote of the
  previous call, all processes' votes gathered by one small all-reduce. One
  call late, so the device queue keeps a step in flight; all processes see
  the same result at the same call, so they break out at the same step. One
  process: the vote itself, at once.
  """

  def __init__(self):
    self._pending = None
    if jax.process_count() == 1:
      return
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("p",))
    self._in = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("p"))
    self._max = jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))

  def vote(self, signum: int) -> int:
    if jax.process_count() == 1:
      return int(signum)
    local = np.full((jax.local_device_count(),), int(signum), np.int32)
    current = self._max(jax.make_array_from_process_local_data(self._in, local))
    previous, self._pending = self._pending, current
    return 0 if previous is None else int(previous)


_LOST = {"peer": False}


def lost_peer(error: BaseException, step: int, last_checkpoint: int | None) -> PeerLost:
  """The one-line error for a collective that failed in a multi-process run (see `exit_now`)."""
  _LOST["peer"] = True
  first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
  resume = (f"from step {last_checkpoint}" if last_checkpoint else "from the start")
  _RUN["finished"] = True  # the watchdog's message would be a second line
  return PeerLost(f"process {jax.process_index()} of {jax.process_count()}: another process "
                  f"stopped or lost its connection at step {step} ({first}); this one stops too. "
                  f"Re-run the same command on every process to resume {resume}")


def peer_was_lost() -> bool:
  """Whether `lost_peer` was raised: the process should then end with `exit_now`."""
  return _LOST["peer"]


def exit_now(status: int) -> None:
  """Ends this process at once (after a lost peer): no shutdown barrier waiting for the dead."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access
