"""Independent reference implementations and small data builders for the tests."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp


def geneformer_rank(counts: sp.csr_matrix, gene_ids, token_dict: dict, median_dict: dict,
                    max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Geneformer's TranscriptomeTokenizer, cell by cell, written as plainly as it is there.

  Keep genes in the median dictionary; sum duplicated ids; n_counts = total over
  ALL genes; `x = counts / n_counts * 10_000 / median`; `np.argsort(-x)` of the
  non-zeros; truncate to `max_len`.

  Returns:
    Per cell (tokens, scores) in Geneformer's order.
  """
  counts = sp.csr_matrix(counts)
  n_counts = np.asarray(counts.sum(axis=1)).ravel()
  genes = [g for g in dict.fromkeys(gene_ids) if g in median_dict]
  column = {g: i for i, g in enumerate(genes)}
  # Sum duplicated ids with an indicator matrix: [all genes] -> [kept genes].
  rows = [i for i, g in enumerate(gene_ids) if g in column]
  sum_dups = sp.csr_matrix((np.ones(len(rows)), (rows, [column[gene_ids[i]] for i in rows])),
                           shape=(len(gene_ids), len(genes)))
  kept = sp.csr_matrix(counts @ sum_dups)
  norm = np.array([median_dict[g] for g in genes], dtype=np.float64)
  tokens = np.array([token_dict[g] for g in genes])
  out = []
  for i in range(kept.shape[0]):
    row = kept.getrow(i)
    x = row.data / n_counts[i] * 10_000 / norm[row.indices]
    order = np.argsort(-x)[:max_len]
    out.append((tokens[row.indices[order]], x[order]))
  return out


def assert_same_up_to_ties(ours: np.ndarray, oracle_tokens: np.ndarray, oracle_scores: np.ndarray,
                           score_of: dict) -> None:
  """Same length, and position by position the same score: only equal scores may swap.

  At a truncation boundary the last tied genes may differ; everywhere else the
  token sets are equal because the score sequences are.
  """
  assert len(ours) == len(oracle_tokens)
  np.testing.assert_array_equal(np.array([score_of[t] for t in ours]), oracle_scores)
  untied = {t for t, s in zip(oracle_tokens, oracle_scores) if list(oracle_scores).count(s) == 1}
  assert untied <= set(ours.tolist())


def write_h5ad(path, X, gene_ids, obs: dict | None = None, var: dict | None = None,
               layers: dict | None = None, dense: bool = False) -> str:
  """Writes an AnnData file with counts X ([cells, genes]) and index = gene_ids."""
  X = np.asarray(X, dtype=np.float32) if dense else sp.csr_matrix(X, dtype=np.float32)
  n = X.shape[0]
  obs_df = pd.DataFrame(obs or {}, index=[f"cell{i}" for i in range(n)])
  var_df = pd.DataFrame(var or {}, index=pd.Index(list(gene_ids)))
  adata = anndata.AnnData(X, obs=obs_df, var=var_df, layers=layers)
  adata.write_h5ad(path)
  return str(path)


def random_counts(n_cells: int, n_genes: int, density: float = 0.3, seed: int = 0) -> sp.csr_matrix:
  rng = np.random.default_rng(seed)
  m = sp.random(n_cells, n_genes, density=density, random_state=seed, format="csr")
  m.data = rng.negative_binomial(2, 0.3, m.nnz).astype(np.float32) + 1
  return m


def selective_scan_inputs(seed: int, b: int, length: int, d: int, n: int):
  """(x, dt, A, B, C) float32 jax arrays for the Mamba-1 scan, realistic magnitudes.

  x, B, C ~ N(0, 1); dt = softplus(0.5 z - 2) ~ 0.05-0.3; A = -exp(z) [d, n].
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  r = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return (f32(r.normal(size=(b, length, d))),
          f32(np.log1p(np.exp(0.5 * r.normal(size=(b, length, d)) - 2.0))),
          f32(-np.exp(r.normal(size=(d, n)))),
          f32(r.normal(size=(b, length, n))),
          f32(r.normal(size=(b, length, n))))
