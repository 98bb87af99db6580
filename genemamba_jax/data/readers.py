"""Reading count matrices in chunks of cells: .h5ad (streamed or in memory), 10x Cell Ranger,
SOMA experiments (the CELLxGENE Census format, `soma_reader`).

Every reader is a `CountSource`: it knows its number of cells and its gene ids,
and yields `CellChunk`s of raw counts, `chunk_size` cells at a time, so a corpus
of any size is read with bounded memory. `.h5ad` files are streamed straight
from HDF5 (only the rows of one chunk are in memory); `--in-memory` reads the
whole file with anndata first, which is faster for small compressed files.

Counts come from `X`, from `raw` (`layer="raw"`, with `raw/var` as genes) or
from a named layer. Gene ids come from the var index or a named var column.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from genemamba_jax.data import soma_reader
from genemamba_jax.errors import DataError, option


@dataclasses.dataclass
class CellChunk:
  """A block of consecutive cells of one source.

  Attributes:
    counts: [cells, genes] CSR matrix of raw counts (float32 or float64).
    obs_names: [cells] cell ids (str).
    obs: the requested obs columns for these cells (may have no columns).
    start: index of the first cell of the chunk in its source.
  """
  counts: sp.csr_matrix
  obs_names: np.ndarray
  obs: pd.DataFrame
  start: int


class CountSource(Protocol):
  """A matrix of counts, cells x genes, readable in chunks of cells."""
  path: str
  n_cells: int
  gene_ids: np.ndarray  # [genes] str
  obs_columns: list[str]  # every obs column the source has

  def chunks(self, chunk_size: int, start: int = 0, stop: int | None = None,
             columns: Sequence[str] = ()) -> Iterator[CellChunk]:
    ...


def _gene_ids_from_var(var: pd.DataFrame, gene_column: str | None, where: str) -> np.ndarray:
  if gene_column is None:
    return np.asarray(var.index.astype(str))
  if gene_column not in var.columns:
    raise DataError(
        f"{where}: var has no column {gene_column!r}; columns there are: {_list(var.columns)} "
        f"(omit {option('gene_column')} to use the var index)")
  return np.asarray(var[gene_column].astype(str))


def check_obs_columns(source: "CountSource", columns: Sequence[str]) -> None:
  """DataError naming the first of `columns` the source's obs lacks."""
  missing = [c for c in columns if c not in source.obs_columns]
  if missing:
    raise DataError(f"{source.path}: obs has no column {missing[0]!r}; columns there are: "
                    f"{_list(source.obs_columns)}")


class AnnDataSource:
  """An AnnData object (in memory or opened with `backed="r"`)."""

  def __init__(self, adata, path: str = "<AnnData>", layer: str | None = None,
               gene_column: str | None = None):
    self.path, self._adata = path, adata
    if layer is None:
      self._matrix, var = adata.X, adata.var
    elif layer == "raw":
      if adata.raw is None:
        raise DataError(f"{path}: has no .raw; layers there are: {_list(adata.layers.keys())}")
      self._matrix, var = adata.raw.X, adata.raw.var
    else:
      if layer not in adata.layers:
        raise DataError(f"{path}: has no layer {layer!r}; layers there are: "
                        f"{_list(adata.layers.keys())}{' (and raw)' if adata.raw is not None else ''}")
      self._matrix, var = adata.layers[layer], adata.var
    self.layer = layer
    self.n_cells = int(adata.n_obs)
    self.gene_ids = _gene_ids_from_var(var, gene_column, path)
    self.obs_columns = list(adata.obs.columns)
    self.layers = list(adata.layers.keys()) + (["raw"] if adata.raw is not None else [])

  def chunks(self, chunk_size, start=0, stop=None, columns=()):
    stop = self.n_cells if stop is None else stop
    check_obs_columns(self, columns)
    for lo in range(start, stop, chunk_size):
      hi = min(lo + chunk_size, stop)
      block = self._matrix[lo:hi]
      yield CellChunk(_as_csr(block), np.asarray(self._adata.obs_names[lo:hi], dtype=str),
                      self._adata.obs.iloc[lo:hi][list(columns)], lo)


def _list(names) -> str:
  names = list(names)
  return ", ".join(map(str, names)) if names else "(none)"


def _as_csr(block) -> sp.csr_matrix:
  if sp.issparse(block):
    return sp.csr_matrix(block)
  return sp.csr_matrix(np.asarray(block))


