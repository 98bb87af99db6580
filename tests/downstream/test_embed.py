"""embed: cell and gene embeddings of real cells, in input order, deterministic, batch-size free."""

import subprocess
import sys

import anndata
import numpy as np
import pytest
from flax import nnx

from genemamba_jax import embed, rundir
from genemamba_jax.data.readers import open_source
from genemamba_jax.data.vocab import Vocab
from genemamba_jax.errors import DataError
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from tests.conftest import SHARED_DATA


def test_a_tiny_model_embeds_every_cell_in_order_whatever_the_batch_size(tmp_path):
  """Fast (a random 1-layer model, 25 synthetic cells); the real model: the tests below."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  from scipy import sparse  # pylint: disable=g-import-not-at-top
  vocab = Vocab.from_genes([f"G{i:02d}" for i in range(30)])
  config = GeneMambaConfig(vocab_size=len(vocab), d_model=16, n_layers=1, mixer="mamba2",
                           headdim=8, d_state=8)
  run = rundir.Pretrained(GeneMamba(config, rngs=nnx.Rngs(0)), config, vocab,
                          {g: 1.0 for g in vocab.gene_ids}, {"max_len": 12, "cls": True}, None)
  counts = np.random.default_rng(0).poisson(0.8, (25, 30)).astype(np.float32)
  names = [f"cell{i}" for i in np.random.default_rng(1).permutation(25)]
  anndata.AnnData(sparse.csr_matrix(counts), obs=pd.DataFrame(index=names),
                  var=pd.DataFrame(index=vocab.gene_ids)).write_h5ad(tmp_path / "cells.h5ad")
  results = [embed.embed_source(run, open_source(tmp_path / "cells.h5ad", None, None),
                                poolings=("cls", "mean"), batch_size=size, progress=False)
             for size in (4, 25)]
  assert list(results[0].obs_names) == names and list(results[1].obs_names) == names
  for pooling in ("cls", "mean"):
    assert results[0].cells[pooling].shape == (25, 16)
    np.testing.assert_allclose(results[0].cells[pooling], results[1].cells[pooling], atol=1e-5)
  embed.write_output(results[1], tmp_path / "cells.npz")
  saved = np.load(tmp_path / "cells.npz")
  np.testing.assert_array_equal(saved["mean"], results[1].cells["mean"])
  assert list(saved["obs_names"]) == names


@pytest.fixture(scope="module")
def kang_subset(tmp_path_factory, kang_pretrained):
  """120 Kang cells in a shuffled order (so input order is not the file's original order)."""
  adata = anndata.read_h5ad(SHARED_DATA / "kang_pbmc_ifnb.h5ad")
  order = np.random.default_rng(0).permutation(adata.n_obs)[:120]
  path = tmp_path_factory.mktemp("embed") / "kang_subset.h5ad"
  adata[order].copy().write_h5ad(path)
  return path


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "genemamba_jax.embed", *map(str, args)],
                        capture_output=True, text=True, check=False)


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_cli_writes_obsm_in_input_order_deterministically(kang_pretrained, kang_subset, tmp_path):
  outs = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
  for out in outs:
    result = _cli("--checkpoint", kang_pretrained, "--input", kang_subset, "--output", out,
                  "--pooling", "both", "--genes-output", tmp_path / "genes.npz")
    assert result.returncode == 0, result.stderr
  a, b = (anndata.read_h5ad(p) for p in outs)
  source = anndata.read_h5ad(kang_subset)
  assert list(a.obs_names) == list(source.obs_names)
  assert a.obsm["X_genemamba"].shape == (120, 64)
  assert a.obsm["X_genemamba_mean"].shape == (120, 64)
  np.testing.assert_array_equal(a.obsm["X_genemamba"], b.obsm["X_genemamba"])
  np.testing.assert_array_equal(a.X.toarray(), source.X.toarray())  # the input is carried over
  genes = np.load(tmp_path / "genes.npz")
  assert genes["input"].shape == (len(genes["gene_ids"]), 64)
  assert genes["context"].shape == (len(genes["context_gene_ids"]), 64)
  assert np.all(genes["context_counts"] >= 1)


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_batch_size_does_not_change_embeddings(kang_pretrained, kang_subset):
  big = embed.embed_file(kang_pretrained, kang_subset, poolings=("cls", "mean"), batch_size=64,
                         gene_context=True, progress=False)
  one = embed.embed_file(kang_pretrained, kang_subset, poolings=("cls", "mean"), batch_size=1,
                         gene_context=True, progress=False)
  for pooling in ("cls", "mean"):
    np.testing.assert_allclose(one.cells[pooling], big.cells[pooling], atol=1e-5)
  np.testing.assert_allclose(one.gene_context, big.gene_context, atol=1e-5)
  # Rows are per cell: a cell alone gives its own row of the batched result.
  alone = embed.embed_source(rundir.load_pretrained(kang_pretrained),
                             _source(kang_subset, [17]), poolings=("mean",), progress=False)
  np.testing.assert_allclose(alone.cells["mean"][0], big.cells["mean"][17], atol=1e-5)


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_gene_context_is_the_mean_state_over_occurrences(kang_pretrained, kang_subset):
  from genemamba_jax import inference
  model = rundir.load_pretrained(kang_pretrained)
  result = embed.embed_file(kang_pretrained, kang_subset, gene_context=True, progress=False)
  cells, _, _ = inference.tokenize_all(model.tokenizer(), _source(kang_subset), desc=None)
  gene = result.context_gene_ids[5]
  token = model.vocab.token_to_id[gene]
  # Each cell on its own (right-padded to one length so one compiled encode serves all).
  encode = nnx.jit(lambda backbone, tokens, mask: backbone.encode(tokens, mask))
  length = max(len(sentence) for sentence in cells)
  states = []
  for sentence in cells[:120]:
    if not np.any(sentence == token):
      continue
    tokens = np.full((1, length), model.config.pad_id, np.int32)
    tokens[0, :len(sentence)] = sentence
    hidden = np.asarray(encode(model.model, tokens, tokens != model.config.pad_id))[0]
    states.extend(hidden[:len(sentence)][sentence == token])
  assert result.gene_context_counts[5] == len(states)
  np.testing.assert_allclose(result.gene_context[5], np.mean(states, axis=0), atol=1e-5)


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_npy_and_npz_outputs(kang_pretrained, kang_subset, tmp_path):
  assert _cli("--checkpoint", kang_pretrained, "--input", kang_subset,
              "--output", tmp_path / "x.npy", "--pooling", "mean").returncode == 0
  step_dir = max((kang_pretrained / "checkpoints").glob("[0-9]*"))  # one checkpoint
  assert _cli("--checkpoint", step_dir, "--input", kang_subset,
              "--output", tmp_path / "x.npz", "--pooling", "both").returncode == 0
  npy, npz = np.load(tmp_path / "x.npy"), np.load(tmp_path / "x.npz")
  np.testing.assert_array_equal(npy, npz["mean"])
  assert list(npz["obs_names"]) == list(anndata.read_h5ad(kang_subset).obs_names)


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_errors_are_one_line_and_name_the_problem(kang_pretrained, kang_subset, tmp_path):
  result = _cli("--checkpoint", kang_pretrained, "--input", kang_subset, "--output",
                tmp_path / "x.csv")
  assert result.returncode == 2 and "name it .h5ad, .npy or .npz" in result.stderr
  result = _cli("--checkpoint", tmp_path, "--input", kang_subset, "--output", tmp_path / "x.npy")
  assert result.returncode == 2 and "no finished checkpoint" in result.stderr
  assert not (tmp_path / "x.npy").exists()
  with pytest.raises(DataError, match="none of its .* gene ids"):
    embed.embed_file(kang_pretrained, kang_subset, gene_column="ensembl_id", progress=False)


def _source(path, rows=None):
  from genemamba_jax.data.readers import AnnDataSource
  adata = anndata.read_h5ad(path)
  return AnnDataSource(adata if rows is None else adata[rows].copy(), str(path))
