"""Gene correlation analysis on Gene2Vec positive/negative pairs (paper 4.4, B.2).

A pair scores the similarity of its two genes' embeddings; positive pairs
(label 1) should outscore negative ones (label 0). Separation: ROC AUC and
distances between the two similarity histograms, next to a random baseline.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy
from sklearn.metrics import roc_auc_score

from genemamba_jax.files import atomic_path, atomic_paths
from genemamba_jax.data import genes as genes_lib
from genemamba_jax.errors import DataError
from genemamba_jax.files import write_json

# Added to every histogram bin so KL stays finite where the negative
# histogram is empty; small enough not to move non-degenerate values.
EPS = 1e-10
MIN_PAIRS_PER_LABEL = 10
METRICS = ("cosine", "pearson")


def load_pairs(pairs_dir, split: str = "test") -> pd.DataFrame:
  """Reads `{split}_text.txt` (two gene symbols a line) and `{split}_label.txt`.

  Args:
    pairs_dir: folder of the Gene2Vec pair files.
    split: "train", "valid" or "test" (any name with both files works).

  Returns:
    DataFrame with columns gene_a, gene_b (str), label (int, 0 or 1).

  Raises:
    DataError: a file is missing, the two files have different line counts,
      a text line does not hold exactly two genes, or a label is not 0/1.
  """
  return genes_lib.read_gene_pairs(*(Path(pairs_dir) / f"{split}_{k}.txt"
                                     for k in ("text", "label")))


def _similarity(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
  """Row-wise similarity of (P, D) arrays -> (P,); nan where a norm is 0."""
  if metric == "pearson":
    # Pearson across embedding dimensions = cosine of the centred vectors.
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
  norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(norm > 0, np.einsum("pd,pd->p", a, b) / norm, np.nan)


def pair_similarities(gene_names: Sequence[str], embeddings: np.ndarray,
                      pairs: pd.DataFrame, *, metric: str = "cosine") -> pd.DataFrame:
  """Similarity of each pair whose two genes both have an embedding.

  Symbols match case-sensitively: Gene2Vec uses upper-case HGNC symbols and
  "Cd4" does not match "CD4"; the caller supplies the same spelling.

  Args:
    gene_names: (G,) unique gene symbols, row order of `embeddings`.
    embeddings: (G, D) gene embeddings.
    pairs: DataFrame with gene_a, gene_b, label (see `load_pairs`).
    metric: "cosine", or "pearson" (correlation across the D dimensions).

  Returns:
    The covered rows of `pairs` (original index) plus a float column
    `similarity` in [-1, 1]; nan where an embedding has zero norm (cosine)
    or is constant (pearson).

  Raises:
    ValueError: bad metric or shapes; DataError: duplicate gene names.
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  embeddings = np.asarray(embeddings, dtype=np.float64)
  names = list(gene_names)
  if embeddings.ndim != 2 or embeddings.shape[0] != len(names):
    raise ValueError(f"embeddings must be (G, D) with G = len(gene_names) = "
                     f"{len(names)}, got shape {embeddings.shape}")
  index = {name: i for i, name in enumerate(names)}
  if len(index) != len(names):
    raise DataError(f"gene_names has {len(names) - len(index)} repeated names; one row a gene")
  ia, ib = pairs["gene_a"].map(index), pairs["gene_b"].map(index)
  keep = ia.notna() & ib.notna()
  out = pairs.loc[keep].copy()
  out["similarity"] = _similarity(embeddings[ia[keep].to_numpy(int)],
                                  embeddings[ib[keep].to_numpy(int)], metric)
  return out


