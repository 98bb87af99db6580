"""Gene rank reconstruction (paper section 4.3) under two protocols, beside a model-free baseline.

  same_position  the original's: argmax of the logits at position t, from the
                 final state at t. That state has seen token t, so a model can
                 copy its input; the paper's near-perfect scores measure this.
  next_gene      leak-free: position t predicted from the tokens before and
                 after it only (forward[t-1] + reverse[t+1]), the quantity the
                 default `next_gene` objective trains. Needs a separate-streams
                 model; a model trained with the faithful objective has none.
  dataset_order  no model: every cell gets the same sequence, the genes of the
                 evaluated cells ordered by how often (then how early) they
                 occur. What any model must beat without seeing the cell.

Special tokens (<cls>, <eos>) are left out: S_in is the cell's gene tokens,
S_out the predictions at those positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from genemamba_jax import inference
from genemamba_jax.atomic import atomic_path
from genemamba_jax.data import jsonio
from genemamba_jax.evaluate import reconstruction_metrics as rm

PROTOCOLS = ("same_position", "next_gene")


def dataset_order(sentences: Sequence[np.ndarray]) -> np.ndarray:
  """Genes of `sentences` by descending occurrence count, then ascending mean position."""
  tokens = np.concatenate([np.asarray(s) for s in sentences])
  positions = np.concatenate([np.arange(len(s)) for s in sentences])
  genes, inverse, counts = np.unique(tokens, return_inverse=True, return_counts=True)
  mean_position = np.bincount(inverse, weights=positions) / counts
  return genes[np.lexsort((mean_position, -counts))]


def reconstruct(model, sentences: Sequence[np.ndarray], special_ids: Sequence[int], *,
                protocols: Sequence[str] = PROTOCOLS, batch_size: int = 32
                ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, list[np.ndarray]]]:
  """Scores each protocol (and dataset_order) on `sentences`.

  Returns (summary: one row per method, per_cell: one row per method and cell,
  {method: hypotheses}). A protocol the model cannot run gets a row with
  NaN scores and the reason in `note`.
  """
  specials = np.asarray(list(special_ids))
  keep = [~np.isin(s, specials) for s in sentences]
  references = [np.asarray(s)[k] for s, k in zip(sentences, keep)]
  order = dataset_order(references)
  hypotheses = {"dataset_order": [order[:len(r)] for r in references]}
  notes = {"dataset_order": "no model: the same gene order for every cell"}
  for protocol in protocols:
    try:
      predicted = inference.predict_tokens(model, sentences, protocol=protocol,
                                           batch_size=batch_size)
    except ValueError as e:  # next_gene on a mixed-stream model
      notes[protocol] = str(e)
      continue
    hypotheses[protocol] = [p[k] for p, k in zip(predicted, keep)]
    notes[protocol] = ("leak-free: position t from the other positions only"
                       if protocol == "next_gene" else "original: the state at t has seen t")
  rows, cells = [], []
  for method in (*protocols, "dataset_order"):
    if method not in hypotheses:
      rows.append({"method": method, "note": notes[method]})
      continue
    per_cell = rm.sequence_metrics(references, hypotheses[method])
    cells.append(per_cell.assign(method=method, cell=np.arange(len(references))))
    rows.append({"method": method, **rm.summarize(per_cell), "note": notes[method]})
  summary = pd.DataFrame(rows).set_index("method")
  per_cell = pd.concat(cells, ignore_index=True) if cells else pd.DataFrame()
  return summary, per_cell, hypotheses


def sample_cells(n_total: int, n: int, seed: int) -> np.ndarray:
  """Sorted indices of `n` random cells (all when n <= 0 or n >= n_total)."""
  if n <= 0 or n >= n_total:
    return np.arange(n_total)
  return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


def plot_ranks(references, hypotheses: dict[str, list[np.ndarray]], path) -> None:
  """Input rank vs predicted rank (first occurrence) per method: a 2-D histogram panel each."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  methods = list(hypotheses)
  fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 4), squeeze=False)
  for ax, method in zip(axes[0], methods):
    xs, ys = [], []
    for ref, hyp in zip(references, hypotheses[method]):
      first = {}
      for pos, tok in enumerate(hyp.tolist()):
        first.setdefault(tok, pos)
      xs.extend(range(len(ref)))
      ys.extend(first.get(tok, len(hyp)) for tok in ref.tolist())
    ax.hist2d(xs, ys, bins=40, cmap="viridis")
    ax.set_title(method)
    ax.set_xlabel("input rank")
    ax.set_ylabel("predicted rank (missing = length)")
  fig.tight_layout()
  try:
    with atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=110)
  finally:
    plt.close(fig)


def write_outputs(summary: pd.DataFrame, per_cell: pd.DataFrame, out_dir, references,
                  hypotheses) -> None:
  """reconstruction.csv / .json (one row per method), reconstruction_cells.csv, reconstruction.png."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  for name, frame, index in (("reconstruction.csv", summary, True),
                             ("reconstruction_cells.csv", per_cell, False)):
    with atomic_path(out_dir / name) as tmp:
      frame.to_csv(tmp, index=index)
  records = {m: {k: (None if isinstance(v, float) and np.isnan(v) else v)
                 for k, v in row.items()} for m, row in summary.iterrows()}
  jsonio.write_json_atomic(out_dir / "reconstruction.json", records,
                           default=lambda v: v.item() if hasattr(v, "item") else str(v))
  plot_ranks(references, hypotheses, out_dir / "reconstruction.png")