class H5adSource:
  """An .h5ad file streamed from HDF5: only one chunk of rows is in memory at a time."""

  def __init__(self, path: str | os.PathLike, layer: str | None = None,
               gene_column: str | None = None):
    import anndata.io
    self.path, self.layer = str(path), layer
    try:
      with h5py.File(self.path, "r") as f:
        self.layers = list(f["layers"].keys()) if "layers" in f else []
        if "raw" in f and "X" in f["raw"]:
          self.layers.append("raw")
        if layer is None:
          self._key, var_key = "X", "var"
        elif layer == "raw":
          if "raw" not in f or "X" not in f["raw"]:
            raise DataError(f"{self.path}: has no raw/X; layers there are: {_list(self.layers)}")
          self._key, var_key = "raw/X", "raw/var"
        else:
          if layer not in self.layers:
            raise DataError(f"{self.path}: has no layer {layer!r}; layers there are: {_list(self.layers)}")
          self._key, var_key = f"layers/{layer}", "var"
        if self._key not in f:
          raise DataError(f"{self.path}: has no {self._key} matrix; is it an AnnData .h5ad file?")
        self._obs = anndata.io.read_elem(f["obs"])
        var = anndata.io.read_elem(f[var_key])
        node = f[self._key]
        self._format = _matrix_format(node, self.path)
        shape = tuple(node.shape) if isinstance(node, h5py.Dataset) else tuple(
            node.attrs.get("shape", node.attrs.get("h5sparse_shape")))
    except DataError:
      raise
    except (OSError, KeyError, ValueError, TypeError) as e:
      raise DataError(f"{self.path}: not a readable .h5ad file (truncated or corrupt?): {e}") from e
    self.n_cells = int(shape[0])
    if len(self._obs) != self.n_cells or len(var) != shape[1]:
      raise DataError(f"{self.path}: matrix {self._key} is {shape} but obs/var have "
                      f"{len(self._obs)}/{len(var)} rows; the file is inconsistent")
    self.gene_ids = _gene_ids_from_var(var, gene_column, self.path)
    self.obs_columns = list(self._obs.columns)
    self._csc_cache = None

  def chunks(self, chunk_size, start=0, stop=None, columns=()):
    stop = self.n_cells if stop is None else stop
    check_obs_columns(self, columns)
    names = np.asarray(self._obs.index.astype(str))
    try:
      with h5py.File(self.path, "r") as f:
        node = f[self._key]
        for lo in range(start, stop, chunk_size):
          hi = min(lo + chunk_size, stop)
          yield CellChunk(self._read_rows(node, lo, hi), names[lo:hi],
                          self._obs.iloc[lo:hi][list(columns)], lo)
    except (OSError, KeyError) as e:
      raise DataError(f"{self.path}: failed reading {self._key} (truncated or corrupt?): {e}") from e

  def _read_rows(self, node, lo: int, hi: int) -> sp.csr_matrix:
    n_genes = len(self.gene_ids)
    if self._format == "dense":
      return sp.csr_matrix(node[lo:hi])
    if self._format == "csr":
      indptr = node["indptr"][lo:hi + 1].astype(np.int64)
      a, b = int(indptr[0]), int(indptr[-1])
      return sp.csr_matrix((node["data"][a:b], node["indices"][a:b], indptr - a),
                           shape=(hi - lo, n_genes))
    # CSC stores genes contiguously: rows cannot be streamed, so convert once.
    if self._csc_cache is None:
      self._csc_cache = sp.csc_matrix(
          (node["data"][:], node["indices"][:], node["indptr"][:]),
          shape=(self.n_cells, n_genes)).tocsr()
    return self._csc_cache[lo:hi]


def _matrix_format(node, path: str) -> str:
  if isinstance(node, h5py.Dataset):
    return "dense"
  kind = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", ""))
  kind = kind.decode() if isinstance(kind, bytes) else str(kind)
  if kind.startswith("csr"):
    return "csr"
  if kind.startswith("csc"):
    return "csc"
  raise DataError(f"{path}: matrix {node.name} has unknown encoding {kind!r}")


class TenXSource(AnnDataSource):
  """10x Cell Ranger output: a `filtered_feature_bc_matrix/` folder or a `.h5` file.

  Only "Gene Expression" features are kept (antibody capture, CRISPR guides, ...
  are not genes). Gene ids are the Ensembl ids (`gene_column="gene_symbols"` for
  symbols); cells are the barcodes.
  """

  def __init__(self, path: str | os.PathLike, gene_column: str | None = None):
    import anndata
    path = Path(path)
    try:
      counts, barcodes, features = (_read_10x_h5(path) if path.suffix == ".h5"
                                    else _read_10x_mtx(path))
    except DataError:
      raise
    except (OSError, KeyError, ValueError, EOFError) as e:
      raise DataError(f"{path}: not a readable 10x Cell Ranger output: {e}") from e
    keep = np.asarray(features["feature_types"] == "Gene Expression")
    var = features[keep].set_index("gene_ids")
    adata = anndata.AnnData(sp.csr_matrix(counts[:, keep]), obs=pd.DataFrame(index=barcodes), var=var)
    super().__init__(adata, str(path), None, gene_column)


