"""Checkpoints of the train state and of the input pipeline's position, together.

One Orbax step directory holds two items:

  state  the train state pytree (params, opt_state, step, rng), as
         `ocp.args.StandardSave`: each process writes its own shards.
  data   the Grain iterator's state, `grain.checkpoint.CheckpointSave`: one
         small JSON file per process (process_<i>-of-<n>.json).

Restoring both resumes training exactly: the same parameters and the same
next batch as an uninterrupted run.

Faults: a step directory appears only when complete (Orbax writes
`<step>.orbax-checkpoint-tmp*` and renames it), so a killed run never leaves a
checkpoint that a resume would restore; the unfinished temporary directories a
killed or failed save leaves are removed by the next Checkpointer on the same
directory. A save that runs out of disk space raises OSError (ENOSPC, EDQUOT or
EFBIG), which the command line reports in one line.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from genemamba_jax import signals

_TMP_MARK = ".orbax-checkpoint-tmp"
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Orbax writes arrays through TensorStore, whose errors are ValueErrors carrying the OS error
# code in their text, e.g. "... Failed to write 491987 bytes to file 11: File too large
# [os_error_code='27']".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class Checkpointer:
  """Saves every `save_every` steps, keeps the latest `keep`, restores into given shardings.

  With async_save the device -> host copy happens in `save` (so the caller may
  donate or overwrite the state right after) and the files are written in a
  background thread; `wait()` blocks until they are complete. The data
  iterator's position is taken synchronously, at the `save` call.

  Every method must be called by every process of a multi-process run.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int, save_every: int,
               async_save: bool = True):
    if keep < 1 or save_every < 1:
      raise ValueError(f"keep={keep} and save_every={save_every} must be >= 1")
    directory = os.fspath(directory)
    # Local paths made absolute (Orbax wants that); URLs (gs://...) kept.
    self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        # Orbax's default also saves the first step of a run with no
        # checkpoint yet; only multiples of save_every (and preemption: JAX's
        # preemption service, when enabled, makes every process save the same step).
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every),
            policies.PreemptionCheckpointingPolicy()]))
    # cleanup_tmp_directories: a run killed (or out of space) in the middle of a save leaves
    # `<step>.orbax-checkpoint-tmp*` behind; Orbax never restores it, but it is debris that
    # holds disk space, so the next run on the directory removes it.
    options.cleanup_tmp_directories = True
    _quiet_failed_saves()
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, train_state: Any, data_iterator: Any = None,
           force: bool = False) -> bool:
    """Saves at `step` if it is a multiple of save_every (or `force`). Returns whether it did.

    A step that is already saved is left as it is (returns False), so a final
    `force=True` save on a save_every boundary is harmless.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(train_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    with self._reporting_full_disk():
      return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def latest_step(self) -> int | None:
    """Latest complete step (after `wait()`, also the last async save), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, step: int | None, abstract_train_state: Any,
              data_iterator: Any = None) -> Any:
    """Returns the train state of `step` (None: the latest) and resumes `data_iterator`.

    Args:
      step: the step to restore; None for the latest.
      abstract_train_state: pytree like the saved state whose leaves are
        `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`; arrays are
        restored with those shardings (any mesh, not only the saving one).
      data_iterator: a fresh iterator of the same pipeline; its state is set
        so that its next batch is the one after the saved step. None skips it.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_train_state)}
    moved = None
    if data_iterator is not None:
      # Default CheckpointManager layout: <directory>/<step>/<item>.
      data = self.directory / str(step) / "data"
      if not data.exists():
        raise ValueError(f"checkpoint step {step} in {self.directory} holds no data "
                         "iterator state (it was saved with data_iterator=None)")
      mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
      if (data / mine).exists():
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:
        moved = _common_data_state(data, step)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if moved is not None:
      data_iterator.set_state(moved)
    return restored["state"]

  def wait(self) -> None:
    """Blocks until pending async saves are written (and old steps removed).

    Raises:
      OSError: a save ran out of disk space (raised once; the save is dropped).
    """
    with self._reporting_full_disk():
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    with self._reporting_full_disk():
      self._manager.wait_until_finished()
      self._manager.close()

  @contextlib.contextmanager
  def _reporting_full_disk(self) -> Iterator[None]:
    """Re-raises an Orbax save that ran out of space as the OSError it is; drops the save.

    An async save fails in a background thread; Orbax raises its TensorStore error (a
    ValueError) at the next save or wait. As an OSError (ENOSPC, EDQUOT, EFBIG) the command
    line reports it in one line like any other full disk. The unfinished step directory is
    removed at once (single-process runs: other processes may still be writing into it), so
    the space it held is free again; a later Checkpointer removes it otherwise.
    """
    try:
      yield
    except Exception as e:  # pylint: disable=broad-exception-caught
      full = _out_of_space(e)
      if full is None:
        raise
      if jax.process_count() == 1 and "://" not in str(self.directory):
        for path in self.directory.glob(f"*{_TMP_MARK}*"):
          shutil.rmtree(path, ignore_errors=True)
      # The failed save's abandoned coroutines are finalized now, while the interpreter can
      # still run their cleanup, not at exit (where each printed "Exception ignored in").
      gc.collect()
      raise OSError(full, os.strerror(full), str(self.directory)) from e

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _common_data_state(data: epath.Path, step: int) -> dict:
  """The data position of a checkpoint saved by another number of processes.

  Process i of n reads batches i::n of the same global order, `batch_size / n`
  rows each, so when all saved the same position (they always do: they step
  together) it is the global position in batches, which any process count
  continues from with the same global batches.
  """
  states = [json.loads(f.read_text()) for f in sorted(data.glob("process_*-of-*.json"))]
  if not states or any(s != states[0] for s in states):
    raise ValueError(f"checkpoint step {step} in {data.parent.parent}: the data iterator states "
                     f"of the processes that saved it differ or are missing ({len(states)} "
                     "found); resume it with the number of processes that saved it")
  return states[0]


def _out_of_space(error: BaseException | None) -> int | None:
  """The errno of an out-of-space failure anywhere in `error`'s chain, or None."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE:
      return error.errno
    match = _OS_ERROR_CODE.search(str(error))
    if match and int(match.group(1)) in _OUT_OF_SPACE:
      return int(match.group(1))
    error = error.__cause__ or error.__context__
  return None


_QUIETED = False


def _quiet_failed_saves() -> None:
  """Silences the noise of a save that ran out of space (once per process).

  When a TensorStore write fails, Orbax logs the error with its traceback from each of
  its threads (absl ERROR records), asyncio logs the write tasks it abandoned, and the
  writes still in flight complete into event loops Orbax already closed (each a
  RuntimeError traceback through sys.unraisablehook, which signals.install_unraisable_hook
  drops). `_reporting_full_disk` reports the failure in one line; the log records that
  carry an out-of-space error are dropped, and only those.
  """
  global _QUIETED
  if _QUIETED:
    return
  _QUIETED = True

  def keep(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return _out_of_space(error) is None

  # Orbax's own records, and asyncio's "Task exception was never retrieved" for the write
  # tasks the failed save abandoned.
  logging.getLogger("absl").addFilter(keep)
  logging.getLogger("asyncio").addFilter(keep)
  signals.install_unraisable_hook()
