"""Multi-batch integration metrics (paper 4.1, B.3) with PCA and Harmony baselines.

An embedding of cells [cells, dims] is scored against cell-type labels and
batches with scib-metrics: AvgBIO = mean(NMI, ARI, ASW_label) measures kept
biology, AvgBatch = mean(ASW_batch, graph connectivity) measures batch mixing;
iLISI and cLISI are reported beside them. The baselines are the PCA of the
log-normalized counts and Harmony on that PCA.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import anndata
import harmonypy
import matplotlib
import numpy as np
import pandas as pd
import scanpy as sc
import scib_metrics
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scib_metrics.nearest_neighbors import jax_approx_min_k
from scib_metrics.utils import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from genemamba_jax.data import soma_reader
from genemamba_jax.files import atomic_paths
from genemamba_jax.errors import DataError
from genemamba_jax.files import write_json

METHODS = ("genemamba", "pca", "harmony")
METRIC_KEYS = ("nmi", "ari", "asw_label", "asw_batch", "graph_connectivity", "ilisi",
               "clisi", "avg_bio", "avg_batch")
# scib (and scib-metrics' Benchmarker) score LISI on 90 neighbours (perplexity
# 30) and the graph metrics on 15; one 90-neighbour search serves both.
LISI_NEIGHBORS = 90


def _codes(values: Sequence, name: str) -> np.ndarray:
  """Integer codes [cells] of a label/batch vector; DataError on missing values."""
  series = pd.Series(np.asarray(values, dtype=object))
  if series.isna().any():
    raise DataError(f"{name}: {int(series.isna().sum())} cells have no value (NaN); "
                    "drop or fill them first")
  codes = pd.Categorical(series.astype(str)).codes.astype(np.int64)
  if len(np.unique(codes)) < 2:
    raise DataError(f"{name}: needs at least 2 distinct values, found {len(np.unique(codes))}")
  return codes


def cluster_labels(embedding: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
  """scib-metrics' JAX k-means clusters [cells] of `embedding` [cells, dims]."""
  # fit() centres its input in place; a copy keeps the caller's array intact.
  return np.asarray(KMeans(n_clusters, seed=seed).fit(np.array(embedding, np.float32)).labels_)


def integration_metrics(embedding: np.ndarray, labels: Sequence, batches: Sequence, *,
                        seed: int = 0, n_neighbors: int = 15) -> dict[str, float]:
  """Scores one embedding for label conservation and batch mixing.

  Args:
    embedding: [cells, dims] cell embedding.
    labels: [cells] cell-type labels.
    batches: [cells] batch of each cell.
    seed: seed of the k-means clustering behind NMI and ARI.
    n_neighbors: kNN size (self included) of the graph-connectivity graph.

  Returns:
    {nmi, ari, asw_label, asw_batch, graph_connectivity, ilisi, clisi, avg_bio,
    avg_batch} as floats; all but ARI lie in [0, 1], higher is better.
  """
  x = np.array(embedding, dtype=np.float32)  # a copy: nothing below touches the input
  if x.ndim != 2 or x.shape[0] < 3:
    raise DataError(f"embedding: expected [cells >= 3, dims], got shape {x.shape}")
  if len(labels) != x.shape[0] or len(batches) != x.shape[0]:
    raise DataError(f"embedding has {x.shape[0]} rows but there are {len(labels)} labels "
                    f"and {len(batches)} batches; they must match cell for cell")
  if not np.isfinite(x).all():
    raise DataError(f"embedding: {int((~np.isfinite(x)).any(1).sum())} rows hold NaN or inf")
  y, b = _codes(labels, "labels"), _codes(batches, "batches")
  if n_neighbors < 2:
    raise DataError(f"n_neighbors must be >= 2, got {n_neighbors}")
  # k-means with k = number of labels (scib-metrics' nmi_ari_cluster_labels_kmeans)
  # rather than the Leiden variant: Leiden scans 10 resolutions over a UMAP
  # connectivity graph, several times the CPU cost. That function fixes the
  # k-means seed at 0, so its two lines are repeated here to honour `seed`.
  pred = cluster_labels(x, len(np.unique(y)), seed)
  nmi = float(normalized_mutual_info_score(y, pred, average_method="arithmetic"))
  ari = float(adjusted_rand_score(y, pred))
  asw_label = float(scib_metrics.silhouette_label(x, y, rescale=True))
  if all(len(np.unique(b[y == c])) < 2 for c in np.unique(y)):
    raise DataError("batches: no label has cells from 2 batches, so batch mixing "
                    "(ASW_batch) is undefined")
  asw_batch = float(scib_metrics.silhouette_batch(x, y, b, rescale=True))
  # Exact kNN: jax_approx_min_k is exact off TPU, takes ~1 s on ~1e3 cells, and
  # skips the ~1 min numba compile of the pynndescent search.
  knn = jax_approx_min_k(x, n_neighbors=min(max(LISI_NEIGHBORS, n_neighbors), x.shape[0]))
  graph = knn.subset_neighbors(min(n_neighbors, knn.n_neighbors))
  out = {
      "nmi": nmi, "ari": ari, "asw_label": asw_label, "asw_batch": asw_batch,
      "graph_connectivity": float(scib_metrics.graph_connectivity(graph, y)),
      "ilisi": float(scib_metrics.ilisi_knn(knn, b)),
      "clisi": float(scib_metrics.clisi_knn(knn, y)),
  }
  out["avg_bio"] = float(np.mean([nmi, ari, asw_label]))
  out["avg_batch"] = float(np.mean([asw_batch, out["graph_connectivity"]]))
  return {k: out[k] for k in METRIC_KEYS}