def _read_10x_mtx(folder: Path):
  def find(*names):
    for name in names:
      if (folder / name).exists():
        return folder / name
    raise DataError(f"{folder}: not a 10x matrix folder: none of {', '.join(names)} found")
  opener = lambda p: gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")
  with opener(find("matrix.mtx.gz", "matrix.mtx")) as fh:
    counts = sp.csr_matrix(scipy.io.mmread(fh).T)  # stored genes x cells
  feature_file = find("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
  features = pd.read_csv(feature_file, sep="\t", header=None, dtype=str)
  if features.shape[1] == 2:  # Cell Ranger v2 genes.tsv: id, symbol
    features[2] = "Gene Expression"
  features = features.iloc[:, :3].set_axis(["gene_ids", "gene_symbols", "feature_types"], axis=1)
  barcodes = pd.read_csv(find("barcodes.tsv.gz", "barcodes.tsv"), sep="\t", header=None,
                         dtype=str)[0].to_numpy()
  if counts.shape != (len(barcodes), len(features)):
    raise DataError(f"{folder}: matrix is {counts.shape[::-1]} (features x cells) but there are "
                    f"{len(features)} features and {len(barcodes)} barcodes")
  return counts, barcodes, features


def _read_10x_h5(path: Path):
  with h5py.File(path, "r") as f:
    if "matrix" not in f:
      raise DataError(f"{path}: no 'matrix' group; only Cell Ranger v3+ .h5 files are supported")
    m = f["matrix"]
    n_features, n_cells = m["shape"][:]
    # Stored as CSC of features x cells, i.e. CSR of cells x features.
    counts = sp.csr_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_cells, n_features))
    dec = lambda a: np.char.decode(a[:].astype(bytes), "utf-8") if a.dtype.kind in "SO" else a[:]
    features = pd.DataFrame({"gene_ids": dec(m["features/id"]), "gene_symbols": dec(m["features/name"]),
                             "feature_types": dec(m["features/feature_type"])})
    barcodes = dec(m["barcodes"])
  return counts, barcodes, features


def open_source(path: str | os.PathLike, layer: str | None = None, gene_column: str | None = None,
                in_memory: bool = False, soma: soma_reader.SomaOptions | None = None
                ) -> CountSource:
  """Opens one input: an .h5ad file, a 10x folder or .h5 file, or a SOMA experiment (a folder
  or a URI, read as `soma` says)."""
  soma = soma or soma_reader.SomaOptions()
  if soma_reader.is_soma(path):
    return soma_reader.SomaSource(path, layer, gene_column, soma)
  if soma.obs_filter is not None:
    raise DataError(f"{path}: {option('obs_filter')} applies to SOMA experiments; select the "
                    "cells of an .h5ad or 10x input before")
  p = Path(path)
  if not p.exists():
    raise DataError(f"{p}: no such file or directory")
  if p.is_dir() or p.suffix == ".h5":
    if layer is not None:
      raise DataError(f"{p}: {option('layer')} applies to .h5ad files; a 10x output has only "
                      "its counts")
    return TenXSource(p, gene_column=gene_column)
  if p.suffix != ".h5ad":
    raise DataError(f"{p}: unsupported input; give .h5ad files, 10x .h5 files, 10x matrix "
                    "folders or directories of them")
  if in_memory:
    import anndata
    try:
      adata = anndata.read_h5ad(p)
    except (OSError, KeyError, ValueError) as e:
      raise DataError(f"{p}: not a readable .h5ad file (truncated or corrupt?): {e}") from e
    return AnnDataSource(adata, str(p), layer, gene_column)
  return H5adSource(p, layer, gene_column)


def _is_10x_folder(p: Path) -> bool:
  return any((p / n).exists() for n in ("matrix.mtx.gz", "matrix.mtx"))


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Path | str]:
  """Files/folders to read, in order: a directory expands to its .h5ad/.h5 files, 10x matrix
  folders and SOMA experiments (sorted by name); a 10x folder or SOMA experiment stays one
  input, a URI (a remote SOMA experiment) is kept as the string given."""
  out = []
  for path in paths:
    if soma_reader.is_uri(path):
      out.append(os.fspath(path))
      continue
    p = Path(path)
    if not p.exists():
      raise DataError(f"{p}: no such file or directory")
    if p.is_dir() and not _is_10x_folder(p) and not soma_reader.is_soma(p):
      found = sorted(c for c in p.iterdir() if not c.name.startswith(".") and (
          c.suffix in (".h5ad", ".h5") or (c.is_dir() and (_is_10x_folder(c)
                                                            or soma_reader.is_soma(c)))))
      if not found:
        raise DataError(f"{p}: directory holds no .h5ad, 10x .h5, 10x matrix folder or SOMA "
                        "experiment")
      out.extend(found)
    else:
      out.append(p)
  return out
