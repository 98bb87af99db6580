"""Integration metrics (genemamba_jax.evaluate.integration) on the real Kang PBMC data."""

import hashlib
import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scib_metrics
from matplotlib.image import imread
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import (
  adjusted_rand_score,
  normalized_mutual_info_score,
  silhouette_samples,
  silhouette_score,
)
from sklearn.neighbors import NearestNeighbors

from genemamba_jax.errors import DataError
from genemamba_jax.evaluate import integration

KANG = "kang_pbmc_ifnb.h5ad"
BATCH, LABEL = "patient", "cell_type"
_CACHE: dict = {}  # the Kang run, computed once per session (module-scoped in effect)


def _sha(path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def kang(shared_data, tmp_path_factory):
  """Kang with its own PCA as obsm['X_test'], scored once by run_integration."""
  if not _CACHE:
    adata = anndata.read_h5ad(shared_data / KANG)
    base = integration.baseline_embeddings(adata, batch_column=BATCH, seed=0)
    adata.obsm["X_test"] = base["pca"]
    tmp = tmp_path_factory.mktemp("integration")
    path = tmp / "kang_test.h5ad"
    adata.write_h5ad(path)
    digest = _sha(path)
    out = tmp / "out" / "nested"  # missing folders are created
    table = integration.run_integration(str(path), "X_test", BATCH, LABEL, str(out), seed=0)
    _CACHE.update(adata=adata, base=base, path=path, digest=digest, out=out, table=table)
  return _CACHE


@pytest.mark.slow  # Kang scored by run_integration (kang), ~80 s once
def test_kang_metrics_files(kang):
  out = kang["out"]
  csv = pd.read_csv(out / "metrics.csv", float_precision="round_trip")
  assert csv.columns[0] == "method"
  assert list(csv["method"]) == ["genemamba", "pca", "harmony"]
  csv = csv.set_index("method")
  assert list(csv.columns) == list(integration.METRIC_KEYS)
  assert {"avg_bio", "avg_batch"} <= set(csv.columns)
  assert ((csv.to_numpy() >= 0) & (csv.to_numpy() <= 1)).all(), csv
  for _, row in csv.iterrows():  # the paper's averages, exactly
    assert row["avg_bio"] == float(np.mean([row["nmi"], row["ari"], row["asw_label"]]))
    assert row["avg_batch"] == float(np.mean([row["asw_batch"], row["graph_connectivity"]]))
  # The embedding IS the PCA baseline: same function, same numbers.
  pd.testing.assert_series_equal(csv.loc["genemamba"], csv.loc["pca"], check_names=False)
  pd.testing.assert_frame_equal(csv, kang["table"])
  assert json.loads((out / "metrics.json").read_text()) == {
      m: dict(row) for m, row in csv.to_dict(orient="index").items()}
  # The input is only read; no temp files are left behind.
  assert _sha(kang["path"]) == kang["digest"]
  assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json", "umap.png"]
  assert sorted(integration.output_files(out)) == sorted(out.iterdir())


@pytest.mark.slow  # Kang scored by run_integration (kang), ~80 s once
def test_kang_harmony_mixes_patients(kang):
  table = kang["table"]
  # Harmony corrects for the patient, so patients mix better than in the plain PCA,
  # while labels stay about as separable.
  assert table.loc["harmony", "ilisi"] > table.loc["pca", "ilisi"] + 0.05
  assert table.loc["harmony", "asw_batch"] > table.loc["pca", "asw_batch"]
  assert abs(table.loc["harmony", "avg_bio"] - table.loc["pca", "avg_bio"]) < 0.05
  assert kang["base"]["harmony"].shape == kang["base"]["pca"].shape == (kang["adata"].n_obs, 50)


@pytest.mark.slow  # Kang scored by run_integration (kang), ~80 s once
def test_kang_umap_png(kang):
  path = kang["out"] / "umap.png"
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  image = imread(path)
  assert image.ndim == 3 and image.shape[1] > 1.5 * image.shape[0]  # 3 methods side by side
  assert image[..., :3].std() > 0.05  # something is drawn


def test_umap_figure_puts_methods_side_by_side_with_their_scores():
  rng = np.random.default_rng(0)
  coords = {m: rng.standard_normal((40, 2)) for m in integration.METHODS}
  panels = {"cell_type": np.repeat(["T", "B"], 20), "patient": np.tile(["p1", "p2"], 20)}
  table = pd.DataFrame({"avg_bio": [0.31, 0.56, 0.55], "avg_batch": [0.75, 0.86, 0.81]},
                       index=list(integration.METHODS))
  fig = integration.umap_figure(coords, panels, table)
  axes = fig.axes
  assert len(axes) == 6  # one column per method, a row per colouring
  titles = [ax.get_title() for ax in axes[:3]]
  assert "GeneMamba" in titles[0] and "Avg_bio 0.31, Avg_batch 0.75" in titles[0]
  assert "PCA" in titles[1] and "Avg_bio 0.56" in titles[1]
  assert "Harmony" in titles[2] and "Avg_batch 0.81" in titles[2]
  assert "cell_type" in axes[0].get_ylabel() and "patient" in axes[3].get_ylabel()
  # One legend per row, with that row's categories.
  legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None]
  assert [[t.get_text() for t in leg.get_texts()] for leg in legends] == [["B", "T"],
                                                                          ["p1", "p2"]]


