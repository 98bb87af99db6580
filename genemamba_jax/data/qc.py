"""From raw counts to normalized expression of target genes, with the paper's QC.

Per chunk of cells (`normalize_chunk`):
  1. the counts are checked: finite, non-negative, integer (log-normalized data
     is refused with a hint at the layer that holds counts);
  2. each cell's total is taken over ALL its genes (Geneformer's `n_counts`);
  3. cells with `obs.is_primary_data == False` are dropped (CELLxGENE duplicates);
  4. the gene columns are mapped onto the target genes (the vocabulary), columns
     that map to the same gene id are summed, and all other genes are dropped;
  5. cells with fewer than `min_genes` expressed target genes are dropped;
  6. values become `counts / total * 10_000` (then `log1p` when asked).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from genemamba_jax.errors import DataError, option
from genemamba_jax.data.readers import CellChunk, CountSource

TARGET_SUM = 10_000.0
PRIMARY_COLUMN = "is_primary_data"


@dataclasses.dataclass(frozen=True)
class QCConfig:
  min_genes: int = 200  # drop cells with fewer expressed target genes
  primary_only: bool = True  # keep obs.is_primary_data == True when the column exists
  log1p: bool = False  # values = log1p(counts / total * 10_000)


@dataclasses.dataclass
class NormalizedCells:
  """The cells of a chunk that passed QC.

  Attributes:
    values: [kept cells, n_targets] CSR, float64 normalized expression of the
      target genes; no explicit zeros, no repeated column in a row; within a
      row, entries in the source file's gene order.
    obs_names: [kept cells] cell ids.
    obs: the requested obs columns of the kept cells.
  """
  values: sp.csr_matrix
  obs_names: np.ndarray
  obs: pd.DataFrame


class GeneMapper:
  """Maps one source's gene columns onto target genes, summing duplicated ids.

  Args:
    gene_ids: [source genes] ids after optional symbol -> Ensembl mapping (None
      for unmapped genes).
    targets: gene id -> target column, e.g. vocabulary genes in token-id order.
  """

  def __init__(self, gene_ids: Sequence, targets: Mapping[str, int]):
    self.column_to_target = np.fromiter(
        (targets.get(g, -1) if g is not None else -1 for g in gene_ids), np.int64, len(gene_ids))
    self.num_targets = len(targets)
    mapped = self.column_to_target[self.column_to_target >= 0]
    self.num_matched = len(mapped)
    hits = np.bincount(mapped, minlength=self.num_targets)
    self.num_duplicated = int(np.sum(hits[hits > 1] - 1))
    self._is_duplicated = hits > 1  # [targets] hit by more than one source column

  def __call__(self, counts: sp.csr_matrix) -> sp.csr_matrix:
    """[cells, source genes] -> [cells, targets], explicit zeros removed.

    Entries keep the source's gene order within a row (a duplicated id sits
    where it first occurs), so equal scores later rank in the file's gene order;
    sorting every row by target would cost more than the ranking itself.
    """
    counts = sp.csr_matrix(counts)
    n = counts.shape[0]
    dst = self.column_to_target[counts.indices]
    keep = (dst >= 0) & (counts.data != 0)
    rows = np.repeat(np.arange(n), np.diff(counts.indptr))
    data = counts.data
    if self.num_duplicated:
      # The first entry of each duplicated (row, target) takes the sum; the others go.
      dup = np.flatnonzero(keep & self._is_duplicated[np.maximum(dst, 0)])
      _, first, inverse = np.unique(rows[dup] * self.num_targets + dst[dup],
                                    return_index=True, return_inverse=True)
      data = data.copy()
      data[dup[first]] = np.bincount(inverse, weights=data[dup])
      keep[dup] = False
      keep[dup[first]] = True
    rows, dst, data = rows[keep], dst[keep], data[keep]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    out = sp.csr_matrix((data, dst, indptr), shape=(n, self.num_targets))
    out.has_sorted_indices = False  # source order, not target order
    return out


def _is_primary(column: pd.Series) -> np.ndarray:
  if column.dtype == bool:
    return column.to_numpy()
  return column.astype(str).str.lower().isin(("true", "1", "1.0")).to_numpy()


def check_counts(chunk: CellChunk, source: CountSource) -> None:
  """Raises DataError unless the chunk holds finite, non-negative integer counts."""
  data = chunk.counts.data
  where = f"{source.path}: {getattr(source, 'layer', None) or 'X'}"
  for bad, what in ((~np.isfinite(data), "NaN or infinite values"), (data < 0, "negative values")):
    if np.any(bad):
      raise DataError(f"{where} holds {what} ({_locate(chunk, source, bad)}); "
                      "tokenization needs raw counts")
  fractional = data != np.rint(data)
  if np.any(fractional):
    layers = getattr(source, "layers", [])
    hint = (f"use {option('layer')} with one that holds raw counts (this file has: "
            f"{', '.join(layers)})"
            if layers else "give the raw count matrix (this file has no other layer or raw)")
    raise DataError(f"{where} holds non-integer values ({_locate(chunk, source, fractional)}): "
                    f"it looks normalized or log-transformed, but tokenization needs raw counts; {hint}")


def _locate(chunk: CellChunk, source: CountSource, bad: np.ndarray) -> str:
  k = int(np.flatnonzero(bad)[0])
  row = int(np.searchsorted(chunk.counts.indptr, k, side="right") - 1)
  return (f"e.g. {chunk.counts.data[k]:g} for cell {str(chunk.obs_names[row])!r}, "
          f"gene {str(source.gene_ids[chunk.counts.indices[k]])!r}")


def obs_columns_to_read(source: CountSource, config: QCConfig, columns: Sequence[str] = ()
                        ) -> list[str]:
  """`columns` plus the QC columns the source has (is_primary_data), without repeats."""
  read = list(columns)
  if config.primary_only and PRIMARY_COLUMN in source.obs_columns:
    read.append(PRIMARY_COLUMN)
  return list(dict.fromkeys(read))


def primary_mask(chunk: CellChunk, config: QCConfig, stats: collections.Counter) -> np.ndarray:
  """[cells] bool: False for cells with obs.is_primary_data == False (when checked)."""
  keep = np.ones(chunk.counts.shape[0], bool)
  if config.primary_only and PRIMARY_COLUMN in chunk.obs.columns:
    keep = _is_primary(chunk.obs[PRIMARY_COLUMN])
    stats["dropped_not_primary"] += int(np.sum(~keep))
  return keep


def normalize_chunk(chunk: CellChunk, source: CountSource, mapper: GeneMapper, config: QCConfig,
                    stats: collections.Counter, columns: Sequence[str] = ()) -> NormalizedCells:
  """QC + gene mapping + normalization of one chunk; counts drops into `stats`.

  `chunk.obs` must hold `is_primary_data` when the source has that column.
  """
  check_counts(chunk, source)
  n = chunk.counts.shape[0]
  stats["cells_read"] += n
  totals = np.asarray(chunk.counts.sum(axis=1, dtype=np.float64)).ravel()
  keep = primary_mask(chunk, config, stats)
  values = mapper(chunk.counts)
  expressed = np.diff(values.indptr)
  few = keep & (expressed < max(config.min_genes, 1))
  stats["dropped_min_genes"] += int(np.sum(few))
  keep &= ~few
  values = values[keep] if not keep.all() else values
  stats["cells_kept"] += int(keep.sum())
  rows = np.repeat(np.arange(values.shape[0]), np.diff(values.indptr))
  data = values.data.astype(np.float64) / totals[keep][rows] * TARGET_SUM
  if config.log1p:
    np.log1p(data, out=data)
  values = sp.csr_matrix((data, values.indices, values.indptr), shape=values.shape)
  return NormalizedCells(values, chunk.obs_names[keep], chunk.obs.iloc[np.flatnonzero(keep)][list(columns)])