def distribution_distances(positive: np.ndarray, negative: np.ndarray,
                           bins: int = 50) -> dict:
  """Distances between the similarity distributions of positive and negative pairs.

  Both are histogrammed on the same `bins` equal bins over [-1, 1] (clipped
  into it: float cosines can pass 1 by an ulp), normalized to sum 1 (p, q).

  Args:
    positive, negative: (P,), (N,) finite similarities of each label's pairs.
    bins: number of histogram bins.

  Returns:
    {"euclidean": ||p - q||_2, "kl": KL(p || q) = scipy.stats.entropy(p + eps,
    q + eps) (nats), "js": JS divergence = jensenshannon(p + eps, q + eps)**2
    (nats; scipy returns the JS distance, its square root), "mean_diff":
    mean(positive) - mean(negative)}, eps = EPS. All 0 for identical samples.
  """
  positive, negative = np.asarray(positive, float), np.asarray(negative, float)
  for name, x in (("positive", positive), ("negative", negative)):
    if x.size == 0 or not np.all(np.isfinite(x)):
      raise ValueError(f"{name} must be a non-empty array of finite values")
  edges = np.linspace(-1.0, 1.0, bins + 1)
  p = np.histogram(np.clip(positive, -1, 1), edges)[0] / positive.size
  q = np.histogram(np.clip(negative, -1, 1), edges)[0] / negative.size
  return {"euclidean": float(np.linalg.norm(p - q)), "kl": float(entropy(p + EPS, q + EPS)),
          "js": float(jensenshannon(p + EPS, q + EPS) ** 2),
          "mean_diff": float(positive.mean() - negative.mean())}


def _benchmark(gene_names, embeddings, pairs, seed, metric):
  """Returns (table, {method: similarities}) for the embedding and random baseline."""
  rng = np.random.default_rng(seed)
  embeddings = np.asarray(embeddings, dtype=np.float64)  # random gets its shape
  rows, sims = {}, {}
  for method, emb in (("embedding", embeddings),
                      ("random", rng.standard_normal(embeddings.shape))):
    sim = pair_similarities(gene_names, emb, pairs, metric=metric)
    sim = sim[np.isfinite(sim["similarity"])]
    pos = sim.loc[sim["label"] == 1, "similarity"].to_numpy()
    neg = sim.loc[sim["label"] == 0, "similarity"].to_numpy()
    if pos.size == 0 or neg.size == 0:
      raise DataError(f"{method}: {pos.size} positive and {neg.size} negative pairs "
                      "have a similarity; both labels are needed")
    dist = distribution_distances(pos, neg)
    rows[method] = {"pairs_used": len(sim), "auc": roc_auc_score(sim["label"], sim["similarity"]),
                    "mean_pos": pos.mean(), "mean_neg": neg.mean(),
                    **{k: dist[k] for k in ("euclidean", "kl", "js")}}
    sims[method] = sim
  return pd.DataFrame.from_dict(rows, orient="index"), sims


def pair_benchmark(gene_names, embeddings, pairs, *, seed=0, metric="cosine") -> pd.DataFrame:
  """Separation of positive and negative pairs by the embedding and a random baseline.

  Args:
    gene_names, embeddings, pairs, metric: as for `pair_similarities`.
    seed: seed of the random-normal (G, D) baseline embeddings.

  Returns:
    DataFrame indexed "embedding", "random" with columns pairs_used (covered
    pairs with a defined similarity), auc (ROC AUC of similarity vs label),
    mean_pos, mean_neg, euclidean, kl, js (see `distribution_distances`).
  """
  return _benchmark(gene_names, embeddings, pairs, seed, metric)[0]


