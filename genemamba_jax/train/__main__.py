"""python -m genemamba_jax.train --config configs/X.py[:arg] --workdir DIR [--config.key=value ...]

Pretrains GeneMamba (see genemamba_jax/train/loop.py). Re-running the same
command on the same workdir resumes from its latest checkpoint.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from genemamba_jax.cli import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and TensorBoard go")


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from genemamba_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from genemamba_jax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    last = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, DataError, loop.TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  workdir = os.path.abspath(_WORKDIR.value)
  print(f"done: loss {last.get('loss', float('nan')):.4f}, eval loss "
        f"{last.get('eval_loss', float('nan')):.4f}")
  print(f"checkpoints: {workdir}/checkpoints   metrics: {workdir}/metrics.jsonl   "
        f"TensorBoard: tensorboard --logdir {workdir}/tensorboard")
  print(f"next: re-run with a larger --config.num_steps to train on from the last checkpoint; "
        f"the parameters are in {workdir}/checkpoints/<step>/state")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
