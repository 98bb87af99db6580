"""Vectorized merging t-digest kernels over many digests at once.

Every digest in a batch is one *gene*. A batch of points (raw values or
centroids) is held as four parallel arrays sorted by `key`:

  key:    uint64 [n]; gene index in the high 32 bits, float32 bits of the
          value in the low 32 bits. Values are >= 0, where the IEEE bit
          pattern of a float32 sorts like the number, so one `np.sort` orders
          by (gene, value) for all genes together.
  mean:   float64 [n]; the value (raw point) or centroid mean.
  weight: float64 [n]; how many values the point stands for.
  pure:   bool [n]; True when every value behind the point is the same
          number. Pure runs are kept as exact point masses, see `compress`.

Compression uses a merging digest (Dunning & Ertl) whose scale function is
the usual k1 arcsine plus a zoom on the median, which is what this project
queries:

  k(q) = delta / (2 pi) * asin(2q - 1) + (delta / 10) * atan((q - 0.5) / 0.02)

One centroid spans at most about one unit of k. The k1 part alone gives
~delta / 2 centroids and a median centroid holding ~pi / delta of the values,
which on small real genes (a few hundred values with gaps between order
statistics) still misses numpy's median by a few percent. The atan part adds
~delta / 3 centroids and raises dk/dq at the median from delta / pi to
~5.3 delta, so the centroids next to the median hold single values up to
n ~ 5 delta values and n / (5.3 delta) beyond.
"""

import functools
from typing import NamedTuple

import numpy as np

_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


class Points(NamedTuple):
  """Weighted points of many genes, sorted by `key` (see module docstring)."""
  key: np.ndarray
  mean: np.ndarray
  weight: np.ndarray
  pure: np.ndarray

  @property
  def size(self) -> int:
    return self.key.size

  def gene(self) -> np.ndarray:
    """[n] int64 gene index of each point."""
    return (self.key >> _SHIFT).astype(np.int64)


def empty_points() -> Points:
  return Points(np.zeros(0, np.uint64), np.zeros(0), np.zeros(0),
                np.zeros(0, bool))


def make_keys(gene: np.ndarray, value32: np.ndarray) -> np.ndarray:
  """[n] uint64 keys from [n] gene indices and [n] float32 values >= 0."""
  return ((gene.astype(np.uint64) << _SHIFT)
          | value32.view(np.uint32).astype(np.uint64))


def key_values(key: np.ndarray) -> np.ndarray:
  """[n] float64 values stored in the low 32 bits of [n] keys."""
  return (key & _LOW32).astype(np.uint32).view(np.float32).astype(np.float64)


def run_starts(sorted_arr: np.ndarray) -> np.ndarray:
  """[runs] int64 index where each run of equal entries begins."""
  if sorted_arr.size == 0:
    return np.zeros(0, np.int64)
  change = np.empty(sorted_arr.size, bool)
  change[0] = True
  np.not_equal(sorted_arr[1:], sorted_arr[:-1], out=change[1:])
  return np.flatnonzero(change)


def _run_lengths(starts: np.ndarray, n: int) -> np.ndarray:
  return np.diff(np.append(starts, n))


def points_from_keys(keys: np.ndarray) -> Points:
  """Sorts raw value keys [n] (in place) into pure points, one per value."""
  keys.sort()
  starts = run_starts(keys)
  ukeys = keys[starts]
  count = _run_lengths(starts, keys.size).astype(np.float64)
  return Points(ukeys, key_values(ukeys), count, np.ones(ukeys.size, bool))


def sort_points(p: Points) -> Points:
  order = np.argsort(p.key, kind="stable")
  return Points(*(a[order] for a in p))


def concat_points(parts: list[Points]) -> Points:
  return Points(*(np.concatenate(a) for a in zip(*parts)))


def merge_sorted(a: Points, b: Points) -> Points:
  """Merges two key-sorted batches; cost O(|a| + |b| log |a|), no full sort."""
  if b.size == 0:
    return a
  if a.size == 0:
    return b
  pos_b = np.searchsorted(a.key, b.key, side="right") + np.arange(b.size)
  is_b = np.zeros(a.size + b.size, bool)
  is_b[pos_b] = True
  out = []
  for xa, xb in zip(a, b):
    x = np.empty(a.size + b.size, xa.dtype)
    x[pos_b] = xb
    x[~is_b] = xa
    out.append(x)
  return Points(*out)


def combine_equal(p: Points) -> Points:
  """Sums points that share a key (same gene, same float32 value)."""
  starts = run_starts(p.key)
  if starts.size == p.size:
    return p
  weight = np.add.reduceat(p.weight, starts)
  wsum = np.add.reduceat(p.weight * p.mean, starts)
  pure = np.logical_and.reduceat(p.pure, starts)
  # A pure run keeps its exact value; averaging equal numbers could round it.
  mean = np.where(pure, p.mean[starts], wsum / weight)
  return Points(p.key[starts], mean, weight, pure)


_ZOOM_WIDTH = 0.02  # quantile half-width of the zoom on the median


def scale(q: np.ndarray, compression: float) -> np.ndarray:
  """k(q) of the module docstring, for [n] quantiles in [0, 1]."""
  q = np.clip(q, 0.0, 1.0)
  return (compression / (2 * np.pi) * np.arcsin(2 * q - 1)
          + compression / 10 * np.arctan((q - 0.5) / _ZOOM_WIDTH))


