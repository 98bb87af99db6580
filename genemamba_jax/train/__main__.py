"""python -m genemamba_jax.train --config configs/X.py[:arg] --workdir DIR [--config.key=value ...]

Pretrains GeneMamba (genemamba_jax/train/loop.py). Re-running the same command
on the same workdir resumes from its latest checkpoint; Ctrl-C or SIGTERM saves
a checkpoint first. `--help` lists every config key with its default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from genemamba_jax import cli, signals


def _run(config, workdir: str) -> list[str]:
  from absl import logging  # pylint: disable=g-import-not-at-top
  from genemamba_jax.train import loop  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  result = loop.train_and_evaluate(config, workdir)
  lines = loop.summary_lines(result, os.path.abspath(workdir))
  if result.get("stopped") == "SIGINT":  # exit status 130, as for any Ctrl-C
    raise signals.Interrupted("\n".join(lines))
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  from genemamba_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from genemamba_jax.train import distributed  # pylint: disable=g-import-not-at-top
  from genemamba_jax.train.loop import TrainingError  # pylint: disable=g-import-not-at-top
  command = cli.ConfigCommand(
      "python -m genemamba_jax.train", __doc__, config_lib.default_config, _run,
      example="configs/demo.py or configs/pretrain.py:layers=48",
      comment_sources=config_lib.comment_sources(),
      errors=(TrainingError, distributed.PeerLost))
  status = command.main(argv)
  if distributed.peer_was_lost():  # JAX's exit barrier would wait for the dead process
    distributed.exit_now(status)
  return status


if __name__ == "__main__":
  sys.exit(main())
