"""label_transfer: kNN votes by hand and against scikit-learn; the command on real Kang cells."""

import logging
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import NearestNeighbors

from genemamba_jax import label_transfer as lt
from genemamba_jax.errors import DataError
from tests.conftest import SHARED_DATA


def _at(degrees) -> np.ndarray:
  """[n, 2] unit vectors at these angles: cosine distance = 1 - cos(angle between)."""
  radians = np.deg2rad(np.asarray(degrees, np.float64))
  return np.stack([np.cos(radians), np.sin(radians)], axis=1)


# Reference cells on the unit circle; the NaN-labelled one sits on the queries and must not vote.
REFERENCE = _at([0, 12, 30, 80, 95, 170, 50])
LABELS = np.array(["A", "A", "A", "B", "B", "C", np.nan], dtype=object)


def test_votes_confidence_and_ties_by_hand():
  # q at 5 deg, k 3: 0, 12, 30 (A A A). q at 60, k 3: 80 (20 deg), 30 (30), 95 (35): B 2 of 3.
  result = lt.transfer_labels(REFERENCE, LABELS, _at([5, 60]), k=3)
  assert list(result["prediction"]) == ["A", "B"]
  np.testing.assert_allclose(result["confidence"], [1.0, 2 / 3])
  # q at 50, k 2: 30 (A, 20 deg) and 80 (B, 30 deg) tie 1-1: A's voter is closer.
  result = lt.transfer_labels(REFERENCE, LABELS, _at([50]), k=2)
  assert list(result["prediction"]) == ["A"] and result["confidence"][0] == 0.5
  # Equal votes at exactly equal distances: the alphabetically first label, whatever the order.
  reference = np.array([[1.0, 1.0], [-1.0, 1.0]])
  for labels in (["zeta", "alpha"], ["alpha", "zeta"]):
    assert lt.transfer_labels(reference, labels, [[0.0, 1.0]], k=2)["prediction"][0] == "alpha"
    flipped = lt.transfer_labels(reference[::-1], labels, [[0.0, 1.0]], k=2)
    assert flipped["prediction"][0] == "alpha"


def test_unknown_threshold_keeps_the_winners_share():
  result = lt.transfer_labels(REFERENCE, LABELS, _at([5, 60, 50]), k=3, unknown_threshold=0.7)
  # 50 deg, k 3: 30 (A), 80 (B), 12 (A, 38 deg): A 2 of 3.
  assert list(result["prediction"]) == ["A", "unknown", "unknown"]
  np.testing.assert_allclose(result["confidence"], [1.0, 2 / 3, 2 / 3])
  at_share = lt.transfer_labels(REFERENCE, LABELS, _at([60]), k=3, unknown_threshold=2 / 3)
  assert at_share["prediction"][0] == "B"  # below the threshold only, not at it


def test_unlabelled_reference_cells_do_not_vote():
  # The NaN cell at 50 deg is the query's nearest; without it the nearest is A at 30.
  assert lt.transfer_labels(REFERENCE, LABELS, _at([50]), k=1)["prediction"][0] == "A"
  labels = LABELS.copy()
  labels[6] = ""
  assert lt.transfer_labels(REFERENCE, labels, _at([50]), k=1)["prediction"][0] == "A"
  labels[6] = "D"
  assert lt.transfer_labels(REFERENCE, labels, _at([50]), k=1)["prediction"][0] == "D"


