"""What the analyses on a trained GeneMamba (`label_transfer`, `perturb`) take in and write out.

They accept a run as a path or as an already loaded `Pretrained`, cells as an
AnnData object or a path (.h5ad, 10x folder or .h5, SOMA experiment), a gene map as a table's
path or a dict, and write tables and annotated .h5ad copies atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from genemamba_jax import rundir
from genemamba_jax.files import atomic_paths, write_h5ad
from genemamba_jax.data import genes as genes_lib
from genemamba_jax.errors import DataError
from genemamba_jax.data.readers import AnnDataSource, CountSource, open_source
from genemamba_jax.data.soma_reader import SomaOptions
from genemamba_jax.data.tokenizer import CellTokenizer

_log = logging.getLogger(__name__)

# Below this share of the genes that could match (the smaller of the input's genes and the
# model's), a file is named in a warning: typically the wrong var column, or symbols against an
# Ensembl vocabulary without --gene-map, which leaves the cells ranked on a few genes.
LOW_OVERLAP = 0.5


def load_run(run: str | os.PathLike | rundir.Pretrained) -> rundir.Pretrained:
  """A run directory or checkpoint (loaded here), or a `Pretrained` already loaded (as is)."""
  if isinstance(run, rundir.Pretrained):
    return run
  return rundir.load_pretrained(run)


def as_source(cells, name: str, layer: str | None = None, gene_column: str | None = None,
              soma: SomaOptions | None = None) -> CountSource:
  """An AnnData object (called `name` in messages) or a path (a SOMA experiment read as `soma`
  says) -> a `CountSource`."""
  if isinstance(cells, (str, os.PathLike)):
    return open_source(cells, layer, gene_column, soma=soma)
  if hasattr(cells, "obs_names") and hasattr(cells, "X"):
    return AnnDataSource(cells, name, layer, gene_column)
  raise DataError(f"{name}: expected an AnnData object or the path of an .h5ad file, 10x folder "
                  f"or .h5 file or SOMA experiment, got {type(cells).__name__}")


def as_gene_map(gene_map: str | os.PathLike | Mapping[str, str] | None
                ) -> Mapping[str, str] | None:
  """A symbol -> vocabulary id table: a file (`genes.load_gene_map`) or a mapping, or None."""
  if gene_map is None or isinstance(gene_map, Mapping):
    return gene_map
  return genes_lib.load_gene_map(gene_map)


def check_obs_column(source: CountSource, column: str, flag: str) -> None:
  """DataError naming `flag` (the option that chose `column`) and the obs columns the source has,
  when it lacks `column`."""
  if column not in source.obs_columns:
    listed = ", ".join(map(str, source.obs_columns)) or "(none)"
    raise DataError(f"{source.path}: obs has no column {column!r} ({flag}); columns there are: "
                    f"{listed}")


def obs_column(source: CountSource, column: str, flag: str) -> pd.Series:
  """obs[column] of every cell, in order, indexed by obs name (`check_obs_column` first)."""
  check_obs_column(source, column, flag)
  # Chunks carry obs columns; large ones, so the counts read alongside cost little.
  frames = [chunk.obs.set_axis(chunk.obs_names, axis=0)
            for chunk in source.chunks(8192, columns=[column])]
  if not frames:
    return pd.Series([], dtype=object, name=column)
  return pd.concat(frames)[column]


def check_gene_overlap(tokenizer: CellTokenizer, source: CountSource) -> tuple[int, int]:
  """(genes of the source in the vocabulary, genes of the source); warns when few match.

  "Few" is under `LOW_OVERLAP` of what could match at best (the smaller of the
  source's and the vocabulary's gene counts). None at all is the tokenizer's
  DataError (wrong --gene-column or a missing --gene-map).
  """
  matched = tokenizer.mapper(source).num_matched
  total, known = len(source.gene_ids), len(tokenizer.targets)
  if matched < LOW_OVERLAP * min(total, known):
    _log.warning("%s: %s of %s genes (%.1f%%) are in the model's vocabulary of %s genes; cells "
                 "are ranked on those alone (pick the var column of matching ids with "
                 "--gene-column, or map symbols with --gene-map)", source.path, f"{matched:,}",
                 f"{total:,}", 100 * matched / max(total, 1), f"{known:,}")
  return matched, total


def check_output(output: str | os.PathLike, suffixes: Sequence[str],
                 input_path: str | os.PathLike | None = None) -> str:
  """The output's suffix, one of `suffixes`; an .h5ad output needs an .h5ad input to copy."""
  suffix = Path(output).suffix
  if suffix not in suffixes:
    raise DataError(f"--output {output}: name it {' or '.join('OUT' + s for s in suffixes)}")
  if suffix == ".h5ad" and (input_path is None or Path(input_path).suffix != ".h5ad"):
    raise DataError(f"--output {output}: an .h5ad output is a copy of the input, which must be "
                    f".h5ad too ({input_path}); write .csv instead")
  return suffix


def write_csv(frame: pd.DataFrame, output: str | os.PathLike) -> None:
  """`frame` (its columns only, no index) -> CSV, atomically; missing folders are made."""
  with atomic_paths([output]) as (tmp,):
    frame.to_csv(tmp, index=False)


def write_obs_columns(input_path: str | os.PathLike, obs_names: np.ndarray,
                      columns: Mapping[str, np.ndarray], output: str | os.PathLike,
                      obsm: Mapping[str, np.ndarray] | None = None) -> None:
  """A copy of the .h5ad `input_path` with `columns` added to obs ([cells] each), atomically.

  `obsm` adds matrices ([cells, d] each) to obsm alike.

  `obs_names` are the cells the columns belong to, in order; the input must
  still hold exactly these (it could have been replaced while the model ran).
  """
  import anndata  # pylint: disable=g-import-not-at-top
  adata = anndata.read_h5ad(input_path)
  if list(adata.obs_names) != list(obs_names):
    raise DataError(f"{input_path}: its cells changed while the model ran; run again")
  for name, values in columns.items():
    adata.obs[name] = values
  for name, matrix in (obsm or {}).items():
    adata.obsm[name] = matrix
  with atomic_paths([output]) as (tmp,):
    write_h5ad(adata, tmp)
