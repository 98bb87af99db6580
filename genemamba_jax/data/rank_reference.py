"""Rank tokenization: per cell, genes sorted by median-scaled expression, descending.

For a cell with normalized values `v_g = counts_g / total * 10_000` the score of
gene g is `v_g / median_g` (Geneformer's rule and the paper's equation); genes
are ranked by descending score and the top `max_genes` become the cell's
sentence of token ids. Equal scores keep the order of the genes in the row
(the input file's gene order): the result is a per-cell stable sort,
`np.argsort(-scores, kind="stable")`, Geneformer's rule with its ties made
deterministic.

The sort is vectorized over a whole chunk of cells: each non-zero value becomes
one uint64 key `row (16 bits) | descending float32 score (32 bits) | position in
the row (16 bits)`, and one SIMD `np.sort` (faster than any argsort) orders every
row at once; the position in the key says where each entry came from. float32
keeps the order of float64 scores except between scores that round to the same
float32; those rare runs are re-sorted exactly in float64 afterwards.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

_ROW_BITS, _POS_BITS = 16, 16


def rank_genes(values: sp.csr_matrix, inverse_median: np.ndarray,
               max_genes: int) -> tuple[np.ndarray, np.ndarray]:
  """Ranks the non-zero genes of every cell.

  Args:
    values: [cells, targets] CSR of normalized expression, no column repeated
      within a row (as `qc.normalize_chunk` returns); equal scores keep the
      order of the row's entries.
    inverse_median: [targets] float64, 1 / non-zero median of each target gene.
    max_genes: keep the top `max_genes` genes of each cell.

  Returns:
    (columns, offsets): `columns[offsets[i]:offsets[i + 1]]` are the target
    columns of cell i, highest score first; offsets is [cells + 1] int64.
  """
  n_cells = values.shape[0]
  indptr = values.indptr.astype(np.int64)
  lengths = np.diff(indptr)
  columns = values.indices.astype(np.int64)
  scores = values.data * inverse_median[columns]
  max_length = lengths.max() if n_cells else 0
  if n_cells == 0 or len(scores) == 0:
    return np.zeros(0, np.int64), np.zeros(n_cells + 1, np.int64)
  if n_cells <= (1 << _ROW_BITS) and max_length <= (1 << _POS_BITS):
    order = _packed_sort(scores, indptr, lengths)
  else:  # too many cells or genes to pack: slower but the same order
    rows = np.repeat(np.arange(n_cells), lengths)
    order = np.lexsort((-scores, rows))
  if lengths.max() > max_genes:
    rank = np.arange(len(order)) - np.repeat(indptr[:-1], lengths)
    order = order[rank < max_genes]
    lengths = np.minimum(lengths, max_genes)
  offsets = np.zeros(n_cells + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  return columns[order], offsets


def _packed_sort(scores: np.ndarray, indptr: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Positions into `scores`, row by row, descending score, ties by position."""
  # Positive floats order like their bit patterns; XOR turns ascending into descending.
  key = scores.astype(np.float32).view(np.uint32).astype(np.uint64)
  key ^= np.uint64(0xFFFFFFFF)
  key <<= np.uint64(_POS_BITS)
  # | row << 48 | position in row, added as k + (row << 48) - indptr[row].
  starts = indptr[:-1].astype(np.uint64)
  key += np.repeat((np.arange(len(lengths), dtype=np.uint64) << np.uint64(64 - _ROW_BITS)) - starts,
                   lengths)
  key += np.arange(len(key), dtype=np.uint64)
  key.sort()
  order = (key & np.uint64((1 << _POS_BITS) - 1)).astype(np.int64)
  order += np.repeat(indptr[:-1], lengths)
  _resolve_float32_ties(key, order, scores)
  return order


def _resolve_float32_ties(key: np.ndarray, order: np.ndarray, scores: np.ndarray) -> None:
  """Re-sorts, in place, runs whose float32 keys tie but whose float64 scores differ."""
  head = key >> np.uint64(_POS_BITS)  # row and float32 score
  same = head[1:] == head[:-1]
  if not same.any():
    return
  in_run = np.zeros(len(key), bool)
  in_run[1:] |= same
  in_run[:-1] |= same
  where = np.flatnonzero(in_run)
  run_id = np.cumsum(~np.concatenate([[False], same])[where])
  members = order[where]
  # Score descending, then position in the row ascending.
  resorted = np.lexsort((members, -scores[members], run_id))
  order[where] = members[resorted]


def add_special_tokens(tokens: np.ndarray, offsets: np.ndarray, cls_id: int | None,
                       eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Puts `<cls>` before and `<eos>` after every cell's tokens (either may be None).

  Args:
    tokens: [total] flat token ids; offsets: [cells + 1].
  Returns:
    The new (tokens, offsets).
  """
  n_cells = len(offsets) - 1
  extra = (cls_id is not None) + (eos_id is not None)
  if extra == 0:
    return tokens, offsets
  lengths = np.diff(offsets) + extra
  new_offsets = np.zeros(n_cells + 1, np.int64)
  np.cumsum(lengths, out=new_offsets[1:])
  out = np.empty(new_offsets[-1], tokens.dtype)
  shift = np.repeat(np.arange(n_cells) * extra + (cls_id is not None), np.diff(offsets))
  out[np.arange(len(tokens)) + shift] = tokens
  if cls_id is not None:
    out[new_offsets[:-1]] = cls_id
  if eos_id is not None:
    out[new_offsets[1:] - 1] = eos_id
  return out, new_offsets
