"""Per-gene t-digests of non-zero normalized expression, for gene medians.

GeneMamba ranks a cell's genes by expression divided by the gene's median
non-zero normalized expression over the corpus (Geneformer's recipe). The
medians are computed here: one t-digest per gene, streamed over chunks of
cells and over files, mergeable across processes, saved as JSON.

Values are digested in bulk: `update` only turns a chunk's non-zeros into
sort keys and buffers them; when the buffer is full, all genes are
compressed at once by the vectorized kernels in `tdigest_kernels` (one
sort over (gene, value), scale-function bins from cumulative weights, group
sums). The scale function zooms on the median, so centroids next to a gene's
median hold single values up to ~5 * compression values.

JSON file format (written atomically, UTF-8):

  {"format": "tdigest-dict", "version": 1, "compression": 200.0,
   "digests": {"<gene id>": {"n": 1234, "delta": 0.005, "K": 25,
                             "centroids": [{"m": 0.52, "c": 1}, ...]}, ...}}

Each per-gene dict is exactly the `tdigest` PyPI package's `to_dict()`
format (delta = 1 / compression, K = its default 25), sorted by mean, so
`tdigest.TDigest().update_from_dict(d)` loads it and can keep merging data.
A run of identical values appears as adjacent centroids with equal means
(e.g. weights 1, w - 2, 1); that encodes "exact point mass" for our own
loader, while the tdigest package simply merges them into one centroid (its
median then is the usual interpolated estimate, off on heavily tied data).
"""

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from genemamba_jax import files
from genemamba_jax.data import tdigest_kernels as tk
from genemamba_jax.errors import DataError

FORMAT = "tdigest-dict"
VERSION = 1
_TDIGEST_K = 25  # the tdigest package's default K, kept for its loader