def _check_adata(adata, where: str, batch_column: str, label_column: str,
                 embedding_key: str | None = None, layer: str | None = None) -> None:
  """DataError naming `where` and the field when the inputs cannot be scored."""
  for column in (batch_column, label_column):
    if column not in adata.obs.columns:
      raise DataError(f"{where}: obs has no column {column!r}; columns: {list(adata.obs.columns)}")
    missing = int(adata.obs[column].isna().sum())
    if missing:
      raise DataError(f"{where}: obs[{column!r}] is NaN for {missing} cells; drop them first")
    if adata.obs[column].nunique() < 2:
      raise DataError(f"{where}: obs[{column!r}] needs at least 2 distinct values, "
                      f"found {adata.obs[column].nunique()}")
  if layer is not None and layer not in adata.layers:
    raise DataError(f"{where}: no layer {layer!r}; layers: {list(adata.layers.keys())}")
  if embedding_key is None:
    return
  if embedding_key not in adata.obsm:
    raise DataError(f"{where}: obsm has no {embedding_key!r}; keys: {list(adata.obsm.keys())}")
  emb = np.asarray(adata.obsm[embedding_key])
  if emb.ndim != 2 or emb.shape[0] != adata.n_obs:
    raise DataError(f"{where}: obsm[{embedding_key!r}] has shape {emb.shape}, "
                    f"expected [{adata.n_obs} cells, dims]")
  if not np.issubdtype(emb.dtype, np.number) or not np.isfinite(emb).all():
    raise DataError(f"{where}: obsm[{embedding_key!r}] is not numeric or holds NaN/inf")


def baseline_embeddings(adata, *, layer: str | None = None, n_pcs: int = 50,
                        batch_column: str, seed: int = 0) -> dict[str, np.ndarray]:
  """PCA and Harmony embeddings of the raw counts in `adata.X` (or `layer`).

  Args:
    adata: AnnData with raw counts [cells, genes]; left unmodified.
    layer: layer holding the counts instead of X.
    n_pcs: number of principal components (capped at min(cells, genes) - 1).
    batch_column: obs column that Harmony corrects for.
    seed: random state of PCA and Harmony.

  Returns:
    {"pca": [cells, n_pcs] PCA of normalize_total(1e4) + log1p counts,
     "harmony": [cells, n_pcs] harmonypy correction of that PCA}.
  """
  counts = adata.layers[layer] if layer is not None else adata.X
  work = anndata.AnnData(X=counts.astype(np.float32, copy=True))  # the input stays as it is
  low = work.X.min()
  if low < 0 or not np.isfinite(work.X.sum()):
    raise DataError(f"{'layer ' + repr(layer) if layer else 'X'}: expected raw counts "
                    f"(finite, >= 0), found minimum {low}")
  sc.pp.normalize_total(work, target_sum=1e4)
  sc.pp.log1p(work)
  sc.tl.pca(work, n_comps=min(n_pcs, min(work.shape) - 1), random_state=seed)
  pca = np.asarray(work.obsm["X_pca"], dtype=np.float32)
  meta = pd.DataFrame({"batch": np.asarray(adata.obs[batch_column]).astype(str)})
  z = np.asarray(harmonypy.run_harmony(pca.astype(np.float64), meta, ["batch"],
                                       random_state=seed, verbose=False).Z_corr)
  if z.shape != pca.shape:  # harmonypy < 2 returned [dims, cells]
    z = z.T
  return {"pca": pca, "harmony": z.astype(np.float32)}