def test_neighbours_and_votes_equal_scikit_learns():
  rng = np.random.default_rng(0)
  reference, query = rng.normal(size=(300, 12)), rng.normal(size=(80, 12))
  labels = rng.choice(["T", "B", "NK", "mono"], size=300)
  k = 7
  # Independently: cosine ranking = Euclidean ranking of unit vectors.
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  distances, neighbours = NearestNeighbors(n_neighbors=k).fit(unit(reference)).kneighbors(
      unit(query))
  cosine = distances**2 / 2  # |a - b|^2 = 2 - 2 cos for unit vectors
  expected, shares = [], []
  for row, dist in zip(neighbours, cosine):
    votes = pd.Series(labels[row]).value_counts()
    tied = sorted(votes.index[votes == votes.max()],
                  key=lambda label: (dist[labels[row] == label].sum(), label))
    expected.append(tied[0])
    shares.append(votes.max() / k)
  result = lt.transfer_labels(reference, labels, query, k=k)
  assert list(result["prediction"]) == expected
  np.testing.assert_allclose(result["confidence"], shares)
  # k = 1: the label of the single nearest cell by brute-force cosine distance.
  nearest = np.argmax(unit(query) @ unit(reference).T, axis=1)
  assert list(lt.transfer_labels(reference, labels, query, k=1)["prediction"]) == list(
      labels[nearest])


@pytest.mark.parametrize("k, labels, threshold, message", [
    (0, LABELS, None, "--k 0: the number of neighbours must be >= 1"),
    (7, LABELS, None, "--k 7: the reference has only 6 labelled cells"),
    (3, [np.nan] * 7, None, "none of the 7 reference cells has a label"),
    (3, LABELS, 1.5, "--unknown-threshold 1.5: .* between 0 and 1"),
])
def test_bad_arguments_are_data_errors(k, labels, threshold, message):
  with pytest.raises(DataError, match=message):
    lt.transfer_labels(REFERENCE, labels, _at([5]), k=k, unknown_threshold=threshold)


# --- the command on real Kang cells ------------------------------------------------------------


@pytest.fixture(scope="module")
def kang_files(tmp_path_factory):
  """Reference: 150 control cells; query: 90 stimulated cells in a shuffled order."""
  adata = anndata.read_h5ad(SHARED_DATA / "kang_pbmc_ifnb.h5ad")
  rng = np.random.default_rng(0)
  ctrl = np.flatnonzero(adata.obs["condition"] == "ctrl")
  stim = np.flatnonzero(adata.obs["condition"] == "stim")
  folder = tmp_path_factory.mktemp("label_transfer")
  paths = {"reference": folder / "reference.h5ad", "query": folder / "query.h5ad"}
  adata[rng.choice(ctrl, 150, replace=False)].copy().write_h5ad(paths["reference"])
  adata[rng.permutation(stim)[:90]].copy().write_h5ad(paths["query"])
  return paths


def _args(run, files, output, *extra):
  return ["--checkpoint", str(run), "--reference", str(files["reference"]), "--label-column",
          "cell_type", "--query", str(files["query"]), "--output", str(output), *map(str, extra)]


