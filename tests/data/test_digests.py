"""GeneDigests: per-gene t-digest medians vs numpy's exact medians, I/O, merging."""

import collections
import functools
import json
import pickle

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import tdigest

from genemamba_jax.data import tdigest_kernels as tk
from genemamba_jax.data.digests import GeneDigests
from genemamba_jax.errors import DataError

REAL_FILES = ["kang_pbmc_ifnb.h5ad", "pbmc68k_reduced_counts.h5ad"]


def normalize(counts: sp.csr_matrix, log1p: bool = False) -> sp.csr_matrix:
  """[cells, genes] counts -> float32 counts / cell total * 1e4 (optionally log1p)."""
  x = sp.csr_matrix(counts, dtype=np.float64)
  total = np.asarray(x.sum(axis=1)).ravel()
  x.data = x.data / np.repeat(total, np.diff(x.indptr)) * 1e4
  if log1p:
    x.data = np.log1p(x.data)
  return sp.csr_matrix(x, dtype=np.float32)


def exact_medians(x: sp.csr_matrix, gene_ids) -> tuple[dict, dict]:
  """numpy median and count of each column's non-zeros (columns with none absent)."""
  c = sp.csc_matrix(x)
  med, n = {}, {}
  for j, g in enumerate(gene_ids):
    v = c.data[c.indptr[j]:c.indptr[j + 1]].astype(np.float64)
    v = v[v != 0]
    if v.size:
      med[g], n[g] = float(np.median(v)), v.size
  return med, n


def columns(values: list[np.ndarray]) -> sp.csr_matrix:
  """CSR with column j holding values[j] (rows 0..len-1)."""
  rows = np.concatenate([np.arange(v.size) for v in values])
  cols = np.concatenate([np.full(v.size, j) for j, v in enumerate(values)])
  shape = (max(v.size for v in values), len(values))
  return sp.csr_matrix((np.concatenate(values).astype(np.float32), (rows, cols)), shape=shape)


def max_rel_error(est: dict, exact: dict, n: dict, min_n: int = 100) -> float:
  errs = [abs(est[g] - m) / m for g, m in exact.items() if n[g] >= min_n]
  assert errs, "no gene has enough values"
  return max(errs)


def build_in_parts(gene_ids, x, parts: int, rng, compression=200.0) -> GeneDigests:
  """Digest of x built as separately made digests over row blocks, each with its
  own column order and gene subset (like different files), then merged."""
  total = GeneDigests(compression)
  for rows in np.array_split(rng.permutation(x.shape[0]), parts):
    keep = np.sort(rng.permutation(x.shape[1])[:max(1, int(0.9 * x.shape[1]))])
    order = rng.permutation(keep)
    block = x[rows]
    # The dropped columns' values must go somewhere: a second digest gets them.
    part_a, part_b = GeneDigests(compression), GeneDigests(compression)
    part_a.update([gene_ids[j] for j in order], block[:, order])
    rest = np.setdiff1d(np.arange(x.shape[1]), keep)
    if rest.size:
      part_b.update([gene_ids[j] for j in rest], block[:, rest])
    total.merge(part_a)
    total.merge(part_b)
  return total


@functools.lru_cache(maxsize=None)
def _read_counts(path) -> tuple[list, sp.csr_matrix]:
  adata = anndata.read_h5ad(path)
  return list(adata.var_names), sp.csr_matrix(adata.X)


@pytest.fixture(params=REAL_FILES)
def real(request, shared_data):
  """(gene ids, [cells, genes] raw UMI counts) of a real h5ad file."""
  return _read_counts(shared_data / request.param)


# ------------------------------------------------------------------- accuracy
def test_real_data_medians_within_one_percent(real):
  ids, counts = real
  for log1p in (False, True):
    x = normalize(counts, log1p)
    exact, n = exact_medians(x, ids)
    whole = GeneDigests()
    for s in range(0, x.shape[0], 256):
      whole.update(ids, x[s:s + 256])
    assert whole.counts() == n
    assert set(whole.medians()) == set(exact)
    assert max_rel_error(whole.medians(), exact, n) < 0.01
    merged = build_in_parts(ids, x, 7, np.random.default_rng(0))
    assert merged.counts() == n
    assert max_rel_error(merged.medians(), exact, n) < 0.01


