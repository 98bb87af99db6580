"""The embedded demo data: real PBMC counts from scanpy's bundled `pbmc68k_reduced`.

scanpy ships 700 PBMCs from 10x's 68k PBMC data set (Zheng et al. 2017) with
765 genes; this is the one real single-cell data set every install has. Its
`.raw.X` holds log-normalized values, from which the exact UMI counts are
`round(expm1(raw.X) * obs.n_counts / 1e4)` (newer scanpy releases also keep
them in `layers["counts"]`). `prepare_demo` turns it into a counts .h5ad, a
vocabulary with medians, and a tokenized dataset, once, and reuses them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from genemamba_jax.files import atomic_path, write_h5ad
from genemamba_jax.errors import DataError

LABEL_COLUMN = "bulk_labels"  # 10 PBMC types
MIN_GENES = 100  # only 765 genes were kept in this subset: 200 would drop many cells


def pbmc68k_counts():
  """AnnData [700 cells, 765 genes] of exact UMI counts, with obs labels."""
  import anndata
  import scanpy as sc
  bundled = sc.datasets.pbmc68k_reduced()
  if "counts" in bundled.layers:
    counts = sp.csr_matrix(bundled.layers["counts"], dtype=np.float32)
    var = bundled.var[[]]
  else:
    raw = bundled.raw.to_adata()
    logged = sp.csr_matrix(raw.X, dtype=np.float64)
    scale = bundled.obs["n_counts"].to_numpy(np.float64)[:, None] / 1e4
    exact = sp.csr_matrix(logged.expm1().multiply(scale))
    rounded = np.rint(exact.data)
    # raw.X keeps 3 decimals, so large counts come back up to ~0.1 off an integer.
    if np.max(np.abs(exact.data - rounded), initial=0) > 0.3:
      raise DataError("scanpy's pbmc68k_reduced no longer holds expm1-recoverable counts in .raw; "
                      "this scanpy release is not supported by the demo")
    counts = sp.csr_matrix((rounded.astype(np.float32), exact.indices, exact.indptr), exact.shape)
    var = raw.var[[]]
  obs = bundled.obs[[LABEL_COLUMN, "louvain", "phase"]].copy()
  return anndata.AnnData(counts, obs=obs, var=var)


def prepare_demo(out_dir: str | os.PathLike, announce: bool = True) -> dict[str, Path]:
  """Writes (once) the demo counts, vocabulary and tokens under `out_dir`; returns their paths.

  With `announce`, first prints on stderr where the data set is (the training demo keeps
  it in a cache folder a user would not otherwise know of) and whether it is made now.
  """
  from genemamba_jax import progress
  from genemamba_jax.data import prepare_medians, records, prepare_tokens
  from genemamba_jax.data import vocab as vocab_lib
  from genemamba_jax.data.tokenizer import TokenizeConfig
  out = Path(out_dir)
  paths = {"counts": out / "pbmc68k_counts.h5ad", "vocab": out / "vocab", "tokens": out / "tokens"}
  if announce:
    if (paths["tokens"] / records.MANIFEST_NAME).exists():
      progress.status(f"demo data: {out.resolve()} (prepared earlier; delete the folder to "
                      "rebuild it)")
    else:
      progress.status(f"demo data: preparing scanpy's pbmc68k_reduced in {out.resolve()} "
                      "(once; later runs reuse it)")
  out.mkdir(parents=True, exist_ok=True)
  if not paths["counts"].exists():
    with atomic_path(paths["counts"]) as tmp:
      write_h5ad(pbmc68k_counts(), tmp)
  if not (paths["vocab"] / vocab_lib.VOCAB_FILE).exists():
    prepare_medians.compute_medians([paths["counts"]], paths["vocab"],
                            prepare_medians.MedianConfig(min_genes=MIN_GENES))
  if not (paths["tokens"] / records.MANIFEST_NAME).exists():
    prepare_tokens.tokenize_corpus(
        [paths["counts"]], paths["vocab"], paths["tokens"],
        TokenizeConfig(max_len=2048, cls=True, min_genes=MIN_GENES),
        columns=prepare_tokens.Columns(label=LABEL_COLUMN))
  return paths


def describe(paths: dict[str, Path]) -> list[str]:
  """What `prepare_demo` wrote, for the end-of-run summary."""
  from genemamba_jax.data import records
  manifest = records.load_manifest(paths["tokens"])
  return [f"demo counts: {paths['counts']} (700 PBMCs x 765 genes, scanpy's pbmc68k_reduced)",
          f"vocabulary: {paths['vocab']} ({len(manifest['vocab']):,} tokens)",
          (f"tokens: {paths['tokens']} ({manifest['num_cells']} cells; labels: "
           f"{', '.join(manifest['labels'])})")]
