"""Jobs over a corpus of count files: gene medians, and tokenization into shards.

A corpus is split into work units of at most `cells_per_shard` consecutive
cells of one input file. Units run in this process, in `workers` processes
(spawned, each opening its files itself) or on a Dask cluster (`cluster`);
every tokenization unit writes one ArrayRecord shard atomically, so a re-run
skips finished shards and an interrupted run leaves no truncated shard behind.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import hashlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from genemamba_jax import progress
from genemamba_jax.data import genes as genes_lib
from genemamba_jax.data import qc
from genemamba_jax.data import readers
from genemamba_jax.data.soma_reader import SomaOptions, setting_keys
from genemamba_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Where counts and gene ids are found in every input file."""
  layer: str | None = None  # None = X; "raw" = raw/X; else a layer name
  gene_column: str | None = None  # var column with gene ids; None = var index
  gene_map: str | None = None  # symbol -> Ensembl id table (.pkl or TSV)
  in_memory: bool = False  # read each .h5ad whole instead of streaming it
  soma: SomaOptions = SomaOptions()  # measurement, obs filter, TileDB settings of SOMA inputs

  def settings(self) -> dict:
    """The fields as a JSON-ready dict for the files a run writes; of the TileDB settings only
    the keys (values may be credentials, e.g. vfs.s3.aws_secret_access_key)."""
    out = dataclasses.asdict(self)
    out["soma"]["tiledb_config"] = setting_keys(self.soma.tiledb_config)
    return out


@dataclasses.dataclass(frozen=True)
class Unit:
  """Cells [start, stop) of input `source` (index into the input list)."""
  index: int
  source: int
  start: int
  stop: int


_SOURCE_CACHE: dict = {}
_GENE_MAP_CACHE: dict = {}


def open_cached(path: str, config: InputConfig) -> readers.CountSource:
  """Opens an input once per process (its obs and var are read on opening)."""
  key = (str(path), config)
  if key not in _SOURCE_CACHE:
    _SOURCE_CACHE.clear()  # one file at a time: units of a file are contiguous
    _SOURCE_CACHE[key] = readers.open_source(path, config.layer, config.gene_column,
                                             config.in_memory, config.soma)
  return _SOURCE_CACHE[key]


def gene_map(config: InputConfig):
  if config.gene_map is None:
    return None
  if config.gene_map not in _GENE_MAP_CACHE:
    _GENE_MAP_CACHE[config.gene_map] = genes_lib.load_gene_map(config.gene_map)
  return _GENE_MAP_CACHE[config.gene_map]


def plan(inputs: Sequence[str | os.PathLike], config: InputConfig, cells_per_shard: int
         ) -> tuple[list[str], list[Unit], list[int]]:
  """Expands inputs and splits them into units; returns (paths, units, cells per path)."""
  if cells_per_shard < 1:
    raise DataError(f"--cells-per-shard must be >= 1, got {cells_per_shard}")
  paths = [str(p.resolve()) if isinstance(p, Path) else p for p in readers.expand_inputs(inputs)]
  units, sizes = [], []
  for i, path in enumerate(paths):
    n = open_cached(path, config).n_cells
    sizes.append(n)
    for start in range(0, max(n, 1), cells_per_shard):
      units.append(Unit(len(units), i, start, min(start + cells_per_shard, n)))
  return paths, units, sizes


def run_units(fn: Callable, units: Sequence[Unit], args: tuple, workers: int, total_cells: int,
              desc: str, scheduler: str | None = None, shared: Sequence[str] = (),
              writable: str | None = None, ordered: bool = False) -> Iterable:
  """Runs `fn(unit, *args)` for every unit, yielding results as they finish.

  Units run in this process (`workers` <= 1), in `workers` local processes, or as
  tasks on the Dask cluster at `scheduler` (see `cluster`; `shared` are the paths
  its workers must see, `writable` a folder they must write to). Each result is
  `(cells_done, payload)`; cells_done feeds the progress bar and the payloads are
  yielded, in unit order when `ordered` (so that merging them gives the same bytes
  however the units were spread). Consume it under `contextlib.closing` so that an
  error raised by the consumer closes the bar too (before the error is printed)
  rather than when the generator is collected.
  """
  # Integer cell counts (`progress.bar`), not tqdm's unit_scale, which shows 0 as "0.00".
  bar = progress.bar(total_cells, desc, "cells")
  try:
    if scheduler is not None:
      from genemamba_jax.data import cluster  # pylint: disable=g-import-not-at-top
      results = cluster.run_units(scheduler, fn, units, args, desc, shared, writable)
    elif workers <= 1:
      results = ((unit.index, fn(unit, *args)) for unit in units)
    else:
      results = _local_processes(fn, units, args, workers)
    with contextlib.closing(results):
      counted = ((i, _count(bar, result)) for i, result in results)
      if ordered:
        yield from in_order(counted, units[0].index if units else 0)
      else:
        yield from (payload for _, payload in counted)
  finally:
    bar.close()


