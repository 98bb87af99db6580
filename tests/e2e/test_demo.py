"""The embedded demo data: exact counts from scanpy's bundled pbmc68k_reduced."""

import anndata
import numpy as np

from genemamba_jax import prepare
from genemamba_jax.data import demo
from genemamba_jax.data import read_tokenized


def test_recovered_counts_equal_scanpys_exact_counts(shared_data):
  ours = demo.pbmc68k_counts()
  exact = anndata.read_h5ad(shared_data / "pbmc68k_reduced_counts.h5ad")
  assert list(ours.obs_names) == list(exact.obs_names)
  assert list(ours.var_names) == list(exact.var_names)
  assert (ours.X != exact.X).nnz == 0
  assert list(ours.obs[demo.LABEL_COLUMN]) == list(exact.obs["bulk_labels"])


def test_prepare_demo_once_then_reused(tmp_path, capsys):
  assert prepare.main(["demo", "--out", str(tmp_path)]) == 0
  out, err = capsys.readouterr()
  assert "700 cells" in out and "CD14+ Monocyte" in out
  # Where the data set goes is said first (the training demo keeps it in a cache folder).
  assert err.startswith(f"demo data: preparing scanpy's pbmc68k_reduced in {tmp_path.resolve()}")
  cells = list(read_tokenized(tmp_path / "tokens"))
  assert len(cells) == 700 and all(c["tokens"][0] == 2 for c in cells)  # <cls> first
  assert len({c["label"] for c in cells}) == 10
  mtime = (tmp_path / "tokens" / "manifest.json").stat().st_mtime_ns
  assert prepare.main(["demo", "--out", str(tmp_path)]) == 0
  assert (tmp_path / "tokens" / "manifest.json").stat().st_mtime_ns == mtime
  assert capsys.readouterr().err.startswith(f"demo data: {tmp_path.resolve()} (prepared earlier")
  assert np.all([len(c["tokens"]) > demo.MIN_GENES for c in cells])