def similarity_figure(similarities: dict[str, pd.DataFrame], metric: str = "cosine",
                      table: pd.DataFrame | None = None) -> Figure:
  """Per method, histograms of the positive and negative pairs' similarity, on shared axes.

  Args:
    similarities: method name -> DataFrame with label and similarity columns.
    metric: the similarity used ("cosine" or "pearson"), named on the x axis.
    table: `pair_benchmark`'s table; when given, each title carries the method's ROC-AUC.

  Returns:
    The Figure (Agg canvas attached), one panel per method, y axes shared so the
    heights compare across panels.
  """
  fig = Figure(figsize=(4.5 * max(len(similarities), 1), 3.6), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, max(len(similarities), 1), squeeze=False, sharey=True)[0]
  edges = np.linspace(-1, 1, 51)
  label = {"cosine": "cosine similarity", "pearson": "Pearson correlation"}.get(metric, metric)
  for i, (ax, (method, sim)) in enumerate(zip(axes, similarities.items())):
    for value, name, color in ((1, "positive pairs", "tab:red"),
                               (0, "negative pairs", "tab:blue")):
      values = sim.loc[sim["label"] == value, "similarity"]
      ax.hist(values, bins=edges, density=True, alpha=0.5, color=color,
              label=f"{name} (n={len(values):,})")
    title = {"embedding": "model's gene embeddings",
             "random": "random embeddings (baseline)"}.get(method, method)
    if table is not None and method in table.index:
      title += f"\nROC-AUC {table.loc[method, 'auc']:.3f} (0.5 = chance)"
    ax.set(title=title, xlabel=f"{label} of the two genes")
    if i == 0:
      ax.set_ylabel("density")
    ax.legend(fontsize=8)
  return fig


def plot_similarity_distributions(similarities: dict[str, pd.DataFrame], path,
                                  metric: str = "cosine",
                                  table: pd.DataFrame | None = None) -> None:
  """Writes `similarity_figure` as a PNG, atomically."""
  fig = similarity_figure(similarities, metric, table)
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)


OUTPUTS = ("gene_pairs.csv", "gene_pairs.json", "similarity.png")


def output_files(out_dir) -> list[Path]:
  """The files run_gene_pairs writes into out_dir."""
  return [Path(out_dir) / name for name in OUTPUTS]


def run_gene_pairs(gene_names, embeddings, pairs_dir, out_dir, *, split="test", seed=0,
                   metric="cosine") -> pd.DataFrame:
  """Runs `pair_benchmark` on a split; writes gene_pairs.{csv,json}, similarity.png.

  `output_files(out_dir)` lists the files written.

  Raises:
    DataError: the pair files are bad, or fewer than MIN_PAIRS_PER_LABEL
      pairs of either label are covered by `gene_names` (the message gives
      how many pair-file genes matched, with examples of both spellings).
  """
  pairs, names = load_pairs(pairs_dir, split), list(gene_names)
  covered = pairs["label"][pairs["gene_a"].isin(names) & pairs["gene_b"].isin(names)]
  n_pos, n_neg = int((covered == 1).sum()), int((covered == 0).sum())
  if min(n_pos, n_neg) < MIN_PAIRS_PER_LABEL:
    pair_genes = pd.unique(pairs[["gene_a", "gene_b"]].to_numpy().ravel())
    raise DataError(
        f"{Path(pairs_dir) / split}_text.txt: only {n_pos} positive and {n_neg} negative "
        f"pairs have both genes among gene_names (need {MIN_PAIRS_PER_LABEL} each); "
        f"{int(np.isin(pair_genes, names).sum())} of {len(pair_genes)} pair-file genes "
        f"matched (case-sensitive). Pair-file symbols look like {list(pair_genes[:5])}, "
        f"gene_names like {names[:5]}")
  table, sims = _benchmark(names, embeddings, pairs, seed, metric)
  # pandas writes NaN as null (JSON has no NaN) and pairs_used as an int.
  results = json.loads(table.to_json(orient="index", double_precision=15))
  fig = similarity_figure(sims, metric, table)
  # The files replace the folder's old ones together, or not at all (a full disk, Ctrl-C).
  with atomic_paths(output_files(out_dir)) as (csv, json_file, png):
    csv.write_bytes(table.to_csv(index_label="method").encode("utf-8"))
    write_json(json_file, {
        "split": split, "metric": metric, "seed": seed, "pairs_total": len(pairs),
        "positive_covered": n_pos, "negative_covered": n_neg, "results": results})
    fig.savefig(png, format="png", dpi=100)
  return table