class GeneDigests:
  """One t-digest per gene id, over the non-zero values fed to `update`.

  Genes with at most `compression` values are kept exactly; larger ones as
  merging digests (at most ~0.83 * compression centroids, plus exact runs of
  tied values; see `tdigest_kernels`). Medians match numpy's exactly while
  the values next to the median are kept singly, and close beyond (see
  bench/RESULTS.md, "Gene medians"). Values are stored as float32. Not thread-safe; merge per-process digests instead.
  """

  def __init__(self, compression: float = 200.0, *,
               buffer_values: int = 1 << 24):
    """Args:
      compression: t-digest delta; bigger is more accurate and larger.
      buffer_values: raw values buffered before a bulk compression (8 bytes
        each).
    """
    if not (math.isfinite(compression) and compression >= 10):
      raise ValueError(f"compression must be a number >= 10, got {compression!r}")
    self.compression = float(compression)
    self._buffer_values = int(buffer_values)
    self._ids: list[str] = []
    self._index: dict[str, int] = {}
    self._counts = np.zeros(0, np.int64)
    self._cent = tk.empty_points()
    self._raw: list[np.ndarray] = []
    self._raw_size = 0
    self._pending: list[tk.Points] = []
    self._last_ids: tuple | None = None
    self._last_cols: np.ndarray | None = None

  # ---------------------------------------------------------------- update
  def update(self, gene_ids: Sequence[str], values: sp.csr_matrix) -> None:
    """Digests the stored non-zeros of one chunk of cells.

    Args:
      gene_ids: [genes] unique gene ids; column j of `values` is gene_ids[j].
        Order and set may differ between calls.
      values: [cells, genes] scipy CSR, normalized expression (>= 0, finite).
    """
    if not sp.issparse(values):
      raise DataError(f"values must be a scipy.sparse CSR matrix, got "
                      f"{type(values).__name__}; pass scipy.sparse.csr_matrix(x)")
    if values.ndim != 2 or values.shape[1] != len(gene_ids):
      raise DataError(f"values has shape {values.shape} but {len(gene_ids)} gene "
                      "ids were given; need one id per column")
    if values.format != "csr":
      values = values.tocsr()
    if not values.has_canonical_format:
      values = values.copy()
      values.sum_duplicates()
    if values.dtype.kind not in "fiu":
      raise DataError(f"values must be real numbers, got dtype {values.dtype}")
    cols = self._columns(gene_ids)
    nnz = int(values.indptr[-1])
    data = values.data[:nnz].astype(np.float32, copy=False)
    ind = values.indices[:nnz]
    if not (np.all(data >= 0) and np.all(data < np.inf)):
      bad = int(np.flatnonzero(~((data >= 0) & (data < np.inf)))[0])
      raise DataError(
          f"values for gene {gene_ids[int(ind[bad])]!r} include {data[bad]!r}; "
          "expected finite normalized expression >= 0 (not scaled or "
          "centered data, and without NaN)")
    nonzero = data != 0
    if not nonzero.all():
      data, ind = data[nonzero], ind[nonzero]
    self._counts[cols] += np.bincount(ind, minlength=cols.size)
    self._raw.append(tk.make_keys(cols[ind], data))
    self._raw_size += data.size
    if self._raw_size >= self._buffer_values:
      self._flush()

  def _columns(self, gene_ids: Sequence[str]) -> np.ndarray:
    """[genes] int64 internal index of each id, registering new ids."""
    ids = tuple(gene_ids)
    if ids == self._last_ids:
      return self._last_cols
    if len(set(ids)) != len(ids):
      seen, dup = set(), []
      for g in ids:
        if g in seen:
          dup.append(g)
        seen.add(g)
      raise DataError(f"gene ids repeat ({len(dup)} duplicates, e.g. "
                      f"{dup[:3]}); make them unique or sum those columns")
    cols = np.fromiter((self._gene_index(g) for g in ids), np.int64, len(ids))
    self._last_ids, self._last_cols = ids, cols
    return cols

  def _gene_index(self, gene_id) -> int:
    i = self._index.get(gene_id)
    if i is None:
      if not isinstance(gene_id, str) or not gene_id:
        raise DataError(f"gene ids must be non-empty strings, got {gene_id!r}")
      i = self._index[gene_id] = len(self._ids)
      self._ids.append(str(gene_id))
      if i >= self._counts.size:
        self._counts = np.concatenate(
            [self._counts, np.zeros(max(1024, self._counts.size), np.int64)])
    return i

  def _flush(self) -> None:
    """Compresses buffered values and pending merged centroids into _cent."""
    if not self._raw and not self._pending:
      return
    cent = self._cent
    if self._pending:
      cent = tk.sort_points(tk.concat_points([cent] + self._pending))
      self._pending = []
    raw = tk.empty_points()
    if self._raw:
      raw = tk.points_from_keys(np.concatenate(self._raw))
      self._raw, self._raw_size = [], 0
    merged = tk.combine_equal(tk.merge_sorted(raw, cent))
    self._cent = tk.compress(merged, self.compression)

  def __getstate__(self) -> dict:
    # Worker processes send digests back by pickle: ship compressed
    # centroids, not the raw buffer (8 bytes per value) or the id cache.
    self._flush()
    state = self.__dict__.copy()
    state["_last_ids"] = state["_last_cols"] = None
    return state

  # ----------------------------------------------------------------- merge
  def merge(self, other: "GeneDigests") -> None:
    """Adds every value digested by `other` (left unchanged) to self."""
    if other is self:
      raise ValueError("cannot merge a GeneDigests into itself")
    other._flush()
    if other._cent.size == 0:
      return
    remap = np.fromiter((self._gene_index(g) for g in other._ids), np.int64,
                        len(other._ids))
    n = other._counts[:len(other._ids)]
    self._counts[remap] += n
    c = other._cent
    key = tk.make_keys(remap[c.gene()], c.mean.astype(np.float32))
    self._pending.append(tk.Points(key, c.mean, c.weight, c.pure))
    if sum(p.size for p in self._pending) > self._buffer_values:
      self._flush()

  # --------------------------------------------------------------- queries
  def medians(self) -> dict[str, float]:
    """Gene id -> median of its non-zero values (genes with none absent)."""
    self._flush()
    if self._cent.size == 0:
      return {}
    genes, value = tk.medians(self._cent)
    ids = self._ids
    return {ids[g]: v for g, v in zip(genes.tolist(), value.tolist())}

  def counts(self) -> dict[str, int]:
    """Gene id -> number of non-zero values seen (genes with none absent)."""
    c = self._counts[:len(self._ids)]
    return {self._ids[i]: int(c[i]) for i in np.flatnonzero(c).tolist()}

  def gene_ids(self) -> list[str]:
    """Ids of genes with at least one non-zero value, in first-seen order."""
    c = self._counts[:len(self._ids)]
    return [self._ids[i] for i in np.flatnonzero(c).tolist()]

  def num_centroids(self) -> int:
    self._flush()
    return self._cent.size

  def digest_dicts(self) -> dict[str, dict]:
    """Gene id -> digest in the tdigest package's `to_dict()` format."""
    self._flush()
    c = self._cent
    if c.size == 0:
      return {}
    seg = tk.run_starts(c.gene())
    ends = np.append(seg[1:], c.size)
    means, weights = c.mean.tolist(), _json_weights(c.weight)
    delta = 1.0 / self.compression
    out = {}
    for g, s, e in zip(c.gene()[seg].tolist(), seg.tolist(), ends.tolist()):
      out[self._ids[g]] = {
          "n": int(self._counts[g]), "delta": delta, "K": _TDIGEST_K,
          "centroids": [{"m": m, "c": w}
                        for m, w in zip(means[s:e], weights[s:e])]}
    return out

  # ------------------------------------------------------------------- I/O
  def save(self, path, atomic: bool = True) -> None:
    """Writes the JSON file (format in the module docstring), atomically unless `atomic` is
    False (for a temporary path that is renamed as part of a group: atomic.atomic_paths)."""
    write = files.write_json_atomic if atomic else files.write_json
    write(Path(path), {"format": FORMAT, "version": VERSION, "compression": self.compression,
                       "digests": self.digest_dicts()}, compact=True)

  @classmethod
  def load(cls, path) -> "GeneDigests":
    """Reads a file written by `save` (or by hand from tdigest dicts)."""
    path = Path(path)
    try:
      with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    except OSError as e:
      raise DataError(f"cannot read gene digest file {path}: {e}") from e
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
      raise DataError(f"gene digest file {path} is not valid JSON: {e}") from e
    if (not isinstance(doc, dict) or doc.get("format") != FORMAT
        or not isinstance(doc.get("digests"), dict)):
      raise DataError(
          f"{path} is not a gene digest file: expected a JSON object with "
          f'"format": "{FORMAT}" and a "digests" object; write it with '
          "GeneDigests.save")
    if doc.get("version") != VERSION:
      raise DataError(f"{path} has gene digest format version "
                      f'{doc.get("version")!r}; this code reads version {VERSION}')
    comp = doc.get("compression")
    if not isinstance(comp, (int, float)) or not comp >= 10:
      raise DataError(f'{path}: "compression" must be a number >= 10, got {comp!r}')
    out = cls(compression=float(comp))
    genes, means, weights = [], [], []
    for gene_id, d in doc["digests"].items():
      m, w = _read_digest(path, gene_id, d)
      genes.append(np.full(m.size, out._gene_index(gene_id), np.int64))
      means.append(m)
      weights.append(w)
      out._counts[genes[-1][:1]] = int(round(w.sum()))
    if genes:
      g, m, w = (np.concatenate(a) for a in (genes, means, weights))
      c = tk.sort_points(tk.Points(tk.make_keys(g, m.astype(np.float32)), m, w,
                                   np.zeros(m.size, bool)))
      out._cent = c._replace(pure=_infer_pure(c))
    return out


