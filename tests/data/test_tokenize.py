"""Rank tokenization: equal to Geneformer's algorithm on real data, plus QC and readers."""

import collections
import tarfile

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from genemamba_jax.data import rank_reference
from genemamba_jax.data import safe_pickle
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.errors import DataError
from genemamba_jax.data.readers import AnnDataSource, open_source
from genemamba_jax.data.tokenizer import CellTokenizer, TokenizeConfig, tokenize_anndata
from tests import oracles


@pytest.fixture
def gf(shared_data):
  folder = shared_data / "geneformer_30m"
  tokens = safe_pickle.load_pickle(folder / "token_dictionary.pkl")
  medians = safe_pickle.load_pickle(folder / "gene_median_dictionary.pkl")
  return tokens, medians


@pytest.fixture
def gf_vocab_dir(gf, tmp_path):
  tokens, medians = gf
  vocab_lib.save_vocab_dir(tmp_path / "vocab", vocab_lib.Vocab.from_geneformer(tokens), medians,
                           {"median_space": "normalized"})
  return tmp_path / "vocab"


def _ours(path, vocab_dir, config, **kwargs):
  tokenizer = CellTokenizer.from_vocab_dir(vocab_dir, config, kwargs.pop("gene_map", None))
  source = open_source(path, **kwargs)
  stats = collections.Counter()
  out = {}
  for cells in tokenizer.tokenize_source(source, stats=stats):
    out.update(zip(cells.obs_names, cells.sentences()))
  return out, stats


@pytest.mark.slow  # over ~10 s on 2 cores
@pytest.mark.parametrize("max_len", [2048, 100])
def test_kang_equals_geneformer(shared_data, gf, gf_vocab_dir, max_len):
  tokens, medians = gf
  path = shared_data / "kang_pbmc_ifnb.h5ad"
  ours, stats = _ours(path, gf_vocab_dir, TokenizeConfig(max_len=max_len, min_genes=0),
                      gene_column="ensembl_id")
  adata = anndata.read_h5ad(path)
  ids = list(adata.var["ensembl_id"])
  oracle = oracles.geneformer_rank(adata.X, ids, tokens, medians, max_len)
  full = oracles.geneformer_rank(adata.X, ids, tokens, medians, 10**6)
  assert stats["cells_kept"] == adata.n_obs == len(ours)
  truncated = 0
  for name, (o_tokens, o_scores), (all_tokens, all_scores) in zip(adata.obs_names, oracle, full):
    score_of = dict(zip(all_tokens.tolist(), all_scores))
    oracles.assert_same_up_to_ties(ours[name], o_tokens, o_scores, score_of)
    truncated += len(all_tokens) > max_len
  assert (truncated > 1000) == (max_len == 100)


def test_pbmc68k_symbols_through_gene_map_equal_geneformer(shared_data, gf, gf_vocab_dir):
  tokens, medians = gf
  gene_map = safe_pickle.load_pickle(shared_data / "geneformer_30m" / "gene_name_id_dict.pkl")
  path = shared_data / "pbmc68k_reduced_counts.h5ad"
  config = TokenizeConfig(max_len=2048, cls=True, eos=True, min_genes=0)
  ours, _ = _ours(path, gf_vocab_dir, config, gene_map=gene_map)
  adata = anndata.read_h5ad(path)
  ids = [gene_map.get(s) for s in adata.var_names]
  oracle = oracles.geneformer_rank(adata.X, ids, tokens, medians, 2046)
  vocab = vocab_lib.Vocab.from_geneformer(tokens)
  for name, (o_tokens, o_scores) in zip(adata.obs_names, oracle):
    sentence = ours[name]
    assert sentence[0] == vocab.cls_id == 25426 and sentence[-1] == vocab.eos_id == 25427
    np.testing.assert_array_equal(np.sort(sentence[1:-1]), np.sort(o_tokens))
    # Order: scores along our sentence are non-increasing and equal the oracle's.
    score_of = dict(zip(o_tokens.tolist(), o_scores))
    np.testing.assert_array_equal([score_of[t] for t in sentence[1:-1]], o_scores)


def test_ties_keep_gene_order_and_float32_near_ties_are_exact():
  # Four genes; scores: g1 == g2 exactly, g3 one float64 ulp above g0 (same float32).
  medians = np.array([1.0, 2.0, 2.0, 1.0])
  base = 3.0
  values = sp.csr_matrix(np.array([[base, 2 * base, 2 * base, np.nextafter(base, 10)]]))
  columns, offsets = rank_reference.rank_genes(values, 1.0 / medians, 10)
  assert columns.tolist() == [3, 0, 1, 2]
  assert offsets.tolist() == [0, 4]


