"""python -m genemamba_jax.finetune --config configs/finetune.py[:original] --workdir DIR
    [--config.key=value ...]

Cell type annotation: fine-tunes a pretrained GeneMamba (`--config.init_checkpoint`)
on the labelled cells of an .h5ad or SOMA experiment (`--config.data.input`,
`--config.data.measurement`, `--config.data.obs_filter`; `--config.label_column`),
tokenizing them with the checkpoint's vocabulary. Writes to DIR: metrics.json,
predictions.csv, confusion_matrix.png, predictions.h5ad, metrics.jsonl and the
fine-tuned checkpoint (a run directory for `embed`, `evaluate` and
`genemamba_jax.finetune.load_classifier`). Ctrl-C or SIGTERM saves a checkpoint;
re-running the same command resumes. `configs/finetune.py:original` is the
original's protocol. `--help` lists every config key with its default.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from genemamba_jax import cli, signals


def _run(config, workdir: str) -> list[str]:
  from absl import logging  # pylint: disable=g-import-not-at-top
  from genemamba_jax.finetune import run  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  metrics = run.finetune(config, workdir)
  if "stopped" in metrics:
    line = (f"{metrics['stopped']}: saved a checkpoint at step {metrics['step']} in "
            f"{workdir}/train_state; re-run the same command to resume")
    if metrics["stopped"] == "SIGINT":  # exit status 130, as for any Ctrl-C
      raise signals.Interrupted(line)
    return [line]
  lines = [f"{split:5s} {scores['n_cells']:6d} cells  accuracy {scores['accuracy']:.4f}  "
           f"macro-F1 {scores['macro_f1']:.4f}" for split, scores in metrics.items()]
  lines.append(f"outputs: {workdir}/metrics.json, predictions.csv, confusion_matrix.png, "
               f"predictions.h5ad; checkpoint: {workdir}/checkpoints")
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  from genemamba_jax.finetune import config as config_lib  # pylint: disable=g-import-not-at-top
  command = cli.ConfigCommand(
      "python -m genemamba_jax.finetune", __doc__, config_lib.default_config, _run,
      example="configs/finetune.py or configs/finetune.py:original",
      errors=(FloatingPointError,))
  return command.main(argv)


if __name__ == "__main__":
  sys.exit(main())