@pytest.mark.slow
def test_cli_writes_every_query_cell_in_input_order(kang_pretrained, kang_files, tmp_path):
  out = tmp_path / "out" / "labels.csv"
  result = subprocess.run([sys.executable, "-m", "genemamba_jax.label_transfer",
                           *_args(kang_pretrained, kang_files, out, "--k", 5,
                                  "--unknown-threshold", 0.6)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "unknown (confidence < 0.6)" in result.stdout and f"wrote {out}" in result.stdout
  table = pd.read_csv(out)
  query = anndata.read_h5ad(kang_files["query"])
  assert list(table.columns) == ["obs_name", "prediction", "confidence"]
  assert list(table["obs_name"]) == list(query.obs_names)
  known = set(query.obs["cell_type"].astype(str)) | {"unknown"}
  assert set(table["prediction"]) <= known
  assert np.all(np.isin(table["confidence"], np.arange(1, 6) / 5))  # shares of 5 votes
  assert np.all((table["prediction"] == "unknown") == (table["confidence"] < 0.6))
  # Better than chance on real cells (5 types): the embeddings carry cell types.
  assert (table["prediction"] == query.obs["cell_type"].astype(str).to_numpy()).mean() > 0.3


@pytest.mark.slow
def test_python_api_and_h5ad_output_agree(kang_pretrained, kang_files, tmp_path):
  from genemamba_jax import rundir  # pylint: disable=g-import-not-at-top
  run = rundir.load_pretrained(kang_pretrained)
  reference = anndata.read_h5ad(kang_files["reference"])
  frame = lt.label_transfer(run, reference, "cell_type", kang_files["query"], k=5,
                            progress=False)
  assert frame.index.name == "obs_name"
  assert list(frame.columns) == ["prediction", "confidence"]
  out = tmp_path / "labelled.h5ad"
  assert lt.main(_args(kang_pretrained, kang_files, out, "--k", 5)) == 0
  labelled = anndata.read_h5ad(out)
  assert list(labelled.obs_names) == list(frame.index)
  assert list(labelled.obs[lt.PREDICTION]) == list(frame["prediction"])
  np.testing.assert_allclose(labelled.obs[lt.CONFIDENCE], frame["confidence"])


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_bad_input_is_one_line_and_writes_nothing(kang_pretrained, kang_files, tmp_path, capsys):
  out = tmp_path / "labels.csv"
  args = _args(kang_pretrained, kang_files, out)
  assert lt.main([*args[:5], "cell_types", *args[6:]]) == 2
  line = _one_error_line(capsys)
  assert "obs has no column 'cell_types' (--label-column)" in line
  assert "cell_type, sample, condition, patient" in line
  unlabelled = anndata.read_h5ad(kang_files["reference"])
  unlabelled.obs["empty"] = pd.Categorical([np.nan] * unlabelled.n_obs, categories=["x"])
  unlabelled.write_h5ad(tmp_path / "unlabelled.h5ad")
  assert lt.main([*args[:3], str(tmp_path / "unlabelled.h5ad"), "--label-column", "empty",
                  *args[6:]]) == 2
  assert "labels none of its 150 cells" in _one_error_line(capsys)
  assert lt.main([*args, "--k", "0"]) == 2
  assert "--k 0" in _one_error_line(capsys)
  assert lt.main([*args[:-1], str(tmp_path / "labels.tsv")]) == 2
  assert "name it OUT.csv or OUT.h5ad" in _one_error_line(capsys)
  assert list(tmp_path.glob("labels*")) == []


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_k_above_the_labelled_cells_names_their_number(kang_pretrained, kang_files, tmp_path,
                                                       capsys):
  assert lt.main([*_args(kang_pretrained, kang_files, tmp_path / "x.csv"), "--k", "151"]) == 2
  line = _one_error_line(capsys)
  assert "--k 151: " in line and "has only 150 labelled cells" in line
  assert not (tmp_path / "x.csv").exists()


def _renamed(path, out, keep: int):
  """A copy of `path` whose genes past the first `keep` get names no vocabulary has."""
  adata = anndata.read_h5ad(path)
  adata.var_names = [g if i < keep else f"NOT_A_GENE_{i}" for i, g in enumerate(adata.var_names)]
  adata.write_h5ad(out)
  return out


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_a_query_with_few_vocabulary_genes_warns(kang_pretrained, kang_files, tmp_path, caplog):
  query = _renamed(kang_files["query"], tmp_path / "few.h5ad", keep=100)
  with caplog.at_level(logging.WARNING):
    lt.label_transfer(kang_pretrained, kang_files["reference"], "cell_type", query, k=5,
                      progress=False)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert f"{query}: 100 of 1,267 genes (7.9%) are in the model's vocabulary" in warnings[0]


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_a_query_without_vocabulary_genes_is_refused(kang_pretrained, kang_files, tmp_path,
                                                     capsys):
  query = _renamed(kang_files["query"], tmp_path / "none.h5ad", keep=0)
  args = _args(kang_pretrained, kang_files, tmp_path / "x.csv")
  assert lt.main([*args[:7], str(query), *args[8:]]) == 2
  assert "none of its 1267 gene ids" in _one_error_line(capsys)
  assert not (tmp_path / "x.csv").exists()


def test_every_option_has_help():
  actions = lt.build_parser()._actions  # pylint: disable=protected-access
  assert [a.dest for a in actions if not a.help] == []
