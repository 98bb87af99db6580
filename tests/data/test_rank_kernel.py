"""The fused numba kernel equals the numpy path (qc + ranking) token for token."""

import collections
import types

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from genemamba_jax.data import rank_kernel
from genemamba_jax.data import genes as genes_lib
from genemamba_jax.data import qc
from genemamba_jax.data import rank_reference
from genemamba_jax.data import safe_pickle
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.data.readers import AnnDataSource, CellChunk
from genemamba_jax.data.tokenizer import CellTokenizer, TokenizeConfig


def _numpy_path(counts, mapper, inverse_median, target_tokens, keep_rows, min_genes, max_genes,
                log1p):
  """What the kernel replaces: qc.normalize_chunk + rank_reference.rank_genes + token lookup."""
  n = counts.shape[0]
  chunk = CellChunk(counts, np.arange(n).astype(str),
                    pd.DataFrame({qc.PRIMARY_COLUMN: np.asarray(keep_rows, bool)}), 0)
  source = types.SimpleNamespace(path="<test>", layer=None, gene_ids=None)
  cells = qc.normalize_chunk(chunk, source, mapper, qc.QCConfig(min_genes, True, log1p),
                             collections.Counter())
  columns, offsets = rank_reference.rank_genes(cells.values, inverse_median, max_genes)
  kept = np.zeros(n, bool)
  kept[cells.obs_names.astype(int)] = True
  return target_tokens[columns], offsets, kept


def _assert_same(counts, mapper, inverse_median, target_tokens, keep_rows=None, min_genes=1,
                 max_genes=2048, log1p=False):
  keep_rows = np.ones(counts.shape[0], bool) if keep_rows is None else keep_rows
  got = rank_kernel.rank_tokenize(counts.data, counts.indices, counts.indptr,
                                  mapper.column_to_target, inverse_median, target_tokens,
                                  keep_rows, min_genes, max_genes, log1p)
  want = _numpy_path(counts, mapper, inverse_median, target_tokens, keep_rows, min_genes,
                     max_genes, log1p)
  for name, g, w in zip(("tokens", "offsets", "kept"), got, want):
    assert g.dtype == w.dtype, name
    assert np.array_equal(g, w), name
  return got


def _problem(seed, n_cells, n_genes, n_targets, density, dtype=np.float32, duplicates=True,
             shuffle=False, index_dtype=np.int32):
  """Random NB counts with explicit zeros; source ids unmapped, duplicated, out of order."""
  rng = np.random.default_rng(seed)
  if duplicates:  # drawn with replacement: repeated ids; ids >= n_targets are unmapped
    ids = [f"G{i}" for i in rng.integers(0, int(n_targets * 1.2), n_genes)]
  else:
    ids = [f"G{i}" for i in rng.permutation(int(n_targets * 1.2))[:n_genes]]
  # Target columns in an order unrelated to the source's.
  targets = {f"G{i}": int(t) for i, t in enumerate(rng.permutation(n_targets))}
  counts = sp.random(n_cells, n_genes, density, format="csr", random_state=seed)
  counts.data = rng.negative_binomial(0.8, 0.2, counts.nnz).astype(dtype)  # ~20% explicit 0
  if shuffle:  # CSR rows in any column order
    for i in range(n_cells):
      lo, hi = counts.indptr[i], counts.indptr[i + 1]
      p = lo + rng.permutation(hi - lo)
      counts.indices[lo:hi], counts.data[lo:hi] = counts.indices[p], counts.data[p]
    counts.has_sorted_indices = False
  counts.indices = counts.indices.astype(index_dtype)
  inverse_median = 1.0 / rng.lognormal(0.0, 1.0, n_targets)
  target_tokens = (rng.permutation(n_targets) + 5).astype(np.int32)
  return counts, qc.GeneMapper(ids, targets), inverse_median, target_tokens, rng