def _scored(adata, embedding_key, batch_column, label_column, layer, n_pcs, seed, baselines,
            where="adata", log=lambda line: None):
  """(table, {method: [cells, dims] embedding}) of integration_table; `log` gets each step."""
  baselines = (baselines,) if isinstance(baselines, str) else tuple(baselines)
  unknown = [m for m in baselines if m not in METHODS[1:]]
  if unknown:
    raise DataError(f"unknown baselines {unknown}; choose from {list(METHODS[1:])}")
  _check_adata(adata, where, batch_column, label_column, embedding_key, layer)
  embeddings = {"genemamba": np.asarray(adata.obsm[embedding_key])}
  labels, batches = adata.obs[label_column].to_numpy(), adata.obs[batch_column].to_numpy()
  try:
    if baselines:
      log(f"baselines: {' and '.join(baselines)} of the log-normalized counts")
      base = baseline_embeddings(adata, layer=layer, n_pcs=n_pcs, batch_column=batch_column,
                                 seed=seed)
      embeddings.update({m: base[m] for m in baselines})
    rows = {}
    for i, (method, emb) in enumerate(embeddings.items()):
      log(f"metrics {i + 1}/{len(embeddings)}: {method}")
      rows[method] = integration_metrics(emb, labels, batches, seed=seed)
  except DataError as e:  # the messages below name the field; add the file
    raise DataError(f"{where}: {e}") from None
  table = pd.DataFrame.from_dict(rows, orient="index", columns=list(METRIC_KEYS))
  table.index.name = "method"
  return table, embeddings


def integration_table(adata, embedding_key: str, batch_column: str, label_column: str, *,
                      layer: str | None = None, n_pcs: int = 50, seed: int = 0,
                      baselines: Sequence[str] = ("pca", "harmony")) -> pd.DataFrame:
  """Metrics of adata.obsm[embedding_key] and of the baselines, one row per method.

  Returns:
    DataFrame indexed by 'method' ("genemamba", then `baselines`), columns METRIC_KEYS.
  """
  return _scored(adata, embedding_key, batch_column, label_column, layer, n_pcs, seed,
                 baselines)[0]


def _umap(embedding: np.ndarray, seed: int) -> np.ndarray:
  """[cells, 2] UMAP of `embedding` [cells, dims] via scanpy on a throwaway AnnData."""
  work = anndata.AnnData(obsm={"X_emb": np.asarray(embedding, dtype=np.float32)},
                         obs=pd.DataFrame(index=np.arange(len(embedding)).astype(str)))
  sc.pp.neighbors(work, use_rep="X_emb", n_neighbors=15, random_state=seed)
  sc.tl.umap(work, random_state=seed)
  return np.asarray(work.obsm["X_umap"])


# Column titles: what each embedding is, in words.
METHOD_TITLES = {"genemamba": "GeneMamba embedding", "pca": "PCA of log-normalized counts",
                 "harmony": "Harmony (batch-corrected PCA)"}


