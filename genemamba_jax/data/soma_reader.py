"""Reading a SOMA experiment (the CELLxGENE Census format) in chunks of cells.

A `SomaSource` is a `readers.CountSource` over one measurement of a SOMA
experiment, a local folder or a URI (``s3://...``, ``tiledb://...``). Opening it
reads the gene ids (var) and the soma_joinids of the cells that pass
``--obs-filter`` (8 bytes a selected cell); `chunks` then reads obs and X a block
of cells at a time, by joinid, so memory grows with the chunk, not with the
experiment. Cells come in joinid order (for an experiment written by
``tiledbsoma.io.from_anndata``: the AnnData's order).

Which data is read:
  measurement   ``--measurement``, default "RNA"
  counts        the X layer ``--layer`` / ``--x-layer``; by default "raw" (the
                Census's) or the measurement's only layer
  gene ids      var column ``--gene-column``; by default the AnnData var index
                the experiment was written from, else "feature_id" (the Census's)
  cell names    obs column of the AnnData obs index (from_anndata), else "obs_id",
                else the soma_joinid
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from genemamba_jax.errors import DataError, option

DEFAULT_MEASUREMENT = "RNA"
_DEFAULT_LAYER = "raw"
_DEFAULT_GENE_COLUMNS = ("var_id", "feature_id")
_DEFAULT_NAME_COLUMN = "obs_id"
_INDEX_KEY = "soma_dataframe_original_index_name"  # from_anndata's note of the index column
INSTALL = "pip install -e '.[soma]' (or pip install tiledbsoma)"


@dataclasses.dataclass(frozen=True)
class SomaOptions:
  """How a SOMA experiment is read (ignored for other inputs, except `obs_filter`: refused)."""
  measurement: str = DEFAULT_MEASUREMENT
  obs_filter: str | None = None  # a SOMA value filter, e.g. "is_primary_data == True"
  tiledb_config: tuple[tuple[str, str], ...] = ()  # TileDB settings, e.g. vfs.s3.region


def is_uri(path: str | os.PathLike) -> bool:
  """A remote location (s3://, gs://, tiledb://, ...) rather than a local path."""
  return "://" in os.fspath(path)


def is_soma(path: str | os.PathLike) -> bool:
  """A URI, or a local folder that is a TileDB group (a SOMA experiment or collection)."""
  if is_uri(path):
    return True
  p = Path(path)
  return p.is_dir() and ((p / "__tiledb_group.tdb").exists() or (p / "__group").is_dir())


def _tiledbsoma():
  try:
    import tiledbsoma  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(f"reading SOMA experiments needs tiledbsoma: {INSTALL}") from None
  return tiledbsoma


def _list(names) -> str:
  names = list(names)
  return ", ".join(map(str, names)) if names else "(none)"


class SomaSource:
  """One measurement of a SOMA experiment, as a `readers.CountSource`."""

  def __init__(self, uri: str | os.PathLike, layer: str | None = None,
               gene_column: str | None = None, options: SomaOptions = SomaOptions()):
    soma = _tiledbsoma()
    self.path = self._uri = os.fspath(uri)
    self._options = options
    self._context = soma.SOMATileDBContext(tiledb_config=dict(options.tiledb_config))
    with self._open() as exp:
      if options.measurement not in exp.ms:
        raise DataError(f"{self.path}: has no measurement {options.measurement!r} "
                        f"({option('measurement')}); measurements there are: "
                        f"{_list(exp.ms.keys())}")
      ms = exp.ms[options.measurement]
      self.layers = list(ms.X.keys()) if "X" in ms else []
      self.layer = self._pick_layer(layer)
      self._gene_column = self._pick_gene_column(ms.var, ms.var.schema.names, gene_column)
      var = ms.var.read(column_names=["soma_joinid", self._gene_column]).concat().to_pandas()
      order = np.argsort(var["soma_joinid"].to_numpy(), kind="stable")
      self.gene_ids = var[self._gene_column].astype(str).to_numpy()[order]
      self._var_joinids = var["soma_joinid"].to_numpy()[order]
      self.obs_columns = [c for c in exp.obs.schema.names if c != "soma_joinid"]
      self._name_column = self._pick_name_column(exp.obs)
      self._joinids = self._select(exp.obs)
    self.n_cells = len(self._joinids)

  def _open(self):
    soma = _tiledbsoma()
    try:
      return soma.Experiment.open(self._uri, context=self._context)
    except soma.DoesNotExistError:
      raise DataError(f"{self.path}: no SOMA object there (no such folder, or a URI that cannot "
                      f"be reached; for cloud storage see {option('tiledb_config')})") from None
    except soma.SOMAError as e:
      raise DataError(f"{self.path}: not a SOMA experiment ({self._what_it_is(e)})") from None

  def _what_it_is(self, error) -> str:
    soma = _tiledbsoma()
    try:
      with soma.open(self._uri, context=self._context) as obj:
        kind = obj.soma_type
        members = list(obj.keys()) if hasattr(obj, "keys") else []
    except Exception:  # pylint: disable=broad-except
      return str(error).splitlines()[0]
    hint = f"; its members: {_list(members)}, give the experiment among them" if members else ""
    return f"it is a {kind}{hint}"

  def _pick_layer(self, layer: str | None) -> str:
    if layer is None:
      if _DEFAULT_LAYER in self.layers or len(self.layers) != 1:
        layer = _DEFAULT_LAYER
      else:
        layer = self.layers[0]
    if layer not in self.layers:
      raise DataError(f"{self.path}: measurement {self._options.measurement!r} has no X layer "
                      f"{layer!r} ({option('layer')}); X layers there are: {_list(self.layers)}")
    return layer

  def _pick_gene_column(self, var_frame, columns, gene_column: str | None) -> str:
    columns = [c for c in columns if c != "soma_joinid"]
    if gene_column is not None:
      if gene_column not in columns:
        raise DataError(f"{self.path}: var has no column {gene_column!r} "
                        f"({option('gene_column')}); columns there are: {_list(columns)}")
      return gene_column
    index = _index_column(var_frame)
    for name in (index, *_DEFAULT_GENE_COLUMNS):
      if name in columns:
        return name
    raise DataError(f"{self.path}: var has none of the default gene id columns "
                    f"({_list(_DEFAULT_GENE_COLUMNS)}); name one with {option('gene_column')} "
                    f"among: {_list(columns)}")

  def _pick_name_column(self, obs) -> str | None:
    for name in (_index_column(obs), _DEFAULT_NAME_COLUMN):
      if name in self.obs_columns:
        return name
    return None  # the soma_joinid names the cell

  def _select(self, obs) -> np.ndarray:
    """[cells] int64: the soma_joinids of the cells passing the obs filter, ascending."""
    soma = _tiledbsoma()
    try:
      ids = [t.column("soma_joinid").to_numpy()
             for t in obs.read(column_names=["soma_joinid"], value_filter=self._options.obs_filter)]
    except soma.SOMAError as e:
      reason = str(e).splitlines()[0].replace("SOMAError: ", "").strip("'\"")
      raise DataError(f"{self.path}: {option('obs_filter')} {self._options.obs_filter!r}: "
                      f"{reason}; obs columns there are: {_list(self.obs_columns)}") from None
    return np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.int64)

  def chunks(self, chunk_size: int, start: int = 0, stop: int | None = None,
             columns: Sequence[str] = ()) -> Iterator:
    """`readers.CellChunk`s of cells [start, stop), `chunk_size` at a time (counts [cells,
    genes] CSR float32 in var joinid order)."""
    from genemamba_jax.data import readers  # pylint: disable=g-import-not-at-top
    stop = self.n_cells if stop is None else stop
    readers.check_obs_columns(self, columns)
    names = [self._name_column] if self._name_column else []
    wanted = list(dict.fromkeys([*names, *columns]))
    with self._open() as exp:
      X = exp.ms[self._options.measurement].X[self.layer]
      for lo in range(start, stop, chunk_size):
        ids = self._joinids[lo:min(lo + chunk_size, stop)]
        obs = self._read_obs(exp.obs, ids, wanted)
        cell_names = (obs[self._name_column].astype(str).to_numpy() if self._name_column
                      else ids.astype(str))
        counts = self._read_counts(X, ids)
        cell_names = np.asarray(cell_names, dtype=str)
        yield readers.CellChunk(counts, cell_names, obs[list(columns)].set_axis(cell_names), lo)

  def to_anndata(self, columns: Sequence[str] | None = None, obsm: Sequence[str] = ()):
    """The selected cells as an in-memory AnnData, for small selections (a labelled fine-tuning
    set, cells to score): cells in joinid order, named as `chunks` names them.

    X: [cells, genes] CSR float32, the counts of `self.layer`; obs: `columns` (default every
    obs column but the cell names); var: indexed by gene id (`self.gene_ids`, in order), with
    the gene id column; obsm: the named matrices of the measurement, [cells, dims].
    """
    import anndata  # pylint: disable=g-import-not-at-top
    import pandas as pd  # pylint: disable=g-import-not-at-top
    from genemamba_jax.data import readers  # pylint: disable=g-import-not-at-top
    soma = _tiledbsoma()
    columns = ([c for c in self.obs_columns if c != self._name_column] if columns is None
               else list(dict.fromkeys(columns)))
    readers.check_obs_columns(self, columns)
    names = [self._name_column] if self._name_column else []
    with self._open() as exp:
      ms = exp.ms[self._options.measurement]
      there = list(ms.obsm.keys()) if "obsm" in ms else []
      for key in obsm:
        if key not in there:
          raise DataError(f"{self.path}: measurement {self._options.measurement!r} has no obsm "
                          f"{key!r} ({option('embedding')}); obsm matrices there are: "
                          f"{_list(there)}")
      query = exp.axis_query(self._options.measurement,
                             obs_query=soma.AxisQuery(coords=(self._joinids,)))
      with warnings.catch_warnings():  # "Transforming to str index": the joinids, replaced below
        warnings.simplefilter("ignore", anndata.ImplicitModificationWarning)
        adata = query.to_anndata(
            self.layer, obsm_layers=list(obsm), obs_id_name="soma_joinid",
            var_id_name="soma_joinid",
            column_names={"obs": ["soma_joinid", *names, *columns], "var": ["soma_joinid"]})
    # Rows and columns in joinid order, whatever order the query returned them in.
    adata = adata[np.argsort(adata.obs_names.astype(np.int64), kind="stable"),
                  np.argsort(adata.var_names.astype(np.int64), kind="stable")].copy()
    cell_names = (adata.obs[self._name_column].astype(str).to_numpy() if self._name_column
                  else adata.obs_names.to_numpy())
    # Unnamed str indexes: an index named like a column cannot be written to .h5ad.
    adata.obs = adata.obs[columns].set_axis(pd.Index(cell_names.astype(str), dtype=object))
    adata.var = pd.DataFrame({self._gene_column: self.gene_ids},
                             index=pd.Index(self.gene_ids.astype(str), dtype=object))
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata

  def _read_obs(self, obs, ids: np.ndarray, columns: list[str]):
    import pandas as pd  # pylint: disable=g-import-not-at-top
    if not columns or not len(ids):
      return pd.DataFrame(index=range(len(ids)), columns=columns)
    frame = obs.read(coords=(ids,), column_names=["soma_joinid", *columns]).concat().to_pandas()
    # Reads come back in storage order: put the rows in the chunk's (joinid) order.
    return frame.set_index("soma_joinid").loc[ids].reset_index(drop=True)

  def _read_counts(self, X, ids: np.ndarray) -> sp.csr_matrix:
    shape = (len(ids), len(self.gene_ids))
    if not len(ids):
      return sp.csr_matrix(shape, dtype=np.float32)
    rows, cols, data = [], [], []
    for table in X.read(coords=(ids,)).tables():  # arrow tables of bounded size
      rows.append(table.column("soma_dim_0").to_numpy())
      cols.append(table.column("soma_dim_1").to_numpy())
      data.append(table.column("soma_data").to_numpy())
    if not rows:
      return sp.csr_matrix(shape, dtype=np.float32)
    row = np.searchsorted(ids, np.concatenate(rows))
    col = np.searchsorted(self._var_joinids, np.concatenate(cols))
    matrix = sp.coo_matrix((np.concatenate(data).astype(np.float32, copy=False), (row, col)),
                           shape=shape)
    return matrix.tocsr()  # duplicates cannot occur: (cell, gene) is the array's key