def _json_weights(w: np.ndarray) -> list:
  """Weights as JSON numbers: ints when whole (compact, like tdigest's)."""
  if np.all(w == np.round(w)):
    return w.astype(np.int64).tolist()
  return w.tolist()


def _read_digest(path: Path, gene_id, d) -> tuple[np.ndarray, np.ndarray]:
  """Validated ([c] means, [c] weights) of one tdigest dict."""
  where = f"{path}: digest of gene {gene_id!r}"
  if not gene_id:
    raise DataError(f'{path}: empty gene id in "digests"')
  try:
    cents = d["centroids"]
    m = np.array([c["m"] for c in cents], np.float64)
    w = np.array([c["c"] for c in cents], np.float64)
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f'{where} is not a tdigest dict with "centroids": '
                    f'[{{"m": mean, "c": count}}, ...] ({e!r})') from e
  if m.size == 0:
    raise DataError(f"{where} has no centroids; drop genes without values")
  if not (np.all(m >= 0) and np.all(m < np.inf)):
    raise DataError(f"{where} has a centroid mean outside [0, inf)")
  if not (np.all(w > 0) and np.all(w < np.inf)):
    raise DataError(f"{where} has a centroid count that is not positive")
  n = d.get("n")
  if n is not None and not (isinstance(n, (int, float))
                            and abs(n - w.sum()) <= 1e-6 * max(1.0, n)):
    raise DataError(f'{where}: "n" = {n!r} but the centroid counts sum to '
                    f"{w.sum()!r}; the digest is corrupt")
  return m, w


def _infer_pure(c: tk.Points) -> np.ndarray:
  """Purity flags of loaded centroids: singletons, and equal-mean neighbours.

  `compress` writes every pure run of weight >= 2 as >= 2 adjacent equal-mean
  centroids, so this recovers exactly the flags that were saved.
  """
  gene = c.gene()
  same = (gene[1:] == gene[:-1]) & (c.mean[1:] == c.mean[:-1])
  pure = c.weight == 1
  pure[1:] |= same
  pure[:-1] |= same
  return pure
