"""Checkpoints of the train state and of the input pipeline's position, together.

One Orbax step directory holds two items:

  state  the train state pytree (params, opt_state, step, rng), as
         `ocp.args.StandardSave`: each process writes its own shards.
  data   the Grain iterator's state, `grain.checkpoint.CheckpointSave`: one
         small JSON file per process (process_<i>-of-<n>.json).

Restoring both resumes training exactly: the same parameters and the same
next batch as an uninterrupted run.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath


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
    if data_iterator is not None:
      # Default CheckpointManager layout: <directory>/<step>/<item>.
      if not (self.directory / str(step) / "data").exists():
        raise ValueError(f"checkpoint step {step} in {self.directory} holds no data "
                         "iterator state (it was saved with data_iterator=None)")
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    """Blocks until pending async saves are written (and old steps removed)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