def test_rank_genes_matches_per_cell_argsort_on_generated_data():
  rng = np.random.default_rng(1)
  values = oracles.random_counts(300, 500, density=0.4, seed=1).astype(np.float64)
  values.sort_indices()
  inverse = 1.0 / rng.choice([0.5, 1.0, 1.0 + 1e-12, 3.0], size=500)
  for max_len in (1000, 37):
    columns, offsets = rank_reference.rank_genes(values, inverse, max_len)
    for i in range(values.shape[0]):
      row = values.getrow(i)
      expected = row.indices[np.lexsort((row.indices, -row.data * inverse[row.indices]))][:max_len]
      np.testing.assert_array_equal(columns[offsets[i]:offsets[i + 1]], expected)


def test_add_special_tokens():
  tokens, offsets = rank_reference.add_special_tokens(np.array([7, 8, 9]), np.array([0, 2, 2, 3]), 2, 3)
  assert tokens.tolist() == [2, 7, 8, 3, 2, 3, 2, 9, 3]
  assert offsets.tolist() == [0, 4, 6, 9]


def _toy_vocab(tmp_path, genes, medians, space="normalized"):
  vocab_lib.save_vocab_dir(tmp_path / "v", vocab_lib.Vocab.from_genes(genes),
                           dict(zip(genes, medians)), {"median_space": space})
  return tmp_path / "v"


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_qc_duplicates_primary_and_min_genes(tmp_path):
  genes = ["ENSG1", "ENSG2", "ENSG3"]
  vocab_dir = _toy_vocab(tmp_path, genes, [1.0, 1.0, 1.0])
  # Columns: ENSG1 twice (summed), ENSG2, ENSG3, and a gene outside the vocab.
  X = np.array([[1, 1, 3, 0, 5],   # ENSG1 = 2, ENSG2 = 3 -> [ENSG2, ENSG1]
                [4, 0, 1, 2, 0],   # ENSG1 = 4 -> [ENSG1, ENSG3, ENSG2]
                [0, 0, 1, 0, 0],   # one gene: below min_genes=2
                [1, 1, 1, 1, 0]])  # not primary
  path = oracles.write_h5ad(tmp_path / "a.h5ad", X, ["ENSG1", "ENSG1", "ENSG2", "ENSG3", "OTHER"],
                            obs={"is_primary_data": [True, True, True, False]})
  out, stats = _ours(path, vocab_dir, TokenizeConfig(min_genes=2))
  vocab = vocab_lib.Vocab.from_genes(genes)
  ids = {g: vocab.token_to_id[g] for g in genes}
  assert out == {"cell0": pytest.approx(np.array([ids["ENSG2"], ids["ENSG1"]])),
                 "cell1": pytest.approx(np.array([ids["ENSG1"], ids["ENSG3"], ids["ENSG2"]]))}
  assert stats == {"cells_read": 4, "cells_kept": 2, "dropped_min_genes": 1,
                   "dropped_not_primary": 1}


def test_total_counts_include_genes_outside_vocab_and_log1p(tmp_path):
  genes = ["ENSG1", "ENSG2"]
  X = np.array([[2, 3, 95]])  # totals 100 -> normalized 200, 300
  path = oracles.write_h5ad(tmp_path / "a.h5ad", X, ["ENSG1", "ENSG2", "X"])
  # Plain: 200/100 = 2 beats 300/200 = 1.5. log1p: log1p(200)/1 = 5.3 < log1p(300)/1.
  plain, _ = _ours(path, _toy_vocab(tmp_path, genes, [100.0, 200.0]), TokenizeConfig(min_genes=1))
  assert plain["cell0"].tolist() == [4, 5]
  (tmp_path / "v").rename(tmp_path / "v_plain")
  logdir = _toy_vocab(tmp_path, genes, [1.0, 1.0], space="log1p")
  logged, _ = _ours(path, logdir, TokenizeConfig(min_genes=1, log1p=True))
  assert logged["cell0"].tolist() == [5, 4]
  with pytest.raises(DataError, match="medians were computed on log1p values"):
    CellTokenizer.from_vocab_dir(logdir, TokenizeConfig())


def test_streamed_in_memory_dense_and_chunking_agree(tmp_path):
  genes = [f"ENSG{i}" for i in range(60)]
  vocab_dir = _toy_vocab(tmp_path, genes, np.linspace(0.5, 3, 60))
  X = oracles.random_counts(50, 60, seed=3).toarray()
  sparse = oracles.write_h5ad(tmp_path / "s.h5ad", X, genes)
  dense = oracles.write_h5ad(tmp_path / "d.h5ad", X, genes, dense=True)
  layered = oracles.write_h5ad(tmp_path / "l.h5ad", np.log1p(X), genes,
                               layers={"counts": sp.csr_matrix(X, dtype=np.float32)})
  ref, _ = _ours(sparse, vocab_dir, TokenizeConfig(min_genes=1))
  for path, kwargs, chunk in ((sparse, {"in_memory": True}, 1024), (dense, {}, 7),
                              (layered, {"layer": "counts"}, 16), (sparse, {}, 1)):
    got, _ = _ours(path, vocab_dir, TokenizeConfig(min_genes=1, chunk_size=chunk), **kwargs)
    assert got.keys() == ref.keys()
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k])