@pytest.mark.slow
def test_cli_names_every_file_and_prints_lisi(kang, tmp_path, capsys):
  from genemamba_jax.evaluate import __main__ as cli
  out = tmp_path / "cli"
  assert cli.main(["integration", "--input", str(kang["path"]), "--embedding", "X_test",
                   "--batch-column", BATCH, "--label-column", LABEL, "--out", str(out)]) == 0
  captured = capsys.readouterr()
  # The first line names the input before the ~20 s of imports; each step is announced.
  assert captured.err.startswith("integration: ") and str(kang["path"]) in captured.err.split(
      "\n")[0]
  assert "baselines" in captured.err and "UMAP" in captured.err
  header = next(line for line in captured.out.splitlines() if "avg_bio" in line).split()
  assert {"ilisi", "clisi", "avg_bio", "avg_batch"} <= set(header)
  written = [line.removeprefix("written: ") for line in captured.out.splitlines()
             if line.startswith("written: ")]
  assert sorted(written) == sorted(str(p) for p in out.iterdir())  # every file, only those
  assert {p.rsplit("/", 1)[-1] for p in written} == {"metrics.csv", "metrics.json", "umap.png"}


@pytest.mark.slow  # Kang scored by run_integration (kang), ~80 s once
def test_one_hot_beats_noise(kang):
  obs = kang["adata"].obs
  codes = pd.Categorical(obs[LABEL]).codes
  rng = np.random.default_rng(0)
  n = len(codes)
  one_hot = 1e-2 * rng.standard_normal((n, 50)).astype(np.float32)
  one_hot[np.arange(n), codes] += 1
  noise = rng.standard_normal((n, 50)).astype(np.float32)
  good = integration.integration_metrics(one_hot, obs[LABEL], obs[BATCH], seed=0)
  bad = integration.integration_metrics(noise, obs[LABEL], obs[BATCH], seed=0)
  for key in ("asw_label", "nmi", "ari", "avg_bio", "clisi"):
    assert good[key] > bad[key] + 0.3, (key, good[key], bad[key])
  assert good["nmi"] > 0.99 and good["ari"] > 0.99
  assert abs(bad["ari"]) < 0.02 and bad["nmi"] < 0.05
  assert 0.4 < bad["asw_label"] < 0.6  # raw silhouette ~0 for random points