def umap_figure(coords: dict[str, np.ndarray], panels: dict[str, np.ndarray],
                table: pd.DataFrame | None = None) -> Figure:
  """One figure: a column per method, a row per colouring (e.g. cell type, then batch).

  Args:
    coords: {method: [cells, 2] UMAP coordinates}, in column order.
    panels: {obs column: [cells] category per cell}, in row order.
    table: the integration_table; when given, each method's column title carries its
      Avg_bio and Avg_batch, so the picture and the scores are read together.

  Returns:
    The Figure (Agg canvas attached): axes in row-major order; the first row's
    titles are the method (METHOD_TITLES) and "Avg_bio x.xx, Avg_batch x.xx".
  """
  methods, rows = list(coords), list(panels)
  fig = Figure(figsize=(4.2 * len(methods) + 2.8, 4.0 * len(rows)), layout="constrained")
  FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
  axes = fig.subplots(len(rows), len(methods), squeeze=False)
  for r, name in enumerate(rows):
    values = np.asarray(panels[name]).astype(str)
    cats = sorted(pd.unique(values))
    # Qualitative palettes while they have enough colours, then an even spread.
    colors = (matplotlib.colormaps["tab10" if len(cats) <= 10 else "tab20"].colors
              if len(cats) <= 20 else matplotlib.colormaps["turbo"](np.linspace(0, 1, len(cats))))
    for c, method in enumerate(methods):
      ax, xy = axes[r, c], coords[method]
      for cat, color in zip(cats, colors):
        pts = xy[values == cat]
        ax.scatter(pts[:, 0], pts[:, 1], s=3, color=color, label=cat, rasterized=True)
      ax.set(xticks=[], yticks=[], xlabel="UMAP1")
      if r == 0:
        title = METHOD_TITLES.get(method, method)
        if table is not None and method in table.index:
          title += (f"\nAvg_bio {table.loc[method, 'avg_bio']:.2f}, "
                    f"Avg_batch {table.loc[method, 'avg_batch']:.2f}")
        ax.set_title(title)
      if c == 0:
        ax.set_ylabel(f"coloured by {name}\nUMAP2")
    # One legend per row: the categories are the same in every method's panel.
    axes[r, -1].legend(fontsize=7, markerscale=3, frameon=False, loc="center left",
                       bbox_to_anchor=(1, 0.5), ncols=1 + len(cats) // 25, title=name)
  return fig


def output_files(out_dir, plots: bool = True) -> list[Path]:
  """The files run_integration writes into out_dir."""
  names = ["metrics.csv", "metrics.json"] + (["umap.png"] if plots else [])
  return [Path(out_dir) / n for n in names]


def _read(input_path, embedding_key: str, columns: Sequence[str], layer: str | None,
          soma: soma_reader.SomaOptions | None, log: Callable[[str], None]):
  """(AnnData, the layer of its counts) of an .h5ad, or of the cells of a SOMA experiment that
  `soma.obs_filter` selects: X the counts of X layer `layer`, obs `columns`, obsm the
  embedding (read into memory: scoring needs every cell at once)."""
  soma = soma or soma_reader.SomaOptions()
  if soma_reader.is_soma(input_path):
    log(f"reading {input_path} (SOMA experiment, measurement {soma.measurement})")
    source = soma_reader.SomaSource(input_path, layer, None, soma)
    return source.to_anndata(columns, obsm=[embedding_key]), None
  if soma.obs_filter is not None:
    raise DataError(f"{input_path}: --obs-filter applies to SOMA experiments; select the cells "
                    "of an .h5ad before")
  path = Path(input_path)
  if not path.is_file():
    raise DataError(f"{path}: file not found; expected an .h5ad with obsm[{embedding_key!r}] or "
                    "a SOMA experiment")
  log(f"reading {path}")
  try:
    return anndata.read_h5ad(path), layer
  except (OSError, KeyError, ValueError, TypeError) as e:  # what h5py/anndata raise on a bad file
    raise DataError(f"{path}: cannot read it as .h5ad ({e})") from None


def run_integration(input_path: str, embedding_key: str, batch_column: str, label_column: str,
                    out_dir: str, *, layer: str | None = None, n_pcs: int = 50, seed: int = 0,
                    baselines: Sequence[str] = ("pca", "harmony"),
                    plots: bool = True, log: Callable[[str], None] | None = None,
                    soma: soma_reader.SomaOptions | None = None) -> pd.DataFrame:
  """Scores the embedding of an .h5ad or SOMA experiment (read as `soma` says) and baselines;
  writes metrics and UMAPs to out_dir.

  Writes metrics.csv (first column `method`), metrics.json ({method: {metric:
  value}}) and, with `plots`, umap.png (a column per method, rows coloured by
  label and by batch), together (all replaced or none; `output_files` lists them). The input
  file is only read. `log` gets a line as each step starts (the CLI prints them).

  Returns:
    The integration_table DataFrame.
  """
  log = log or (lambda line: None)
  adata, layer = _read(input_path, embedding_key, (batch_column, label_column), layer, soma, log)
  path = input_path
  table, embeddings = _scored(adata, embedding_key, batch_column, label_column, layer, n_pcs,
                              seed, baselines, where=str(path), log=log)
  fig = None
  if plots:
    log(f"UMAPs of {len(embeddings)} embeddings")
    panels = {label_column: adata.obs[label_column].to_numpy(),
              batch_column: adata.obs[batch_column].to_numpy()}
    coords = {method: _umap(emb, seed) for method, emb in embeddings.items()}
    fig = umap_figure(coords, panels, table)
  # The files replace the folder's old ones together, or not at all (a full disk, Ctrl-C).
  with atomic_paths(output_files(out_dir, plots)) as temps:
    table.to_csv(temps[0], index_label="method")
    write_json(temps[1], {m: {k: (None if np.isnan(v) else float(v)) for k, v in row.items()}
                          for m, row in table.to_dict(orient="index").items()})
    if fig is not None:
      fig.savefig(temps[2], format="png", dpi=110)
  return table
