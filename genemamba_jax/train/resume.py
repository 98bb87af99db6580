"""Re-running `train` on a workdir: resume it, or refuse it before anything is written.

A workdir with a finished checkpoint resumes only with the settings that
produced it: the same model architecture, vocabulary, objective, data, batch
size and seed (anything else would not be the same run, and Orbax would fail
half-way through restoring). Run-time model keys (dtype, scan backend, remat),
the optimizer, the mesh and `num_steps` may change.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

from genemamba_jax import rundir
from genemamba_jax import files
from genemamba_jax.errors import DataError
from genemamba_jax.model import GeneMambaConfig
from genemamba_jax.train.warm_start import RUN_TIME_KEYS

CONFIG_FILE = "config.json"
# config.json keys a resumed run must keep.
FIXED_KEYS = ("seed", "batch_size", "objective", "data.path", "data.max_len",
              "data.eval_fraction", "mlm_probability")


def latest_step(workdir: str | os.PathLike) -> int | None:
  """The step of the newest finished checkpoint in `workdir`, or None (nothing is created)."""
  steps = rundir.finished_steps(Path(workdir) / rundir.CHECKPOINTS)
  return max(steps) if steps else None


def _get(config: Mapping, dotted: str):
  for part in dotted.split("."):
    if not isinstance(config, Mapping) or part not in config:
      return None
    config = config[part]
  return config


def check_resumable(workdir: str | os.PathLike, config: Mapping, model: GeneMambaConfig,
                    vocab: Mapping[str, int]) -> None:
  """DataError naming every setting that differs from the run already in `workdir`.

  Args:
    config: the new run's config as a plain dict (ConfigDict.to_dict()).
    model: the new run's model; vocab: its token -> id.
  """
  workdir = Path(workdir)
  if latest_step(workdir) is None:
    return
  saved_config = files.read_json(workdir / CONFIG_FILE, "use a new --workdir")
  saved_model = rundir.load_model_config(workdir)
  differences = []
  for key in FIXED_KEYS:
    old, new = _get(saved_config, key), _get(config, key)
    if old != new:
      differences.append(f"{key} {old!r} -> {new!r}")
  for field in dataclasses.fields(GeneMambaConfig):
    old, new = getattr(saved_model, field.name), getattr(model, field.name)
    if field.name not in RUN_TIME_KEYS and old != new:
      differences.append(f"model.{field.name} {old!r} -> {new!r}")
  saved_vocab = files.read_json(workdir / rundir.VOCAB_DIR / "vocab.json", "use a new --workdir")
  if saved_vocab != dict(vocab):
    differences.append("the corpus's vocabulary")
  if differences:
    raise DataError(f"{workdir}: holds a run with other settings ({'; '.join(differences)}); "
                    "resume it with its own settings (its config.json), or use a new --workdir")


def write_config(workdir: str | os.PathLike, config_json: str) -> None:
  """config.json of the run, atomically (a killed run never leaves half of it)."""
  files.write_json_atomic(Path(workdir) / CONFIG_FILE, json.loads(config_json))
