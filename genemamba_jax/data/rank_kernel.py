"""Fused rank tokenization: CSR counts -> token sentences in one compiled pass.

`rank_tokenize` does, row by row, what `qc.GeneMapper` + `qc.normalize_chunk` +
`ranking.rank_genes` + the token lookup do chunk-wide in numpy, with the same
result token for token (tie order included), faster (bench/RESULTS.md) and without the
chunk-wide temporaries. Per row:

  1. total = float64 sum of all entries of the row (mapped or not);
  2. non-zero entries of mapped genes are gathered in row order; entries of a
     target hit by several source columns (duplicated gene id) become one, at
     the first occurrence, holding the sum (per-target slots reset per row);
  3. the row is dropped if keep_rows is False or it has fewer than
     max(min_genes, 1) expressed targets;
  4. score = count / total * 10_000 [log1p] * inverse_median, numpy's float64
     operations in numpy's order, so the scores are bit-identical;
  5. a 2-pass LSD radix sort (10-bit digits) on the top 20 bits of the
     descending float32 bits of the score, less their row minimum, orders the
     row, stably; runs of equal 20-bit prefixes (~5 pairs per real cell) are
     then insertion-sorted by the float64 score, stably, so the order is
     exactly `argsort(-score, kind="stable")`. Pathological runs (many
     distinct scores within one float32 step) fall back to a merge sort.

Compiling takes ~7 s for the first (data, indices) dtype pair and ~2 s for
each further one on a slow CPU. numba caches the code on disk (the package's
__pycache__, else ~/.cache/numba or $NUMBA_CACHE_DIR; with nothing writable it
silently compiles once per process); loading it is quick. Call `warm_up()`
at start-up so that the first chunk is not the slow one.
"""

from __future__ import annotations

import numba
import numpy as np

_DIGIT_BITS = 10  # two radix passes of 10 bits: 1024-bucket histograms
_HIGH = np.uint64(32)  # elements are prefix << 32 | entry
_LOW = np.uint64(0xFFFFFFFF)


def _njit(fn):
  try:
    return numba.njit(cache=True, nogil=True)(fn)
  except RuntimeError:  # numba found no writable cache directory at all
    return numba.njit(nogil=True)(fn)


@_njit
def _radix_sort(m, key, kmin, kmax, a, b, hist):
  """Stable sort of entries 0..m-1 by the top 20 bits of key - kmin.

  key: [m] uint32 in [kmin, kmax]; a, b: [>= m] uint64, hist: [2, 1024] uint32
  scratch. Returns a or b, whichever holds the sorted `prefix << 32 | entry`.
  """
  span = kmax - kmin
  bits = 0
  while bits < 32 and span >> np.uint32(bits):
    bits += 1
  shift = np.uint32(max(bits - 2 * _DIGIT_BITS, 0))
  mask = np.uint64((1 << _DIGIT_BITS) - 1)
  high_digit = np.uint64(32 + _DIGIT_BITS)
  hist[:] = 0
  for k in range(m):
    e = (np.uint64((key[k] - kmin) >> shift) << _HIGH) | np.uint64(k)
    a[k] = e
    hist[0, (e >> _HIGH) & mask] += 1
    hist[1, (e >> high_digit) & mask] += 1
  for p in range(2 if bits > _DIGIT_BITS else 1):
    h = hist[p]
    total = np.uint32(0)
    for d in range(1 << _DIGIT_BITS):
      c = h[d]
      h[d] = total
      total += c
    digit = np.uint64(32 + p * _DIGIT_BITS)
    for k in range(m):  # LSD scatter: stable, so equal prefixes keep entry order
      e = a[k]
      d = (e >> digit) & mask
      b[h[d]] = e
      h[d] += np.uint32(1)
    a, b = b, a
  return a


@_njit
def _sort_ties(m, a, score):
  """Stable insertion sort of a[:m] by descending score within equal prefixes.

  Returns False, a[:m] still a permutation, when the runs are too long for it.
  """
  budget = 8 * m + 4096
  for j in range(1, m):
    e = a[j]
    prefix = e >> _HIGH
    if prefix != a[j - 1] >> _HIGH:
      continue
    s = score[e & _LOW]
    k = j
    while k > 0 and a[k - 1] >> _HIGH == prefix and score[a[k - 1] & _LOW] < s:
      a[k] = a[k - 1]
      k -= 1
    a[k] = e
    budget -= j - k + 1
    if budget < 0:
      return False
  return True