def test_tenx_folder_keeps_gene_expression_only(shared_data, gf_vocab_dir, tmp_path):
  with tarfile.open(shared_data / "10x" / "pbmc_10k_protein_v3_filtered_feature_bc_matrix.tar.gz") as t:
    t.extractall(tmp_path, filter="data")
  folder = tmp_path / "filtered_feature_bc_matrix"
  source = open_source(folder)
  assert source.n_cells == 1024 and len(source.gene_ids) == 100
  assert all(g.startswith("ENSG") for g in source.gene_ids)
  out, stats = _ours(folder, gf_vocab_dir, TokenizeConfig(min_genes=1))
  assert stats["cells_read"] == 1024 and len(out) == stats["cells_kept"] > 900


def test_tokenize_anndata_in_memory(shared_data, gf_vocab_dir):
  adata = anndata.read_h5ad(shared_data / "kang_pbmc_ifnb.h5ad")
  sentences, obs, stats = tokenize_anndata(adata, gf_vocab_dir, TokenizeConfig(cls=True),
                                           gene_column="ensembl_id", columns=["cell_type"])
  assert len(sentences) == len(obs) == stats["cells_kept"] == adata.n_obs - stats["dropped_min_genes"]
  assert stats["dropped_min_genes"] > 0  # Kang has cells with < 200 genes
  assert all(s[0] == 25426 and len(s) >= 201 for s in sentences)
  assert set(obs["cell_type"]) <= set(adata.obs["cell_type"])


def _write_10x_h5(folder, path):
  """Cell Ranger v3 .h5 layout, from the matching matrix folder."""
  import gzip
  import pandas as pd
  import scipy.io
  with gzip.open(folder / "matrix.mtx.gz") as f:
    m = sp.csc_matrix(scipy.io.mmread(f))  # features x cells
  features = pd.read_csv(folder / "features.tsv.gz", sep="\t", header=None)
  barcodes = pd.read_csv(folder / "barcodes.tsv.gz", sep="\t", header=None)[0]
  import h5py
  with h5py.File(path, "w") as h:
    g = h.create_group("matrix")
    g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices, m.indptr
    g["shape"] = np.array(m.shape, np.int32)
    g["barcodes"] = barcodes.to_numpy().astype("S")
    f = g.create_group("features")
    f["id"], f["name"] = features[0].to_numpy().astype("S"), features[1].to_numpy().astype("S")
    f["feature_type"] = features[2].to_numpy().astype("S")


def test_tenx_h5_backed_anndata_and_directories_agree(shared_data, gf_vocab_dir, tmp_path):
  with tarfile.open(shared_data / "10x" / "pbmc_10k_protein_v3_filtered_feature_bc_matrix.tar.gz") as t:
    t.extractall(tmp_path, filter="data")
  folder = tmp_path / "filtered_feature_bc_matrix"
  _write_10x_h5(folder, tmp_path / "run.h5")
  config = TokenizeConfig(min_genes=1)
  from_folder, _ = _ours(folder, gf_vocab_dir, config)
  from_h5, _ = _ours(tmp_path / "run.h5", gf_vocab_dir, config)
  assert from_folder.keys() == from_h5.keys()
  assert all(np.array_equal(from_folder[k], from_h5[k]) for k in from_folder)
  # A backed AnnData reads the same cells as the streamed file.
  kang = shared_data / "kang_pbmc_ifnb.h5ad"
  streamed, _ = _ours(kang, gf_vocab_dir, config, gene_column="ensembl_id")
  backed = AnnDataSource(anndata.read_h5ad(kang, backed="r"), str(kang), gene_column="ensembl_id")
  tokenizer = CellTokenizer.from_vocab_dir(gf_vocab_dir, config)
  got = {}
  for cells in tokenizer.tokenize_source(backed):
    got.update(zip(cells.obs_names, cells.sentences()))
  assert got.keys() == streamed.keys()
  assert all(np.array_equal(got[k], streamed[k]) for k in got)


def test_directory_input_expands_to_its_files(tmp_path):
  from genemamba_jax.data.readers import expand_inputs
  genes = [f"ENSG{i}" for i in range(20)]
  (tmp_path / "corpus").mkdir()
  for name in ("b.h5ad", "a.h5ad"):
    oracles.write_h5ad(tmp_path / "corpus" / name, oracles.random_counts(5, 20), genes)
  (tmp_path / "corpus" / "notes.txt").write_text("not data")
  assert [p.name for p in expand_inputs([tmp_path / "corpus"])] == ["a.h5ad", "b.h5ad"]
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="holds no .h5ad"):
    expand_inputs([tmp_path / "empty"])