def test_tdigest_package_round_trip_on_real_data(real):
  ids, counts = real
  x = normalize(counts)
  exact, n = exact_medians(x, ids)
  d = GeneDigests()
  d.update(ids, x)
  ours, dicts = d.medians(), d.digest_dicts()
  assert set(dicts[ids[0]]) == set(tdigest.TDigest().to_dict())
  exact_match = 0
  for g in [g for g in ids if n.get(g, 0) >= 100][::5]:
    theirs = tdigest.TDigest().update_from_dict(dicts[g])
    assert theirs.n == n[g]
    p50 = theirs.percentile(50)
    assert abs(p50 - ours[g]) <= 0.01 * ours[g]
    assert abs(p50 - exact[g]) <= 0.01 * exact[g]
    means = [c["m"] for c in dicts[g]["centroids"]]
    if len(set(means)) == len(means):
      # Without tied runs the package keeps our centroids and interpolates
      # the same way, so the medians agree to rounding.
      assert p50 == pytest.approx(ours[g], rel=1e-12)
      exact_match += 1
  assert exact_match > 0


def test_negative_binomial_cells_split_and_merged():
  rng = np.random.default_rng(1)
  cells, genes = 3000, 300
  mean = rng.lognormal(-1.0, 1.5, genes)
  disp = rng.uniform(0.3, 3.0, genes)
  counts = rng.negative_binomial(disp, disp / (disp + mean * rng.lognormal(0, 0.3, (cells, 1))))
  ids = [f"ENSG{i:05d}" for i in range(genes)]
  x = normalize(sp.csr_matrix(counts))
  exact, n = exact_medians(x, ids)
  assert sum(v >= 100 for v in n.values()) > 100
  d = build_in_parts(ids, x, 20, rng)
  assert d.counts() == n
  assert max_rel_error(d.medians(), exact, n) < 0.01


@pytest.mark.parametrize("compression", [100.0, 200.0])
def test_lognormal_genes_of_all_sizes(compression):
  rng = np.random.default_rng(2)
  sizes = np.geomspace(100, 150_000, 40).astype(int)
  values = [rng.lognormal(rng.normal(0, 2), rng.uniform(0.2, 1.5), s) for s in sizes]
  ids = [f"g{i}" for i in range(len(values))]
  x = columns(values)
  exact, n = exact_medians(x, ids)
  d = GeneDigests(compression)
  for s in range(0, x.shape[0], 10_000):
    d.update(ids, x[s:s + 10_000])
  assert max_rel_error(d.medians(), exact, n) < 0.01
  # Size stays bounded: ~compression / 2 + compression / 3 centroids per gene.
  assert d.num_centroids() < len(ids) * 0.9 * compression


def test_tied_discrete_values_give_numpy_median_exactly():
  rng = np.random.default_rng(3)
  values = [rng.poisson(lam, size) + 1.0
            for lam, size in zip(rng.uniform(0.2, 6, 30), rng.integers(100, 50_000, 30))]
  # Medians right at the boundary between two values, odd and even n.
  values += [np.repeat([1.0, 2.0], [k, k]) for k in (50, 3000)]
  values += [np.repeat([1.0, 2.0, 7.0], [k, k + 1, 10]) for k in (60, 4000)]
  values += [np.repeat([0.5, 3.25], [99, 101]), np.repeat([2.0, 5.0], [20_000, 19_999])]
  ids = [f"t{i}" for i in range(len(values))]
  x = columns(values)
  exact, n = exact_medians(x, ids)
  d = build_in_parts(ids, x, 11, rng)
  assert d.medians() == pytest.approx(exact, rel=1e-12)
  whole = GeneDigests()
  whole.update(ids, x)
  assert whole.medians() == pytest.approx(exact, rel=1e-12)


def test_small_genes_are_kept_exactly():
  rng = np.random.default_rng(4)
  values = [rng.lognormal(0, 1, s).astype(np.float32) for s in (1, 2, 3, 17, 150, 200)]
  values.append(np.array([3.0, 3.0, 1.0, 9.0, 9.0, 9.0], np.float32))
  ids = [f"s{i}" for i in range(len(values))]
  x = columns(values)
  d = GeneDigests(200)
  d.update(ids, x[:2])
  d.update(ids, x[2:])
  exact, _ = exact_medians(x, ids)
  assert d.medians() == pytest.approx(exact, rel=1e-12)
  dicts = d.digest_dicts()
  for g, v in zip(ids, values):
    cents = dicts[g]["centroids"]
    # Every value is its own unit-weight centroid (ties as runs of equal means).
    assert sum(c["c"] for c in cents) == v.size
    np.testing.assert_array_equal(
        np.repeat([c["m"] for c in cents], [c["c"] for c in cents]), np.sort(v))