def in_order(results: Iterable[tuple[int, object]], first: int = 0) -> Iterator[object]:
  """Yields the payloads of (index, payload) pairs in index order, holding early ones back."""
  held, next_index = {}, first
  for i, payload in results:
    held[i] = payload
    while next_index in held:
      yield held.pop(next_index)
      next_index += 1


def _count(bar, result: tuple) -> object:
  done, payload = result
  bar.update(done)
  return payload


def _local_processes(fn: Callable, units: Sequence[Unit], args: tuple, workers: int
                     ) -> Iterable[tuple[int, tuple]]:
  """(unit.index, fn(unit, *args)) from `workers` spawned processes, as units finish."""
  ctx = multiprocessing.get_context("spawn")  # HDF5 handles must not cross a fork
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx,
                                              initializer=_worker_init,
                                              initargs=(os.getpid(),)) as pool:
    futures = {pool.submit(fn, unit, *args): unit.index for unit in units}
    try:
      for future in concurrent.futures.as_completed(futures):
        yield futures[future], future.result()
    except BaseException:  # an error, Ctrl-C, SIGTERM, or the consumer stopped
      for f in futures:
        f.cancel()
      # A running unit can take minutes and cannot be cancelled; leaving the `with`
      # would wait for it. Its unfinished shard is a .tmp file the caller removes.
      for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
      raise


def _worker_init(parent: int) -> None:
  """Runs first in every worker process: it stops when the main process does.

  A main process killed outright (kill -9, the out-of-memory killer) cannot stop
  its workers; orphaned, they would live on (holding input files open, or
  finishing a shard while a re-run writes the same one). On Linux the kernel
  kills them with the parent (PR_SET_PDEATHSIG); elsewhere a thread notices the
  new parent. Ctrl-C is left to the main process, which stops the workers (in a
  terminal it reaches every process of the group, and each worker would print a
  traceback of its own).
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
      ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
  if os.getppid() != parent:  # the parent died before the line above took effect
    os._exit(1)

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(1)
    os._exit(1)

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def check_not_empty(stats: collections.Counter, where: str) -> None:
  """DataError when QC kept no cell, saying why the cells went."""
  if stats["cells_kept"] == 0:
    raise DataError(
        f"{where}: no cell is left after QC ({stats['cells_read']} read, "
        f"{stats['dropped_min_genes']} with too few expressed vocabulary genes, "
        f"{stats['dropped_not_primary']} not primary data); lower --min-genes, or check that "
        "the gene ids match the vocabulary (--gene-column / --gene-map)")


def fingerprint(paths: Iterable[str | os.PathLike]) -> str:
  """A hash of files' contents, to tell whether a re-run uses the same vocabulary."""
  h = hashlib.sha256()
  for p in paths:
    h.update(Path(p).read_bytes())
  return h.hexdigest()[:16]


def summary_lines(stats: collections.Counter, genes: dict[str, tuple[int, int]]) -> list[str]:
  """Human-readable end-of-run summary: cells read, kept, dropped and why, genes matched."""
  lines = [f"cells read: {stats['cells_read']:,}",
           f"cells kept: {stats['cells_kept']:,}",
           f"dropped, not primary data: {stats['dropped_not_primary']:,}",
           f"dropped, fewer expressed genes than --min-genes: {stats['dropped_min_genes']:,}"]
  for path, (matched, total) in list(genes.items())[:20]:
    lines.append(f"genes matched: {matched:,} of {total:,} in {path}")
  if len(genes) > 20:
    lines.append(f"... and {len(genes) - 20} more files")
  return lines


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


def matched_genes(source: readers.CountSource, mapper: qc.GeneMapper) -> tuple[int, int]:
  return mapper.num_matched, len(source.gene_ids)
