"""Gene2Vec pair benchmark: loading, similarities, distribution distances, outputs."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from genemamba_jax.errors import DataError
from genemamba_jax.evaluate import gene_pairs as gp


def _write_pairs(folder, text_lines, label_lines, split="test"):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{split}_text.txt").write_text("".join(f"{x}\n" for x in text_lines))
  (folder / f"{split}_label.txt").write_text("".join(f"{x}\n" for x in label_lines))
  return folder


def _structured(n_groups=200, dim=32, noise=0.5, seed=0):
  """Synthetic pairs and embeddings where positive partners share a vector.

  Genes G{2k} and G{2k+1} form positive pair k and both embed as v_k + noise;
  each negative pair joins G{2k} with the partner of a different group.
  """
  rng = np.random.default_rng(seed)
  names = [f"G{i}" for i in range(2 * n_groups)]
  shared = rng.standard_normal((n_groups, dim))
  emb = np.repeat(shared, 2, axis=0) + noise * rng.standard_normal((2 * n_groups, dim))
  other = (np.arange(n_groups) + rng.integers(1, n_groups, n_groups)) % n_groups
  pairs = pd.DataFrame({
      "gene_a": [f"G{2 * k}" for k in range(n_groups)] * 2,
      "gene_b": [f"G{2 * k + 1}" for k in range(n_groups)]
                + [f"G{2 * j + 1}" for j in other],
      "label": [1] * n_groups + [0] * n_groups,
  })
  return names, emb, pairs


def test_load_pairs_real_test_split(shared_data):
  pairs = gp.load_pairs(shared_data / "gene2vec_pairs", "test")
  assert list(pairs.columns) == ["gene_a", "gene_b", "label"]
  assert len(pairs) == 21_448
  assert set(pairs["label"].unique()) == {0, 1}
  assert pairs["label"].dtype == np.int64
  assert pairs["label"].value_counts().to_dict() == {1: 10_848, 0: 10_600}
  assert pairs.loc[0].tolist() == ["ALDOB", "SIGMAR1", 0]


def test_random_embeddings_give_chance_auc(shared_data):
  pairs = gp.load_pairs(shared_data / "gene2vec_pairs", "test")
  names = sorted(set(pairs["gene_a"]) | set(pairs["gene_b"]))  # every test symbol
  emb = np.random.default_rng(123).standard_normal((len(names), 64))
  table = gp.pair_benchmark(names, emb, pairs, seed=0)
  assert list(table.index) == ["embedding", "random"]
  assert list(table.columns) == ["pairs_used", "auc", "mean_pos", "mean_neg",
                                 "euclidean", "kl", "js"]
  assert table["pairs_used"].tolist() == [21_448, 21_448]
  for auc in table["auc"]:
    assert abs(auc - 0.5) < 0.03


@pytest.mark.parametrize("metric", ["cosine", "pearson"])
def test_structured_embeddings_separate_pairs(metric):
  names, emb, pairs = _structured()
  table = gp.pair_benchmark(names, emb, pairs, seed=1, metric=metric)
  assert table.loc["embedding", "auc"] > 0.9
  assert abs(table.loc["random", "auc"] - 0.5) < 0.1
  assert table.loc["embedding", "js"] > table.loc["random", "js"]
  assert table.loc["embedding", "mean_pos"] > table.loc["embedding", "mean_neg"]
  # The random baseline is seeded: same seed, same numbers.
  again = gp.pair_benchmark(names, emb, pairs, seed=1, metric=metric)
  pd.testing.assert_frame_equal(table, again)


def test_pair_similarities_by_hand():
  names = ["A", "B", "C", "Z"]
  emb = np.array([[1, 2, 2], [2, 1, -2], [3, 0, 4], [0, 0, 0]], float)
  pairs = pd.DataFrame({"gene_a": ["A", "A", "A", "a", "C", "A"],
                        "gene_b": ["B", "C", "X", "B", "A", "Z"],
                        "label": [1, 0, 1, 1, 0, 1]})
  sim = gp.pair_similarities(names, emb, pairs)
  # "X" is unknown and "a" != "A" (case-sensitive): rows 2 and 3 are dropped.
  assert sim.index.tolist() == [0, 1, 4, 5]
  # |A| = 3, |B| = 3, |C| = 5; A.B = 2 + 2 - 4 = 0; A.C = 3 + 0 + 8 = 11.
  assert sim["similarity"].iloc[:3].tolist() == pytest.approx([0.0, 11 / 15, 11 / 15])
  assert math.isnan(sim["similarity"].iloc[3])  # zero vector: undefined
  assert sim["label"].tolist() == [1, 0, 0, 1]


def test_pearson_by_hand():
  names = ["A", "B"]
  emb = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 7.0]])
  pairs = pd.DataFrame({"gene_a": ["A"], "gene_b": ["B"], "label": [1]})
  # Centred: A = [-1, 0, 1], B = [-7/3, -1/3, 8/3]; A.B = 5, |A| = sqrt(2),
  # |B| = sqrt(114)/3 -> r = 15 / sqrt(228) = 0.99340.
  sim = gp.pair_similarities(names, emb, pairs, metric="pearson")["similarity"].iloc[0]
  assert sim == pytest.approx(15 / math.sqrt(228))
  assert sim == pytest.approx(np.corrcoef(emb)[0, 1])


def test_distribution_distances_by_hand():
  pos = np.array([0.5, 0.5, 0.5, -0.5])
  neg = np.array([-0.5, -0.5, -0.5, 0.5])
  d = gp.distribution_distances(pos, neg, bins=2)
  # Bins [-1, 0), [0, 1]: p = [0.25, 0.75], q = [0.75, 0.25].
  p, q = np.array([0.25, 0.75]), np.array([0.75, 0.25])
  assert d["euclidean"] == pytest.approx(math.sqrt(0.5))  # 0.70711
  # KL = 0.25 ln(1/3) + 0.75 ln 3 = 0.5 ln 3 = 0.54931.
  assert d["kl"] == pytest.approx(0.5 * math.log(3))
  assert d["kl"] == pytest.approx(entropy(p, q))
  # m = [0.5, 0.5]; KL(p||m) = KL(q||m) = 0.25 ln 0.5 + 0.75 ln 1.5 = 0.13081.
  js = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
  assert d["js"] == pytest.approx(js)
  assert d["js"] == pytest.approx(jensenshannon(p, q) ** 2)
  assert d["mean_diff"] == pytest.approx(0.25 - (-0.25))


def test_identical_distributions_have_zero_distance():
  x = np.random.default_rng(0).uniform(-1, 1, 500)
  d = gp.distribution_distances(x, x.copy())
  assert d == pytest.approx({"euclidean": 0.0, "kl": 0.0, "js": 0.0, "mean_diff": 0.0},
                            abs=1e-12)
  # Empty bins of q where p has mass stay finite thanks to the epsilon.
  assert np.isfinite(gp.distribution_distances([0.9], [-0.9])["kl"])
  with pytest.raises(ValueError, match="positive"):
    gp.distribution_distances([], [0.1])


def test_run_gene_pairs_writes_outputs(tmp_path):
  names, emb, pairs = _structured(n_groups=60)
  folder = _write_pairs(tmp_path / "pairs", [f"{a} {b}" for a, b in
                                             zip(pairs["gene_a"], pairs["gene_b"])],
                        pairs["label"].tolist())
  out = tmp_path / "out" / "gene_pairs"
  table = gp.run_gene_pairs(names, emb, folder, out, seed=2)
  assert sorted(p.name for p in out.iterdir()) == ["gene_pairs.csv", "gene_pairs.json",
                                                   "similarity.png"]  # no temp files left
  assert sorted(gp.output_files(out)) == sorted(out.iterdir())  # what the CLI names
  assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  csv = pd.read_csv(out / "gene_pairs.csv", index_col="method")
  pd.testing.assert_frame_equal(csv, table, check_dtype=False, check_names=False)
  report = json.loads((out / "gene_pairs.json").read_text())
  assert report["pairs_total"] == 120 and report["positive_covered"] == 60
  assert report["results"]["embedding"]["auc"] == pytest.approx(table.loc["embedding", "auc"])
  assert report["results"]["random"]["pairs_used"] == 120


@pytest.mark.parametrize("metric, axis", [("cosine", "cosine similarity"),
                                          ("pearson", "Pearson correlation")])
def test_similarity_figure_names_the_metric_and_auc_on_shared_axes(metric, axis):
  names, emb, pairs = _structured(n_groups=60)
  table = gp.pair_benchmark(names, emb, pairs, metric=metric)
  sims = {m: gp.pair_similarities(names, e, pairs, metric=metric)
          for m, e in (("embedding", emb), ("random", np.random.default_rng(0).standard_normal(
              emb.shape)))}
  fig = gp.similarity_figure(sims, metric, table)
  left, right = fig.axes
  assert axis in left.get_xlabel() and axis in right.get_xlabel()
  assert f"ROC-AUC {table.loc['embedding', 'auc']:.3f}" in left.get_title()
  assert f"ROC-AUC {table.loc['random', 'auc']:.3f}" in right.get_title()
  assert left.get_shared_y_axes().joined(left, right)  # heights compare across panels
  assert [t.get_text() for t in left.get_legend().get_texts()] == [
      "positive pairs (n=60)", "negative pairs (n=60)"]


def test_run_gene_pairs_too_few_matches(tmp_path):
  names, emb, pairs = _structured(n_groups=20)
  folder = _write_pairs(tmp_path, [f"{a} {b}" for a, b in
                                   zip(pairs["gene_a"], pairs["gene_b"])],
                        pairs["label"].tolist())
  lower = [n.lower() for n in names]  # wrong case: nothing matches
  with pytest.raises(DataError, match=r"0 of 40 pair-file genes matched") as err:
    gp.run_gene_pairs(lower, emb, folder, tmp_path / "out")
  assert "'G0'" in str(err.value) and "'g0'" in str(err.value)
  assert not (tmp_path / "out").exists()


def test_load_pairs_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match="test_text.txt"):
    gp.load_pairs(tmp_path / "nowhere")
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "test_text.txt").write_text("A B\n")
  with pytest.raises(DataError, match=r"a/test_label.txt"):
    gp.load_pairs(tmp_path / "a")
  _write_pairs(tmp_path / "b", ["A B", "C D"], ["1"])
  with pytest.raises(DataError, match=r"b/test_text.txt has 2 lines but .*test_label.txt has 1"):
    gp.load_pairs(tmp_path / "b")
  _write_pairs(tmp_path / "c", ["A B", "C D E"], ["1", "0"])
  with pytest.raises(DataError, match=r"c/test_text.txt, line 2: expected two gene symbols, got 3"):
    gp.load_pairs(tmp_path / "c")
  _write_pairs(tmp_path / "d", ["A B", ""], ["1", "0"])
  with pytest.raises(DataError, match=r"d/test_text.txt, line 2: .* got 0"):
    gp.load_pairs(tmp_path / "d")
  _write_pairs(tmp_path / "e", ["A B", "C D"], ["1", "2"], split="valid")
  with pytest.raises(DataError, match=r"e/valid_label.txt, line 2: label must be 0 or 1"):
    gp.load_pairs(tmp_path / "e", "valid")


def test_pair_similarities_argument_errors():
  pairs = pd.DataFrame({"gene_a": ["A"], "gene_b": ["B"], "label": [1]})
  with pytest.raises(ValueError, match="metric"):
    gp.pair_similarities(["A", "B"], np.ones((2, 3)), pairs, metric="spearman")
  with pytest.raises(ValueError, match="len\\(gene_names\\) = 2"):
    gp.pair_similarities(["A", "B"], np.ones((3, 3)), pairs)
  with pytest.raises(DataError, match="repeated"):
    gp.pair_similarities(["A", "A"], np.ones((2, 3)), pairs)