@_njit
def _kernel(data, indices, indptr, column_to_target, inverse_median, target_tokens,
            keep_rows, min_genes, max_genes, log1p):
  """`rank_tokenize` on arguments already converted to the compiled dtypes."""
  n, n_columns, n_targets = len(indptr) - 1, len(column_to_target), len(inverse_median)
  # Per source column: target code, 1 / median and token, so that sorted CSR
  # rows read these tables front to back, not jumping around in target order.
  # code: -1 unmapped, t >= 0 target t, -2 - t target t hit by several columns
  # (only those need merging, as in qc.GeneMapper).
  hits = np.zeros(n_targets, np.int32)
  for j in range(n_columns):
    t = column_to_target[j]
    if t >= n_targets:
      raise IndexError("column_to_target holds a target beyond inverse_median")
    if t >= 0:
      hits[t] += 1
  code = np.full(n_columns, -1, np.int32)
  column_inverse = np.zeros(n_columns, np.float64)
  column_token = np.zeros(n_columns, np.int32)
  for j in range(n_columns):
    t = column_to_target[j]
    if t >= 0:
      code[j] = t if hits[t] == 1 else -2 - t
      column_inverse[j] = inverse_median[t]
      column_token[j] = target_tokens[t]
  slot = hits  # slot[t]: entry of duplicated target t in the current row, or -1
  slot[:] = -1
  max_len = capacity = 0
  for i in range(n):
    length = indptr[i + 1] - indptr[i]
    max_len = max(max_len, length)
    if keep_rows[i]:
      capacity += min(length, max_genes)
  tokens = np.empty(capacity, np.int32)
  offsets = np.zeros(n + 1, np.int64)
  kept = np.zeros(n, np.bool_)
  # Per-entry scratch, reused by every row.
  column = np.empty(max_len + 1, np.int64)
  count = np.empty(max_len + 1, np.float64)
  merged = np.empty(max_len, np.int64)
  score = np.empty(max_len, np.float64)
  token = np.empty(max_len, np.int32)
  score32 = np.empty(max_len, np.float32)
  key = score32.view(np.uint32)
  a = np.empty(max_len, np.uint64)
  b = np.empty(max_len, np.uint64)
  hist = np.empty((2, 1 << _DIGIT_BITS), np.uint32)
  need = max(min_genes, 1)
  n_kept = out = 0
  for i in range(n):
    if not keep_rows[i]:
      continue
    total = 0.0
    m = n_merged = 0
    for p in range(indptr[i], indptr[i + 1]):
      c = data[p]
      total += c
      j = indices[p]
      if j < 0 or j >= n_columns:
        raise IndexError("a column index of the chunk is beyond column_to_target")
      t = code[j]
      column[m] = j  # always written, kept by advancing m: no branch to mispredict
      count[m] = c
      if t >= -1:
        m += (t >= 0) & (c != 0)
      elif c != 0:  # duplicated gene id: one entry at its first occurrence, summed
        t = -2 - t
        s = slot[t]
        if s < 0:
          slot[t] = m
          merged[n_merged] = t
          n_merged += 1
          m += 1
        else:
          count[s] += c
    for k in range(n_merged):
      slot[merged[k]] = -1
    if m < need:
      continue
    # numpy's float64 operations in numpy's order: x / total * 1e4 [log1p] * inverse.
    for k in range(m):
      score[k] = count[k] / total * 10000.0
    if log1p:
      for k in range(m):
        score[k] = np.log1p(score[k])
    for k in range(m):
      score[k] *= column_inverse[column[k]]
      token[k] = column_token[column[k]]
    for k in range(m):
      score32[k] = score[k]  # round to nearest: monotone in the float64 score
    kmin, kmax = np.uint32(0xFFFFFFFF), np.uint32(0)
    for k in range(m):
      key[k] = np.uint32(0xFFFFFFFF) - key[k]  # floats >= 0 order like their bits
      kmin = min(kmin, key[k])
      kmax = max(kmax, key[k])
    ranked = _radix_sort(m, key, kmin, kmax, a, b, hist)
    if not _sort_ties(m, ranked, score):  # pathological near-ties: a merge sort
      order = np.argsort(-score[:m], kind="mergesort")
      for k in range(m):
        ranked[k] = np.uint64(order[k])
    length = min(m, max_genes)
    for k in range(length):
      tokens[out + k] = token[ranked[k] & _LOW]
    out += length
    kept[i] = True
    n_kept += 1
    offsets[n_kept] = out
  # Over-allocated by the unmapped and merged entries: copy only if that is a lot.
  tokens = tokens[:out] if 4 * out >= 3 * capacity else tokens[:out].copy()
  return tokens, offsets[:n_kept + 1].copy(), kept


