"""Work units as tasks on a Dask cluster (`prepare ... --dask-scheduler tcp://HOST:PORT`).

The same unit functions as local worker processes (`jobs.run_units`), run by the
cluster's workers. Workers open the inputs and write shards themselves, so the
inputs, the vocabulary and the output directory must be on storage that the
client and every worker see under the same path (a network file system); that
is checked before any unit runs. A worker that dies mid-unit loses only that
unit: the scheduler runs it again on another worker (a shard is written to a
.tmp file and renamed when finished, so a half-written one is never taken for
done), and a task that raises an unexpected error is retried `RETRIES` times.
Bad input (`DataError`) is not retried: it fails the same way everywhere.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from typing import Callable, Iterator, Sequence

from genemamba_jax.errors import DataError

RETRIES = 2
_INSTALL = 'pip install -e ".[dask]"'


def _distributed():
  try:
    import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(f"--dask-scheduler needs dask.distributed, which is not installed; "
                    f"{_INSTALL} (on the client and every worker)") from None
  return distributed


def check_address(address: str) -> None:
  """DataError, before any work, when dask.distributed is missing or `address` is malformed."""
  _distributed()
  if "://" not in address:
    raise DataError(f"--dask-scheduler {address}: expected an address like tcp://HOST:8786 "
                    "(what `dask scheduler` prints)")


def connect(address: str, timeout: float | None = None):
  """A Client of the scheduler at `address` with at least one worker; DataError if none.

  `timeout` (s) defaults to Dask's connect timeout, `distributed.comm.timeouts.connect`
  (30 s; e.g. DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s): the scheduler must answer
  within it, and a first worker must have joined within it too.
  """
  check_address(address)
  distributed = _distributed()
  if timeout is None:
    import dask  # pylint: disable=g-import-not-at-top
    timeout = dask.utils.parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))
  try:
    client = distributed.Client(address, timeout=timeout, set_as_default=False)
  except (OSError, TimeoutError, ValueError) as e:  # unreachable, refused, a bad address
    raise DataError(f"--dask-scheduler {address}: no Dask scheduler answered within {timeout:g} "
                    f"s ({' '.join(str(e).split())[:200]}); start one with `dask scheduler` "
                    "and pass the address it prints") from None
  try:
    client.wait_for_workers(1, timeout=timeout)
  except (OSError, TimeoutError):
    client.close()
    raise DataError(f"--dask-scheduler {address}: the scheduler has no worker after "
                    f"{timeout:g} s; start some with `dask worker {address}`") from None
  return client


def _fingerprint(path: str) -> str | None:
  """What a process sees at `path`: a hash of a file's size and first MiB, of a folder's
  listing (names and sizes), or None when it is missing or unreadable."""
  h = hashlib.sha256()
  try:
    if os.path.isdir(path):
      for name in sorted(os.listdir(path)):
        h.update(f"{name}\0{os.path.getsize(os.path.join(path, name))}\0".encode())
    else:
      h.update(str(os.path.getsize(path)).encode())
      with open(path, "rb") as f:
        h.update(f.read(1 << 20))
  except OSError:
    return None
  return h.hexdigest()


def _view(paths: Sequence[str], writable: str | None) -> list:
  """Runs on every worker (and here): the fingerprint of each path, and whether `writable` is."""
  return [_fingerprint(p) for p in paths] + [writable is None or os.access(writable, os.W_OK)]


def check_shared(client, paths: Sequence[str], writable: str | None = None) -> None:
  """DataError unless every worker sees `paths` (files or folders) as this process does, and
  can write to folder `writable` (which must hold the marker file written here, too)."""
  paths = [str(p) for p in paths]
  marker = None
  if writable is not None:
    marker = os.path.join(writable, f".dask-check-{uuid.uuid4().hex}")
    with open(marker, "w", encoding="utf-8") as f:
      f.write(socket.gethostname())
    paths.append(marker)
  try:
    mine = _view(paths, writable)
    try:
      theirs = client.run(_view, paths, writable)
    except Exception as e:  # pylint: disable=broad-except  # missing there, or another version
      raise DataError(f"the Dask workers could not run this genemamba_jax ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:200]}); install the same version on every "
                      f"worker ({_INSTALL}) and restart them") from None
  finally:
    if marker is not None:
      os.remove(marker)
  for worker, seen in sorted(theirs.items()):
    for path, a, b in zip(paths, mine, seen):
      if a != b:
        what = ("the output directory " + writable if path == marker
                else ("a different " if b is not None else "no ") + path)
        raise DataError(f"Dask worker {worker} cannot see {what} as this process does; the "
                        "inputs, --vocab and --out must be on storage shared by the client and "
                        "every worker (e.g. a network file system), under the same path")
    if not seen[-1]:
      raise DataError(f"Dask worker {worker} cannot write to the output directory {writable}; "
                      "give the workers write access to --out (or pass an --out they can "
                      "write to, on storage shared with this process)")


def _run_unit(fn: Callable, unit, *args):
  """Runs on a worker: a unit's DataError comes back as a value (not retried), see the caller."""
  try:
    return fn(unit, *args)
  except DataError as e:
    return e


def run_units(address: str, fn: Callable, units: Sequence, args: tuple, desc: str,
              shared: Sequence[str] = (), writable: str | None = None
              ) -> Iterator[tuple[int, tuple]]:
  """Runs `fn(unit, *args)` for every unit on the cluster; yields (unit.index, fn's result)
  as units finish. On an error or interrupt the remaining tasks are cancelled."""
  distributed = _distributed()
  client = connect(address)
  try:
    check_shared(client, shared, writable)
    run = uuid.uuid4().hex[:8]
    futures = [client.submit(_run_unit, fn, unit, *args, key=f"{desc}-{run}-{unit.index}",
                             retries=RETRIES, pure=False) for unit in units]
    index = {f.key: unit.index for f, unit in zip(futures, units)}
    pending = {f.key: f for f in futures}
    try:
      for future in distributed.as_completed(futures, loop=client.loop):
        try:
          result = future.result()
        except distributed.KilledWorker:
          raise DataError(f"{desc}: unit {index[future.key]} ended the worker running it again "
                          "and again (out of memory?); lower --cells-per-shard, or give the "
                          "workers more memory, and re-run") from None
        del pending[future.key]
        future.release()  # the worker frees the result (a unit's digests can be large)
        if isinstance(result, DataError):
          raise result
        yield index[future.key], result
    except BaseException:
      client.cancel(list(pending.values()))
      raise
  finally:
    client.close()