@pytest.mark.parametrize("n_cells,n_genes,n_targets,density", [
    (1, 60, 50, 0.5), (50, 300, 250, 0.01), (37, 300, 250, 0.3), (200, 2000, 1500, 0.4),
    (64, 5000, 4000, 0.05)])
@pytest.mark.parametrize("dtype,index_dtype", [(np.float32, np.int32), (np.float64, np.int64)])
def test_random_chunks(n_cells, n_genes, n_targets, density, dtype, index_dtype):
  counts, mapper, inv, tokens, _ = _problem(n_cells, n_cells, n_genes, n_targets, density, dtype,
                                            index_dtype=index_dtype)
  assert mapper.num_duplicated > 0 and np.any(mapper.column_to_target < 0)
  assert np.any(counts.data == 0)
  _assert_same(counts, mapper, inv, tokens)


@pytest.mark.parametrize("log1p", [False, True])
@pytest.mark.parametrize("duplicates,shuffle", [(True, True), (False, False), (False, True)])
def test_qc_truncation_and_row_order(log1p, duplicates, shuffle):
  counts, mapper, inv, tokens, rng = _problem(3, 150, 3000, 2500, 0.3, np.float64, duplicates,
                                              shuffle)
  keep_rows = rng.random(150) > 0.2
  lengths = np.diff(_assert_same(counts, mapper, inv, tokens)[1])
  min_genes = int(np.median(lengths))  # drops about half
  tokens_, offsets, kept = _assert_same(counts, mapper, inv, tokens, keep_rows, min_genes,
                                        max_genes=int(lengths.min()) // 2, log1p=log1p)
  assert 0 < kept.sum() < keep_rows.sum() and not np.any(kept & ~keep_rows)
  assert np.all(np.diff(offsets) == int(lengths.min()) // 2)
  for max_genes in (0, 1, 17):
    _assert_same(counts, mapper, inv, tokens, keep_rows, 0, max_genes, log1p)


def test_exact_ties_keep_row_order():
  # Equal medians and counts in {1, 2}: hundreds of exactly equal scores per row.
  counts, mapper, _, tokens, rng = _problem(4, 50, 1500, 1200, 0.5, shuffle=True)
  counts.data = rng.integers(0, 3, counts.nnz).astype(np.float32)
  inv = np.full(1200, 0.5)
  _assert_same(counts, mapper, inv, tokens)
  _assert_same(counts, mapper, inv, tokens, max_genes=100, log1p=True)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # numpy path's float32 keys
def test_extreme_score_range():
  # Scores from 0 to inf: the radix key spans all 32 bits.
  counts, mapper, inv, tokens, rng = _problem(9, 40, 1000, 800, 0.4)
  inv = 10.0 ** rng.uniform(-40, 40, 800)
  inv[:20], inv[20:40] = 0.0, np.inf
  _assert_same(counts, mapper, inv, tokens)
  _assert_same(counts, mapper, inv, tokens, max_genes=50, log1p=True)


@pytest.mark.parametrize("descending", [False, True])
def test_float32_near_ties(descending):
  # Medians m (1 + k 2^-40): float64 scores a few ulps apart that round to the
  # same float32. With k descending along the row the exact order reverses the
  # row, which overflows the insertion sort's budget (merge sort fallback).
  n_genes = 1200
  k = np.arange(n_genes)[::-1] if descending else np.arange(n_genes)
  inv = 1.0 / (3.0 * (1.0 + k * 2.0**-40))
  ids = [f"G{i}" for i in range(n_genes)]
  mapper = qc.GeneMapper(ids, {g: i for i, g in enumerate(ids)})
  tokens = np.arange(n_genes, dtype=np.int32)
  dense = np.random.default_rng(5).integers(0, 3, (20, n_genes)).astype(np.float32)
  dense[0] = 1.0  # one row of all-equal counts: 1,200 near-ties
  counts = sp.csr_matrix(dense)
  row = counts[0].data / counts[0].sum() * 1e4 * inv[counts[0].indices]
  assert len(np.unique(row)) > 100 and len(np.unique(row.astype(np.float32))) < 5
  _assert_same(counts, mapper, inv, tokens)
  _assert_same(counts, mapper, inv, tokens, max_genes=300)


def test_empty_and_degenerate_chunks():
  counts, mapper, inv, tokens, _ = _problem(6, 0, 100, 80, 0.3)
  got = _assert_same(counts, mapper, inv, tokens)
  assert got[0].shape == (0,) and np.array_equal(got[1], [0])
  counts, mapper, inv, tokens, _ = _problem(7, 30, 100, 80, 0.3)
  _assert_same(counts, mapper, inv, tokens, keep_rows=np.zeros(30, bool))
  _assert_same(counts, mapper, inv, tokens, min_genes=10**6)
  counts.data[:] = 0  # every row empty
  _assert_same(counts, mapper, inv, tokens, min_genes=0)


def test_bad_inputs_raise():
  counts, mapper, inv, tokens, _ = _problem(8, 10, 100, 80, 0.3)
  args = [counts.data, counts.indices, counts.indptr, mapper.column_to_target, inv, tokens,
          np.ones(10, bool), 1, 100, False]
  with pytest.raises(ValueError):
    rank_kernel.rank_tokenize(*args[:6], np.ones(9, bool), *args[7:])
  with pytest.raises(IndexError):
    rank_kernel.rank_tokenize(*args[:3], mapper.column_to_target[:50], *args[4:])
  with pytest.raises(IndexError):
    rank_kernel.rank_tokenize(*args[:3], mapper.column_to_target + 80, *args[4:])


@pytest.fixture
def geneformer(shared_data):
  folder = shared_data / "geneformer_30m"
  tokens = safe_pickle.load_pickle(folder / "token_dictionary.pkl")
  medians = safe_pickle.load_pickle(folder / "gene_median_dictionary.pkl")
  return vocab_lib.Vocab.from_geneformer(tokens), medians, folder


@pytest.mark.filterwarnings("ignore:Element .* was written without encoding metadata")
@pytest.mark.parametrize("name,max_len,log1p", [
    ("kang_pbmc_ifnb.h5ad", 2048, False), ("kang_pbmc_ifnb.h5ad", 100, True),
    ("pbmc_10k_protein_v3.h5ad", 2048, False)])
def test_real_data_equals_tokenizer(shared_data, geneformer, name, max_len, log1p):
  vocab, medians, folder = geneformer
  adata = anndata.read_h5ad(shared_data / name)
  if name.startswith("kang"):
    gene_map, source = None, AnnDataSource(adata[:1024], name, gene_column="ensembl_id")
  else:  # 10x symbols mapped to Ensembl ids with Geneformer's table
    gene_map = genes_lib.load_gene_map(folder / "gene_name_id_dict.pkl")
    source = AnnDataSource(adata[:1024], name)
  tokenizer = CellTokenizer(vocab, medians, TokenizeConfig(max_len=max_len, log1p=log1p), gene_map)
  mapper = tokenizer.mapper(source)
  for chunk in source.chunks(512):
    x = chunk.counts
    tokens, offsets, kept = rank_kernel.rank_tokenize(
        x.data, x.indices, x.indptr, mapper.column_to_target, tokenizer.inverse_median,
        tokenizer.target_tokens, np.ones(x.shape[0], bool), tokenizer.config.min_genes,
        tokenizer.max_genes, log1p)
    cells = qc.normalize_chunk(chunk, source, mapper, tokenizer.config.qc, collections.Counter())
    want = tokenizer.tokenize_normalized(cells)
    assert np.array_equal(tokens, want.tokens) and np.array_equal(offsets, want.offsets)
    assert np.array_equal(chunk.obs_names[kept], cells.obs_names)
    assert 0 < kept.sum()


def test_warm_up_compiles_every_dtype():
  rank_kernel.warm_up()
  assert len(rank_kernel._kernel.signatures) >= 4
