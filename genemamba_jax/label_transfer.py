"""python -m genemamba_jax.label_transfer --checkpoint RUN --reference REF.h5ad --label-column COL
    --query QUERY.h5ad --output OUT.csv|OUT.h5ad [--k 15] [--unknown-threshold T]

Reference mapping: labels of annotated reference cells carried over to query
cells through a trained GeneMamba's cell embeddings. Both files are embedded
with the run (its default pooling, as `embed` does); each query cell gets the
majority label of its k nearest labelled reference cells by cosine distance,
and as confidence that label's share of the k votes. Cells whose confidence is
below --unknown-threshold are labelled "unknown".

  OUT.csv   obs_name, prediction, confidence: every query cell, in input order
  OUT.h5ad  a copy of the query with obs['genemamba_prediction'] and
            obs['genemamba_confidence']

Votes are unweighted; a tie between labels goes to the one whose voters are
closer in all (smaller summed distance), then to the alphabetically first.
Reference cells without a label (empty or NaN) take no part.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from genemamba_jax import cli, embed
from genemamba_jax import cell_inputs
from genemamba_jax import rundir
from genemamba_jax.data import soma_reader
from genemamba_jax.data.soma_reader import SomaOptions
from genemamba_jax.errors import DataError

UNKNOWN = "unknown"
PREDICTION, CONFIDENCE = "genemamba_prediction", "genemamba_confidence"  # .h5ad obs columns


def check_k(k: int, n_labelled: int | None = None, where: str = "the reference") -> None:
  """DataError unless 1 <= k <= the labelled reference cells (when their number is known)."""
  if k < 1:
    raise DataError(f"--k {k}: the number of neighbours must be >= 1 (default 15)")
  if n_labelled is not None and k > n_labelled:
    raise DataError(f"--k {k}: {where} has only {n_labelled:,} labelled cells; use a k of at most "
                    "that (or label more reference cells)")


def check_threshold(unknown_threshold: float | None) -> None:
  """DataError unless the threshold is None or a vote share in [0, 1]."""
  if unknown_threshold is not None and not 0.0 <= unknown_threshold <= 1.0:
    raise DataError(f"--unknown-threshold {unknown_threshold}: it is a share of the k votes; "
                    "give a value between 0 and 1 (e.g. 0.5)")


def labelled(labels) -> np.ndarray:
  """[n] bool: which labels count (not None/NaN, not empty or blank text)."""
  labels = pd.Series(np.asarray(labels, dtype=object))
  return (labels.notna() & (labels.astype(str).str.strip() != "")).to_numpy()


def transfer_labels(reference_embedding: np.ndarray, labels, query_embedding: np.ndarray,
                    k: int = 15, unknown_threshold: float | None = None) -> pd.DataFrame:
  """kNN label transfer in embedding space.

  Args:
    reference_embedding: [n_ref, d] cells with known labels.
    labels: [n_ref] their labels (str); None, NaN and "" mark unlabelled cells, left out.
    query_embedding: [n_q, d] cells to label.
    k: neighbours per query cell (1 <= k <= labelled reference cells).
    unknown_threshold: query cells whose winning vote share is below it get "unknown".

  Returns:
    DataFrame with [n_q] rows in query order (a RangeIndex): `prediction` (str),
    the majority label of the k nearest labelled reference cells by cosine
    distance (ties: smaller summed distance of the tied labels' voters, then the
    alphabetically first label), and `confidence` (float), the winner's share of
    the k votes, also for cells labelled "unknown".
  """
  reference = np.asarray(reference_embedding, np.float64)
  query = np.asarray(query_embedding, np.float64)
  labels = np.asarray(labels, dtype=object)
  if reference.ndim != 2 or query.ndim != 2 or reference.shape[1] != query.shape[1]:
    raise ValueError(f"embeddings must be [n_ref, d] and [n_q, d]; got {reference.shape} and "
                     f"{query.shape}")
  if len(labels) != len(reference):
    raise ValueError(f"{len(labels)} labels for {len(reference)} reference cells")
  check_threshold(unknown_threshold)
  keep = labelled(labels)
  if not keep.any():
    raise DataError(f"none of the {len(labels):,} reference cells has a label (all empty or "
                    "NaN); pick the obs column that holds them (--label-column)")
  check_k(k, int(keep.sum()))
  reference, names = reference[keep], labels[keep].astype(str)
  classes, codes = np.unique(names, return_inverse=True)  # sorted: code order is alphabetical
  if len(query) == 0:
    return pd.DataFrame({"prediction": pd.Series([], dtype=object),
                         "confidence": pd.Series([], dtype=np.float64)})
  # Brute force: exact neighbours; cosine distances of high-dimensional embeddings gain nothing
  # from trees.
  search = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(reference)
  distances, neighbours = search.kneighbors(query)  # [n_q, k] each
  votes, closeness = _tally(codes[neighbours], distances, len(classes))
  winner, share = _winners(votes, closeness, k)
  prediction = classes[winner].astype(object)
  if unknown_threshold is not None:
    prediction[share < unknown_threshold] = UNKNOWN
  return pd.DataFrame({"prediction": prediction, "confidence": share})


def _tally(neighbour_codes: np.ndarray, distances: np.ndarray, n_classes: int
           ) -> tuple[np.ndarray, np.ndarray]:
  """Votes [n_q, C] (int) and summed voter distances [n_q, C] per label from [n_q, k] codes."""
  rows = np.repeat(np.arange(len(neighbour_codes)), neighbour_codes.shape[1])
  votes = np.zeros((len(neighbour_codes), n_classes), np.int64)
  summed = np.zeros((len(neighbour_codes), n_classes), np.float64)
  np.add.at(votes, (rows, neighbour_codes.ravel()), 1)
  np.add.at(summed, (rows, neighbour_codes.ravel()), distances.ravel())
  return votes, summed


def _winners(votes: np.ndarray, summed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(winning code [n_q], vote share [n_q]): most votes, then smallest summed distance, then the
  first code (alphabetical)."""
  best = votes.max(axis=1, keepdims=True)
  tied = votes == best
  distance = np.where(tied, summed, np.inf)
  nearest = tied & (distance == distance.min(axis=1, keepdims=True))
  return nearest.argmax(axis=1), best[:, 0] / k


