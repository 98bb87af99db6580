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
from genemamba_jax.files import atomic_path, atomic_paths, write_json
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
                protocols: Sequence[str] = PROTOCOLS, batch_size: int = 32,
                progress: bool = False
                ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, list[np.ndarray]]]:
  """Scores each protocol (and dataset_order) on `sentences`.

  Returns (summary: one row per method, per_cell: one row per method and cell,
  {method: hypotheses}). A protocol the model cannot run gets a row with
  NaN scores and the reason in `note`. `progress` shows a bar per protocol.
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
                                           batch_size=batch_size,
                                           desc=protocol if progress else None)
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


# Panel titles in plain words: what each method is, for a reader who has not read the paper.
TITLES = {"same_position": "original protocol\n(the model sees each gene it predicts)",
          "next_gene": "leak-free\n(each gene predicted from the others)",
          "dataset_order": "no model\n(one gene order for every cell)"}


def _ranks(references, hypotheses) -> tuple[np.ndarray, np.ndarray]:
  """(input ranks, predicted ranks) over all genes of all cells; predicted -1 = missing.

  The predicted rank of a gene is the position of its first occurrence in the hypothesis.
  """
  xs, ys = [], []
  for ref, hyp in zip(references, hypotheses):
    first = {}
    for pos, tok in enumerate(np.asarray(hyp).tolist()):
      first.setdefault(tok, pos)
    xs.extend(range(len(ref)))
    ys.extend(first.get(tok, -1) for tok in np.asarray(ref).tolist())
  return np.asarray(xs, np.int64), np.asarray(ys, np.int64)


def rank_figure(references, hypotheses: dict[str, list[np.ndarray]],
                summary: pd.DataFrame | None = None):
  """Input rank vs predicted rank, a column per method; returns the matplotlib Figure.

  Top row: a 2-D histogram of the genes the prediction contains (log colour scale, one
  colour bar for all panels: a perfect reconstruction is the diagonal). Bottom row: the
  share of genes at each input rank that the prediction leaves out. They get a row of
  their own because, drawn at a made-up "missing" rank, they outnumber the found genes
  and swamp the colour scale.

  Args:
    references: per cell, (L_i,) input gene tokens (S_in).
    hypotheses: {method: per cell, (L_i,) predicted tokens}.
    summary: `reconstruct`'s summary; when given, titles carry each method's Spearman.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.colors import LogNorm  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  # The table's order (protocols, then the baseline), whatever order the dict has.
  order = [*PROTOCOLS, "dataset_order"]
  methods = sorted(hypotheses, key=lambda m: order.index(m) if m in order else len(order))
  longest = max((len(r) for r in references), default=1)
  width = -(-longest // 40)  # whole ranks per bin: fractional bins stripe the diagonal
  edges = np.arange(0, longest + width, width)
  ranks = {m: _ranks(references, hypotheses[m]) for m in methods}
  hists = {m: np.histogram2d(x[y >= 0], y[y >= 0], bins=[edges, edges])[0]
           for m, (x, y) in ranks.items()}
  top = max((h.max() for h in hists.values()), default=1)
  norm = LogNorm(vmin=1, vmax=max(top, 2))
  fig = Figure(figsize=(4.2 * len(methods) + 1.2, 5.6), layout="constrained")
  FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
  axes = fig.subplots(2, len(methods), squeeze=False, sharex=True,
                      gridspec_kw={"height_ratios": [4, 1.3]})
  image = None
  for c, method in enumerate(methods):
    ax, low = axes[0, c], axes[1, c]
    counts = np.where(hists[method] > 0, hists[method], np.nan)  # empty bins stay white
    image = ax.pcolormesh(edges, edges, counts.T, norm=norm, cmap="viridis")
    ax.plot([0, edges[-1]], [0, edges[-1]], color="0.6", lw=0.8, ls="--")
    title = TITLES.get(method, method)
    if summary is not None and method in summary.index and "spearman" in summary.columns:
      title += f"\nSpearman {summary.loc[method, 'spearman']:.2f}"
    ax.set(title=title, xlim=(0, edges[-1]), ylim=(0, edges[-1]), aspect="equal")
    ax.set_ylabel("rank in the prediction" if c == 0 else "")
    x, y = ranks[method]
    missing = np.histogram(x[y < 0], edges)[0] / np.maximum(np.histogram(x, edges)[0], 1)
    low.bar(edges[:-1], 100 * missing, width=np.diff(edges), align="edge", color="tab:red")
    low.set(ylim=(0, 100), xlabel="rank in the cell (input)")
    low.set_ylabel("missing from\nprediction (%)" if c == 0 else "")
  fig.colorbar(image, ax=axes[0, :].tolist(), label="genes in the square (all cells)",
               shrink=0.9)
  return fig


def plot_ranks(references, hypotheses: dict[str, list[np.ndarray]], path,
               summary: pd.DataFrame | None = None) -> None:
  """Writes `rank_figure` as a PNG, atomically."""
  fig = rank_figure(references, hypotheses, summary)
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)


OUTPUTS = ("reconstruction.csv", "reconstruction.json", "reconstruction_cells.csv",
           "reconstruction.png")


def output_files(out_dir) -> list[Path]:
  """The files write_outputs writes into out_dir."""
  return [Path(out_dir) / name for name in OUTPUTS]


def write_outputs(summary: pd.DataFrame, per_cell: pd.DataFrame, out_dir, references,
                  hypotheses) -> list[Path]:
  """reconstruction.csv / .json (one row per method), reconstruction_cells.csv, reconstruction.png.

  Returns the paths written (`output_files`).
  """
  paths = output_files(out_dir)
  records = {m: {k: (None if isinstance(v, float) and np.isnan(v) else v)
                 for k, v in row.items()} for m, row in summary.iterrows()}
  fig = rank_figure(references, hypotheses, summary)
  # The files replace the folder's old ones together, or not at all (a full disk, Ctrl-C).
  with atomic_paths(paths) as (csv, json_file, cells_csv, png):
    summary.to_csv(csv, index=True)
    write_json(json_file, records,
                      default=lambda v: v.item() if hasattr(v, "item") else str(v))
    per_cell.to_csv(cells_csv, index=False)
    fig.savefig(png, format="png", dpi=110)
  return paths
