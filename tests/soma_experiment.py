"""A small SOMA experiment written from the Kang PBMCs, for the tests of SOMA input."""

from pathlib import Path

import numpy as np

EMBEDDING = "X_pca10"  # obsm key of the embedding written with the cells


def write_kang(out: Path) -> tuple[str, str, object]:
  """(.h5ad path, SOMA experiment path, the AnnData) under `out`: every 5th Kang cell (312), var
  feature_id = the Ensembl ids, obs is_primary_data False on every 7th cell, X layer "raw" of
  measurement "RNA", obsm[EMBEDDING] a 10-d PCA of the log-normalized counts [cells, 10]."""
  import anndata  # pylint: disable=g-import-not-at-top
  import tiledbsoma.io  # pylint: disable=g-import-not-at-top
  from tests.conftest import _require_shared_data  # pylint: disable=g-import-not-at-top
  adata = anndata.read_h5ad(_require_shared_data() / "kang_pbmc_ifnb.h5ad")[::5].copy()
  adata.var["feature_id"] = adata.var["ensembl_id"].astype(str)
  adata.obs["is_primary_data"] = np.arange(adata.n_obs) % 7 != 0
  adata.obsm[EMBEDDING] = _pca(adata.X.toarray(), 10)
  adata.write_h5ad(out / "kang.h5ad")
  tiledbsoma.io.from_anndata(str(out / "kang_soma"), adata, measurement_name="RNA",
                             X_layer_name="raw")
  return str(out / "kang.h5ad"), str(out / "kang_soma"), adata


def _pca(counts: np.ndarray, dims: int) -> np.ndarray:
  """[cells, dims] float32 principal components of log1p(counts scaled to 1e4 a cell)."""
  x = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
  x -= x.mean(axis=0)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  return (u[:, :dims] * s[:dims]).astype(np.float32)