def _index_column(frame) -> str | None:
  """The column `tiledbsoma.io.from_anndata` stored the AnnData index in (its metadata note)."""
  value = frame.metadata.get(_INDEX_KEY)
  try:
    return json.loads(value) if isinstance(value, str) else None
  except ValueError:
    return value


def parse_tiledb_config(items: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
  """``["vfs.s3.region=us-west-2", ...]`` -> (("vfs.s3.region", "us-west-2"), ...)."""
  out = []
  for item in items or ():
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise DataError(f"{option('tiledb_config')} {item!r}: write it KEY=VALUE, e.g. "
                      "vfs.s3.region=us-west-2")
    out.append((key.strip(), value.strip()))
  return tuple(out)


def setting_keys(tiledb_config: Sequence[tuple[str, str]]) -> list[str]:
  """What files may record of TileDB settings: their keys, sorted; never the values, which
  may be credentials (e.g. vfs.s3.aws_secret_access_key)."""
  return sorted(key for key, _ in tiledb_config)


def add_arguments(parser) -> None:
  """The SOMA options of every command that takes `--input` (see `options`)."""
  parser.add_argument("--measurement", default=DEFAULT_MEASUREMENT,
                      help="SOMA input: the measurement to read (default RNA)")
  parser.add_argument("--obs-filter", default=None, metavar="FILTER",
                      help="SOMA input: only cells passing this obs value filter, e.g. "
                           "\"is_primary_data == True and tissue == 'blood'\"")
  parser.add_argument("--tiledb-config", action="append", default=None, metavar="KEY=VALUE",
                      help="SOMA input: a TileDB setting for cloud storage, e.g. "
                           "vfs.s3.region=us-west-2 (repeat for more)")


def options(args) -> SomaOptions:
  """The `SomaOptions` of parsed `add_arguments` options."""
  return SomaOptions(args.measurement, args.obs_filter, parse_tiledb_config(args.tiledb_config))