# ----------------------------------------------------------- counts and input
def test_counts_ignore_zeros_and_unseen_genes():
  x = sp.csr_matrix(np.array([[0.0, 2.0, 0.0], [5.0, 4.0, 0.0]], np.float32))
  x.data[x.data == 5.0] = 0.0  # an explicitly stored zero is not a value
  d = GeneDigests()
  d.update(["A", "B", "C"], x)
  d.update(["D", "B"], sp.csr_matrix(np.array([[1.0, 6.0]])))
  assert d.counts() == {"B": 3, "D": 1}
  assert d.medians() == {"B": 4.0, "D": 1.0}
  assert d.gene_ids() == ["B", "D"]


@pytest.mark.parametrize("ids, values, match", [
    (["A", "B"], np.ones((2, 2)), "scipy.sparse CSR"),
    (["A"], sp.csr_matrix(np.ones((2, 2))), "2 gene ids were given|1 gene ids"),
    (["A", "A"], sp.csr_matrix(np.ones((2, 2))), "repeat"),
    (["A", 7], sp.csr_matrix(np.ones((2, 2))), "non-empty strings"),
    (["A", "B"], sp.csr_matrix(np.array([[1.0, -2.0]])), "'B'.*-2"),
    (["A", "B"], sp.csr_matrix(np.array([[np.nan, 1.0]])), "'A'.*nan"),
    (["A", "B"], sp.csr_matrix(np.array([[1.0, np.inf]])), "'B'.*inf"),
])
def test_bad_input_raises_data_error(ids, values, match):
  with pytest.raises(DataError, match=match):
    GeneDigests().update(ids, values)


def test_other_sparse_formats_and_int_values_are_accepted():
  x = np.array([[1, 0, 3], [2, 5, 0], [4, 0, 0]])
  a, b = GeneDigests(), GeneDigests()
  a.update(["A", "B", "C"], sp.csc_matrix(x))
  b.update(["A", "B", "C"], sp.csr_matrix(x.astype(np.float32)))
  assert a.medians() == b.medians() == {"A": 2.0, "B": 5.0, "C": 3.0}


# ------------------------------------------------------------- files, merging
def test_save_load_round_trip_and_continue(tmp_path):
  rng = np.random.default_rng(5)
  values = [rng.lognormal(0, 1, s) for s in (5, 300, 20_000)] + [rng.poisson(3, 5000) + 1.0]
  ids = ["a", "b", "c", "d"]
  x = columns(values)
  d = GeneDigests(150)
  d.update(ids, x[:3000])
  path = tmp_path / "digests.json"
  d.save(path)
  doc = json.loads(path.read_text())
  assert doc["format"] == "tdigest-dict" and doc["version"] == 1
  assert doc["compression"] == 150
  assert set(doc["digests"]["c"]) == {"n", "delta", "K", "centroids"}
  assert doc["digests"]["c"]["delta"] == pytest.approx(1 / 150)
  assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
  loaded = GeneDigests.load(path)
  assert loaded.compression == 150
  assert loaded.medians() == d.medians() and loaded.counts() == d.counts()
  assert loaded.digest_dicts() == d.digest_dicts()
  # Loading restores everything compression depends on (incl. tied runs):
  # more data after a round trip gives the very same digests.
  loaded.update(ids, x[3000:])
  d.update(ids, x[3000:])
  assert loaded.digest_dicts() == d.digest_dicts()
  d.save(path)  # overwrites in place
  assert GeneDigests.load(path).counts() == d.counts()


def test_json_halves_merge_like_the_whole(tmp_path):
  rng = np.random.default_rng(6)
  values = [rng.lognormal(rng.normal(), 0.8, s) for s in rng.integers(100, 30_000, 25)]
  values += [rng.poisson(2, 10_000) + 1.0]
  ids = [f"h{i}" for i in range(len(values))]
  x = columns(values)
  exact, n = exact_medians(x, ids)
  half = x.shape[0] // 2
  for i, rows in enumerate((slice(0, half), slice(half, None))):
    part = GeneDigests()
    part.update(ids[::-1], x[rows][:, ::-1])
    part.save(tmp_path / f"part{i}.json")
  merged = GeneDigests.load(tmp_path / "part0.json")
  merged.merge(GeneDigests.load(tmp_path / "part1.json"))
  whole = GeneDigests()
  whole.update(ids, x)
  assert merged.counts() == whole.counts() == n
  assert max_rel_error(merged.medians(), exact, n) < 0.01
  assert merged.medians() == pytest.approx(whole.medians(), rel=0.005)