def label_transfer(checkpoint_or_loaded_run: str | os.PathLike | rundir.Pretrained,
                   reference, label_column: str, query, k: int = 15,
                   unknown_threshold: float | None = None, gene_column: str | None = None,
                   gene_map: str | os.PathLike | Mapping[str, str] | None = None,
                   layer: str | None = None, batch_size: int = 64,
                   progress: bool = True, soma: SomaOptions | None = None) -> pd.DataFrame:
  """Embeds reference and query cells with a run, then `transfer_labels`.

  Args:
    checkpoint_or_loaded_run: a run directory, a checkpoints/<step> directory, or a
      `Pretrained` (`pretrained.load_pretrained`).
    reference, query: AnnData objects or paths (.h5ad, 10x folder or .h5, SOMA experiment).
    label_column: the reference's obs column of labels (empty/NaN: unlabelled).
    gene_column, gene_map, layer, soma: how genes and counts are read, for both inputs
      (see `embed`); gene_map is a table's path or a symbol -> id dict.

  Returns:
    DataFrame indexed by the query's obs names (input order), columns
    `prediction` and `confidence` (see `transfer_labels`).
  """
  check_k(k)
  check_threshold(unknown_threshold)
  if batch_size < 1:
    raise DataError(f"--batch-size {batch_size} must be >= 1")
  model = cell_inputs.load_run(checkpoint_or_loaded_run)
  gene_map = cell_inputs.as_gene_map(gene_map)
  reference = cell_inputs.as_source(reference, "reference", layer, gene_column, soma)
  query = cell_inputs.as_source(query, "query", layer, gene_column, soma)
  # Everything that can be refused is, before the cells are embedded.
  labels = cell_inputs.obs_column(reference, label_column, "--label-column")
  n_labelled = int(labelled(labels).sum())
  if n_labelled == 0:
    raise DataError(f"{reference.path}: obs[{label_column!r}] labels none of its {len(labels):,} "
                    "cells (all empty or NaN); pick the column that holds the labels with "
                    "--label-column")
  check_k(k, n_labelled, reference.path)
  pooling = embed.default_pooling(model)
  tokenizer = model.tokenizer(cls=pooling == "cls" or None, gene_map=gene_map)
  for source in (reference, query):
    cell_inputs.check_gene_overlap(tokenizer, source)
  embedded = [embed.embed_source(model, source, poolings=(pooling,), batch_size=batch_size,
                                 gene_map=gene_map, progress=progress)
              for source in (reference, query)]
  result = transfer_labels(embedded[0].cells[pooling], labels.to_numpy(dtype=object),
                           embedded[1].cells[pooling], k, unknown_threshold)
  return result.set_axis(pd.Index(embedded[1].obs_names, name="obs_name"), axis=0)