@functools.lru_cache(maxsize=8)
def bin_edges(compression: float) -> np.ndarray:
  """[bins - 1] interior quantile edges q with k(q) - k(0) = 1, 2, ...

  Solved by bisection (k is increasing); 60 halvings reach float64 limits.
  """
  k0, k1 = scale(np.array([0.0, 1.0]), compression)
  target = k0 + np.arange(1, int(np.ceil(k1 - k0)))
  lo, hi = np.zeros(target.size), np.ones(target.size)
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    below = scale(mid, compression) < target
    lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
  return hi


def compress(p: Points, compression: float) -> Points:
  """Merging-digest compression of every gene in a combined, sorted batch.

  Args:
    p: points sorted by key with unique keys (see `combine_equal`).
    compression: the t-digest compression parameter (delta).

  Returns:
    Centroids sorted by key. Genes holding at most `compression` values keep
    one centroid per distinct value (exact). Larger genes group points into
    bins of one unit of k; a run of equal values too heavy for one bin keeps its own
    centroid. A pure run of weight w >= 2 is written as [1, w - 2, 1] (or
    [w/2, w/2]) equal-valued centroids: with midpoint interpolation, as in
    the tdigest package, this makes quantiles at the run's edges the exact
    order statistics, so heavily tied data (a median falling between two
    discrete values) still gives numpy's median.
  """
  n = p.size
  if n == 0:
    return p
  gene = p.gene()
  seg = run_starts(gene)
  seg_len = _run_lengths(seg, n)
  cw = np.cumsum(p.weight)
  base = cw[seg] - p.weight[seg]
  total = np.add.reduceat(p.weight, seg)
  tiny = total <= compression

  start = np.zeros(n, bool)
  start[seg] = True
  tiny_pt = np.repeat(tiny, seg_len)
  start |= tiny_pt
  big = np.flatnonzero(~tiny)
  if big.size:
    # Bin b of a gene holds the points whose mid-rank quantile lies between
    # consecutive `bin_edges`. Searching the few edges in the many points
    # (instead of evaluating k per point) keeps this O(n).
    qb = bin_edges(compression)
    edges = (base[big, None] + total[big, None] * qb[None, :]).ravel()
    mid = cw - 0.5 * p.weight
    pos = np.searchsorted(mid, edges, side="left")
    start[pos[pos < n]] = True
    cand = np.flatnonzero(~tiny_pt & (p.weight >= 2))
    if cand.size:
      si = np.searchsorted(seg, cand, side="right") - 1
      q_hi = (cw[cand] - base[si]) / total[si]
      q_lo = q_hi - p.weight[cand] / total[si]
      heavy = cand[scale(q_hi, compression) - scale(q_lo, compression) >= 1.0]
      start[heavy] = True
      start[heavy[heavy + 1 < n] + 1] = True

  gs = np.flatnonzero(start)
  single = _run_lengths(gs, n) == 1
  weight = np.add.reduceat(p.weight, gs)
  wsum = np.add.reduceat(p.weight * p.mean, gs)
  mean = np.where(single, p.mean[gs], wsum / weight)
  pure = single & p.pure[gs]
  key = make_keys(gene[gs], mean.astype(np.float32))
  return _split_pure_runs(Points(key, mean, weight, pure))


def _split_pure_runs(c: Points) -> Points:
  split = c.pure & (c.weight >= 2)
  if not split.any():
    return c
  three = split & (c.weight >= 3)
  reps = np.where(three, 3, np.where(split, 2, 1))
  idx = np.repeat(np.arange(c.size), reps)
  out = Points(*(a[idx] for a in c))
  first = np.cumsum(reps) - reps
  w = out.weight
  f3, f2 = first[three], first[split & ~three]
  w[f3], w[f3 + 1], w[f3 + 2] = 1.0, c.weight[three] - 2.0, 1.0
  w[f2] = w[f2 + 1] = c.weight[split & ~three] / 2
  return out


def medians(c: Points) -> tuple[np.ndarray, np.ndarray]:
  """Per-gene 50th percentile of compressed centroids.

  Interpolates linearly between centroid means placed at their mid-rank, as
  `tdigest.TDigest.percentile` does, so on the same centroids both agree.

  Returns:
    genes: [g] int64 gene indices present in `c`, ascending.
    values: [g] float64 median of each.
  """
  n = c.size
  gene = c.gene()
  seg = run_starts(gene)
  last = np.append(seg[1:], n) - 1
  cw = np.cumsum(c.weight)
  mid = cw - 0.5 * c.weight
  base = cw[seg] - c.weight[seg]
  target = base + 0.5 * np.add.reduceat(c.weight, seg)
  hi = np.clip(np.searchsorted(mid, target, side="left"), seg, last)
  lo = np.maximum(hi - 1, seg)
  z_lo = target - mid[lo]
  z_hi = mid[hi] - target
  span = z_lo + z_hi
  safe = np.where(span > 0, span, 1.0)
  value = np.where(span > 0,
                   (c.mean[lo] * z_hi + c.mean[hi] * z_lo) / safe, c.mean[hi])
  return gene[seg], value
