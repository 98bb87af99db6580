"""python -m genemamba_jax.finetune --config configs/annotate.py --workdir DIR [--config.key=value ...]

Cell type annotation: fine-tunes a pretrained GeneMamba (`--config.init_checkpoint`)
on the labelled cells of an .h5ad (`--config.data.input`, `--config.label_column`),
tokenizing them with the checkpoint's vocabulary. Writes to DIR: metrics.json,
predictions.csv, confusion_matrix.png, predictions.h5ad, metrics.jsonl and the
fine-tuned checkpoint (a run directory for `embed` and `evaluate`). See
genemamba_jax/annotation/.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from genemamba_jax.cli import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "fine-tuning config (configs/annotate.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the outputs and the checkpoint go")


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from genemamba_jax.annotation import loop  # pylint: disable=g-import-not-at-top
  from genemamba_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  try:
    metrics = loop.finetune(_CONFIG.value, _WORKDIR.value)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for split, scores in metrics.items():
    print(f"{split:5s} {scores['n_cells']:6d} cells  accuracy {scores['accuracy']:.4f}  "
          f"macro-F1 {scores['macro_f1']:.4f}")
  print(f"outputs: {_WORKDIR.value}/metrics.json, predictions.csv, confusion_matrix.png, "
        f"predictions.h5ad; checkpoint: {_WORKDIR.value}/checkpoints")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
