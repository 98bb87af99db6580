"""python -m genemamba_jax.predict --checkpoint FINETUNED_RUN --input NEW.h5ad
    --output OUT.csv|OUT.h5ad

Cell types for new cells from a fine-tuned GeneMamba (the --workdir of
`genemamba_jax.finetune`): every cell of the input, in input order, is
tokenized as the run was trained and classified.

  OUT.csv   obs_name, prediction, confidence (the predicted type's probability)
  OUT.h5ad  a copy of the input with obs['genemamba_prediction'],
            obs['genemamba_confidence'] and the fine-tuned cell embeddings in
            obsm['X_genemamba']

The classifier is the one `finetune` scored: on its own input, predict gives the
`pred` and `confidence` of its predictions.csv. From Python: `genemamba_jax.load(run).predict`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from genemamba_jax import cell_inputs, cli, inference, rundir
from genemamba_jax.data import soma_reader
from genemamba_jax import progress as progress_lib
from genemamba_jax.errors import DataError

PREDICTION, CONFIDENCE = "genemamba_prediction", "genemamba_confidence"  # .h5ad obs columns
OBSM_KEY = "X_genemamba"
# Cells per call of `Classifier.predict`, in batches: the bar moves between calls. A multiple of
# the batch size, so the batches (and the numbers) are those of one call over all cells.
CHUNK_BATCHES = 8


def _load_classifier(path: str | os.PathLike):
  """The one place that reaches into fine-tuning: a fine-tuned run -> its `Classifier`."""
  from genemamba_jax.finetune import load_classifier  # pylint: disable=g-import-not-at-top
  return load_classifier(path)


def is_finetuned(path: str | os.PathLike) -> bool:
  """Whether `path` (a run or checkpoint directory, see `rundir.resolve_checkpoint`) was
  written by `finetune` (it has a classifier)."""
  return (rundir.resolve_checkpoint(path).run_dir / rundir.TASK_FILE).is_file()


def load_classifier(path: str | os.PathLike):
  """A fine-tuned run -> its `Classifier`; DataError saying so for a pretrained-only run."""
  if not is_finetuned(path):
    raise DataError(f"{rundir.resolve_checkpoint(path).run_dir}: a pretrained run, without a "
                    "classifier; predicting cell types needs a fine-tuned run (the --workdir of "
                    "genemamba_jax.finetune); embed or label_transfer work on this one")
  return _load_classifier(path)


@dataclasses.dataclass
class Predictions:
  """What `predict_source` gives, every array in the input's cell order."""
  obs_names: np.ndarray  # [cells] str
  prediction: np.ndarray  # [cells] object: class names
  confidence: np.ndarray  # [cells] float32: the predicted class's probability
  probabilities: np.ndarray  # [cells, classes] float32
  embeddings: np.ndarray  # [cells, d_model] float32: the fine-tuned cell embeddings
  classes: list[str]

  def frame(self) -> pd.DataFrame:
    """DataFrame indexed by obs_name: prediction, confidence."""
    return pd.DataFrame({"prediction": self.prediction, "confidence": self.confidence},
                        index=pd.Index(self.obs_names, name="obs_name"))


def predict_source(classifier, source, *, batch_size: int = 64, max_len: int | None = None,
                   gene_map: Mapping[str, str] | None = None, progress: bool = True
                   ) -> Predictions:
  """Classifies every cell of a count source (`cell_inputs.as_source`) with a `Classifier`."""
  if batch_size < 1:
    raise DataError(f"--batch-size {batch_size} must be >= 1")
  tokenizer = classifier.run.tokenizer(max_len=max_len, gene_map=gene_map)
  cell_inputs.check_gene_overlap(tokenizer, source)
  sentences, obs_names, _ = inference.tokenize_all(tokenizer, source,
                                                   desc="tokenizing" if progress else None)
  d, classes = classifier.run.config.d_model, list(classifier.classes)
  labels = [np.zeros((0,), object)]
  probabilities = [np.zeros((0, len(classes)), np.float32)]
  embeddings = [np.zeros((0, d), np.float32)]
  chunk = batch_size * CHUNK_BATCHES
  with progress_lib.bar(len(sentences), "predicting" if progress else None, "cells") as bar:
    for start in range(0, len(sentences), chunk):
      rows = sentences[start:start + chunk]
      label, probability, embedding = classifier.predict(rows, batch_size)
      labels.append(label)
      probabilities.append(np.asarray(probability, np.float32))
      embeddings.append(np.asarray(embedding, np.float32))
      bar.update(len(rows))
  probabilities = np.concatenate(probabilities)
  return Predictions(np.asarray(obs_names, dtype=str), np.concatenate(labels).astype(object),
                     probabilities.max(axis=1, initial=0.0), probabilities,
                     np.concatenate(embeddings), classes)


def write_output(result: Predictions, output: str | os.PathLike,
                 input_path: str | os.PathLike | None = None) -> None:
  """OUT.csv (obs_name, prediction, confidence) or OUT.h5ad (a copy of the .h5ad input with
  obs and obsm added), atomically."""
  suffix = cell_inputs.check_output(output, (".csv", ".h5ad"), input_path)
  if suffix == ".csv":
    cell_inputs.write_csv(result.frame().reset_index(), output)
  else:
    cell_inputs.write_obs_columns(
        input_path, result.obs_names,
        {PREDICTION: result.prediction.astype(str), CONFIDENCE: result.confidence}, output,
        obsm={OBSM_KEY: result.embeddings})


def summary(result: Predictions) -> str:
  """One line: cells, how many per predicted type, the mean confidence."""
  counts = pd.Series(result.prediction).value_counts()
  parts = ", ".join(f"{label} {n:,}" for label, n in counts.items())
  mean = float(result.confidence.mean()) if len(result.confidence) else float("nan")
  return f"{len(result.obs_names):,} cells: {parts or 'none'}; mean confidence {mean:.3f}"


def _run(args: argparse.Namespace) -> list[str]:
  # Everything that can be refused is, before the model is loaded.
  cell_inputs.check_output(args.output, (".csv", ".h5ad"), args.input)
  if args.batch_size < 1:
    raise DataError(f"--batch-size {args.batch_size} must be >= 1")
  source = cell_inputs.as_source(args.input, "--input", args.layer, args.gene_column,
                                  soma=soma_reader.options(args))
  classifier = load_classifier(args.checkpoint)
  result = predict_source(classifier, source, batch_size=args.batch_size, max_len=args.max_len,
                          gene_map=cell_inputs.as_gene_map(args.gene_map))
  write_output(result, args.output, args.input)
  return [summary(result), f"wrote {args.output} ({len(result.classes)} cell types of "
                           f"{classifier.run.checkpoint.run_dir})"]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m genemamba_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_model_arguments(parser, checkpoint="a fine-tuned run directory (the --workdir of "
                          "genemamba_jax.finetune) or one of its checkpoints/<step>",
                          max_len="the fine-tuning length")
  parser.add_argument("--input", required=True, help=f"cells to label: {cli.CELL_INPUT}")
  parser.add_argument("--output", required=True,
                      help="OUT.csv (obs_name, prediction, confidence) or OUT.h5ad (the input "
                           "with obs genemamba_prediction, genemamba_confidence and obsm "
                           "X_genemamba)")
  cli.add_input_arguments(parser)
  parser.set_defaults(run=_run)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(build_parser(), argv)


if __name__ == "__main__":
  sys.exit(main())