def rank_tokenize(data, indices, indptr, column_to_target, inverse_median, target_tokens,
                  keep_rows, min_genes: int, max_genes: int, log1p: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ranked gene-token sentences of a chunk of cells, straight from CSR counts.

  Args:
    data: [nnz] float32 or float64 raw counts, already checked finite, >= 0
      and integer (`qc.check_counts`), so sums are exact in any order.
    indices: [nnz] int32 or int64 source gene column of each entry, any order
      within a row.
    indptr: [cells + 1] CSR row pointers.
    column_to_target: [source genes] int64 target column, or -1 (not in the
      vocabulary), e.g. `qc.GeneMapper.column_to_target`.
    inverse_median: [targets] float64, 1 / non-zero median of each target.
    target_tokens: [targets] int32 token id of each target.
    keep_rows: [cells] bool; False drops the row before anything else.
    min_genes: drop rows with fewer distinct expressed targets (at least 1).
    max_genes: keep the top `max_genes` genes of each row.
    log1p: rank log1p(count / total * 10_000) * inverse_median.

  Returns:
    (tokens, offsets, kept): tokens [total] int32, `tokens[offsets[j]:offsets[j
    + 1]]` the sentence of the j-th kept row, highest score first (equal scores
    in row order); offsets [kept cells + 1] int64; kept [cells] bool, which rows
    were kept (keep_rows and enough expressed targets).
  """
  indptr = np.ascontiguousarray(indptr, np.int64)
  data, indices = np.asarray(data), np.asarray(indices)
  n = len(indptr) - 1
  if (n < 0 or len(keep_rows) != n or len(data) != len(indices) or indptr[0] < 0
      or len(data) < indptr[-1] or np.any(indptr[1:] < indptr[:-1])):
    raise ValueError(f"inconsistent CSR chunk: {len(indptr)} row pointers, {len(keep_rows)} "
                     f"keep flags, {len(data)} values, {len(indices)} indices")
  if len(inverse_median) != len(target_tokens):
    raise ValueError("inverse_median and target_tokens must have one entry per target")
  # One compiled specialization per (data, indices) dtype pair; others are converted.
  if data.dtype not in (np.float32, np.float64):
    data = data.astype(np.float64)
  if indices.dtype not in (np.int32, np.int64):
    indices = indices.astype(np.int64)
  data, indices = np.ascontiguousarray(data), np.ascontiguousarray(indices)
  return _kernel(data, indices, indptr, np.ascontiguousarray(column_to_target, np.int64),
                 np.ascontiguousarray(inverse_median, np.float64),
                 np.ascontiguousarray(target_tokens, np.int32),
                 np.ascontiguousarray(keep_rows, np.bool_), int(min_genes), max(int(max_genes), 0),
                 bool(log1p))


def warm_up(data_dtypes=(np.float32, np.float64), index_dtypes=(np.int32, np.int64)) -> None:
  """Compiles (or loads from numba's disk cache) the kernel for these dtypes."""
  for data_dtype in data_dtypes:
    for index_dtype in index_dtypes:
      rank_tokenize(np.ones(40, data_dtype), np.arange(40, dtype=index_dtype),
                    np.array([0, 40], np.int64), np.arange(40, dtype=np.int64), np.ones(40),
                    np.arange(40, dtype=np.int32), np.ones(1, bool), 1, 30, False)