def summary(result: pd.DataFrame, unknown_threshold: float | None) -> str:
  """One line: cells, how many per predicted label, and the unknown share."""
  counts = result["prediction"].value_counts()
  parts = ", ".join(f"{label} {n:,}" for label, n in counts.items())
  line = f"{len(result):,} query cells: {parts}"
  if unknown_threshold is not None:
    line += (f"; {UNKNOWN} (confidence < {unknown_threshold:g}): "
             f"{(result['prediction'] == UNKNOWN).mean():.1%}")
  return line


def _run(args: argparse.Namespace) -> list[str]:
  suffix = cell_inputs.check_output(args.output, (".csv", ".h5ad"), args.query)
  result = label_transfer(
      args.checkpoint, args.reference, args.label_column, args.query, k=args.k,
      unknown_threshold=args.unknown_threshold, gene_column=args.gene_column,
      gene_map=args.gene_map, layer=args.layer, batch_size=args.batch_size,
      soma=soma_reader.options(args))
  if suffix == ".csv":
    cell_inputs.write_csv(result.reset_index(), args.output)
  else:
    cell_inputs.write_obs_columns(
        args.query, result.index.to_numpy(),
        {PREDICTION: result["prediction"].to_numpy(dtype=str),
         CONFIDENCE: result["confidence"].to_numpy()}, args.output)
  return [summary(result, args.unknown_threshold),
          f"wrote {args.output} (k {args.k}, labels from {args.reference} obs "
          f"{args.label_column!r})"]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m genemamba_jax.label_transfer",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_model_arguments(parser, max_len=None)
  parser.add_argument("--reference", required=True,
                      help=f"annotated cells: {cli.CELL_INPUT}")
  parser.add_argument("--label-column", required=True,
                      help="the reference's obs column of labels (empty or NaN: unlabelled)")
  parser.add_argument("--query", required=True,
                      help="cells to label: .h5ad, 10x folder or .h5, or a SOMA experiment")
  parser.add_argument("--output", required=True,
                      help="OUT.csv (obs_name, prediction, confidence) or OUT.h5ad (the query "
                           "with obs genemamba_prediction, genemamba_confidence)")
  parser.add_argument("--k", type=int, default=15,
                      help="nearest labelled reference cells that vote (default 15)")
  parser.add_argument("--unknown-threshold", type=float, default=None,
                      help="label cells whose winning vote share is below this 'unknown' "
                           "(0-1; default: never)")
  cli.add_input_arguments(parser, inputs="both inputs")
  parser.set_defaults(run=_run)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(build_parser(), argv)


if __name__ == "__main__":
  sys.exit(main())