def test_tdigest_package_dicts_load_and_merge(tmp_path):
  rng = np.random.default_rng(7)
  v = rng.lognormal(0, 1, 3000)
  theirs = tdigest.TDigest()
  theirs.batch_update(v)
  doc = {"format": "tdigest-dict", "version": 1, "compression": 100,
         "digests": {"X": theirs.to_dict()}}
  (tmp_path / "t.json").write_text(json.dumps(doc))
  ours = GeneDigests.load(tmp_path / "t.json")
  assert ours.counts() == {"X": 3000}
  assert ours.medians()["X"] == pytest.approx(theirs.percentile(50), rel=1e-12)
  w = rng.lognormal(0, 1, 3000)
  ours.update(["X"], columns([w]))
  assert ours.medians()["X"] == pytest.approx(np.median(np.concatenate([v, w])), rel=0.01)


def test_pickle_ships_compressed_state():
  d = GeneDigests()
  d.update(["A", "B"], sp.csr_matrix(np.array([[1.0, 2.0], [3.0, 0.0]])))
  e = pickle.loads(pickle.dumps(d))
  assert e.medians() == d.medians() == {"A": 2.0, "B": 2.0}
  assert e.counts() == {"A": 2, "B": 1}


@pytest.mark.parametrize("text, match", [
    (None, "cannot read"),
    ("{not json", "not valid JSON"),
    ('{"a": 1}', "not a gene digest file"),
    ('{"format": "tdigest-dict", "version": 9, "compression": 100, "digests": {}}', "version 9"),
    ('{"format": "tdigest-dict", "version": 1, "compression": 100, '
     '"digests": {"G1": {"centroids": [{"m": 1.0}]}}}', "'G1'"),
    ('{"format": "tdigest-dict", "version": 1, "compression": 100, '
     '"digests": {"G1": {"n": 5, "centroids": [{"m": 1.0, "c": 2}]}}}', "corrupt"),
    ('{"format": "tdigest-dict", "version": 1, "compression": 100, '
     '"digests": {"G1": {"centroids": [{"m": -1.0, "c": 2}]}}}', "outside"),
])
def test_load_errors_name_the_file(tmp_path, text, match):
  path = tmp_path / "bad.json"
  if text is not None:
    path.write_text(text)
  with pytest.raises(DataError, match=match) as info:
    GeneDigests.load(path)
  assert "bad.json" in str(info.value)


def test_kernels_merge_sorted_matches_full_sort():
  rng = np.random.default_rng(8)
  make = lambda n: tk.sort_points(tk.Points(
      tk.make_keys(rng.integers(0, 50, n), rng.random(n).astype(np.float32)),
      rng.random(n), np.ones(n), np.ones(n, bool)))
  a, b = make(1000), make(300)
  merged = tk.merge_sorted(a, b)
  np.testing.assert_array_equal(merged.key, np.sort(np.concatenate([a.key, b.key])))
  assert merged.weight.sum() == 1300


@pytest.mark.parametrize("compression", [50.0, 200.0])
def test_kernels_keep_runs_heavier_than_a_bin_pure(compression):
  """A run of >= 2 equal values spanning >= 1 unit of k is never averaged with others."""
  rng = np.random.default_rng(9)
  genes = 40
  gene = np.repeat(np.arange(genes), rng.integers(300, 5000, genes))
  value = np.round(rng.lognormal(0, 0.4, gene.size), 2).astype(np.float32)
  points = tk.points_from_keys(tk.make_keys(gene, value))
  out = tk.compress(points, compression)
  g = points.gene()
  start = np.searchsorted(g, np.arange(genes))
  total = np.bincount(g, weights=points.weight)
  hi = (np.cumsum(points.weight) - np.cumsum(total)[g] + total[g]) / total[g]
  lo = hi - points.weight / total[g]
  heavy = (tk.scale(hi, compression) - tk.scale(lo, compression) >= 1) & (points.weight >= 2)
  assert heavy.sum() > 20 and start.size == genes
  # Each heavy run's value keeps exactly its weight in pure centroids.
  pure_weight = collections.Counter()
  for k, w in zip(out.key[out.pure].tolist(), out.weight[out.pure].tolist()):
    pure_weight[k] += w
  for k, w in zip(points.key[heavy].tolist(), points.weight[heavy].tolist()):
    assert pure_weight[k] == w
  assert out.weight.sum() == points.weight.sum()