@pytest.mark.slow  # Kang scored by run_integration (kang), ~80 s once
def test_metrics_match_independent_computations(kang):
  obs, x = kang["adata"].obs, kang["base"]["pca"]
  labels, batches = obs[LABEL].to_numpy().astype(str), obs[BATCH].to_numpy().astype(str)
  row = kang["table"].loc["pca"]
  # ASW_label: sklearn's silhouette (float64) rescaled to [0, 1].
  assert row["asw_label"] == pytest.approx((silhouette_score(x, labels) + 1) / 2, abs=1e-4)
  # ASW_batch: per label, 1 - |silhouette by batch|, averaged per label then over labels.
  per_label = [np.mean(1 - np.abs(silhouette_samples(x[labels == c], batches[labels == c])))
               for c in np.unique(labels)]
  assert row["asw_batch"] == pytest.approx(np.mean(per_label), abs=1e-4)
  # NMI / ARI: sklearn on the same k-means clusters; at seed 0 they equal scib's own function.
  before = x.copy()
  pred = integration.cluster_labels(x, len(np.unique(labels)), seed=0)
  np.testing.assert_array_equal(x, before)  # k-means must not centre the caller's array
  assert row["nmi"] == pytest.approx(normalized_mutual_info_score(labels, pred), abs=1e-12)
  assert row["ari"] == pytest.approx(adjusted_rand_score(labels, pred), abs=1e-12)
  scib = scib_metrics.nmi_ari_cluster_labels_kmeans(x.copy(), labels)
  assert (row["nmi"], row["ari"]) == pytest.approx((scib["nmi"], scib["ari"]), abs=1e-12)
  # Graph connectivity: exact 15-NN graph (self included) from sklearn, largest
  # strongly connected component per label.
  graph = NearestNeighbors(n_neighbors=15).fit(x).kneighbors_graph(mode="distance")
  graph.setdiag(0)
  fractions = []
  for c in np.unique(labels):
    mask = labels == c
    _, comp = connected_components(graph[mask][:, mask], connection="strong")
    fractions.append(np.bincount(comp).max() / mask.sum())
  assert row["graph_connectivity"] == pytest.approx(np.mean(fractions), abs=0.01)


@pytest.mark.slow  # Kang scored by run_integration (kang), ~80 s once
def test_errors_name_file_and_field(kang, tmp_path):
  path = str(kang["path"])
  with pytest.raises(DataError, match="X_missing") as err:
    integration.run_integration(path, "X_missing", BATCH, LABEL, str(tmp_path / "o"))
  assert path in str(err.value) and "X_test" in str(err.value)  # lists the keys it has
  with pytest.raises(DataError, match="'donor'") as err:
    integration.run_integration(path, "X_test", "donor", LABEL, str(tmp_path / "o"))
  assert path in str(err.value) and BATCH in str(err.value)  # lists the columns
  with pytest.raises(DataError, match="file not found"):
    integration.run_integration(str(tmp_path / "nope.h5ad"), "X_test", BATCH, LABEL,
                                str(tmp_path / "o"))
  assert not (tmp_path / "o").exists()  # nothing written on bad input
  assert issubclass(DataError, ValueError)


@pytest.mark.slow  # Kang scored by run_integration (kang), ~80 s once
def test_bad_inputs_are_refused(kang, tmp_path):
  obs, x = kang["adata"].obs, kang["base"]["pca"]
  labels, batches = obs[LABEL].to_numpy(), obs[BATCH].to_numpy()
  with pytest.raises(DataError, match="rows"):
    integration.integration_metrics(x[:-1], labels, batches)
  nan = x.copy()
  nan[3, 1] = np.nan
  with pytest.raises(DataError, match="NaN"):
    integration.integration_metrics(nan, labels, batches)
  with pytest.raises(DataError, match="at least 2"):
    integration.integration_metrics(x, labels, np.full(len(x), "p1"))
  # A batch column with NaN, from a file.
  small = anndata.AnnData(X=np.ones((6, 3), np.float32),
                          obs=pd.DataFrame({"b": ["a", None, "a", "b", "b", "a"],
                                            "l": list("xyxyxy")}, index=list("abcdef")))
  small.obsm["e"] = np.zeros((6, 2), np.float32)
  path = tmp_path / "small.h5ad"
  small.write_h5ad(path)
  with pytest.raises(DataError, match=r"obs\['b'\] is NaN for 1 cells") as err:
    integration.run_integration(str(path), "e", "b", "l", str(tmp_path / "o"))
  assert str(path) in str(err.value)
  # Counts that are not counts (negative, e.g. already scaled) cannot make the baselines.
  small.obs["b"] = list("ababab")
  small.X[0, 0] = -1
  small.write_h5ad(path)
  with pytest.raises(DataError, match="raw counts") as err:
    integration.run_integration(str(path), "e", "b", "l", str(tmp_path / "o"))
  assert str(path) in str(err.value)
  assert not (tmp_path / "o").exists()
