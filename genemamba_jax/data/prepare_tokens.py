"""`prepare tokenize`: count files -> ArrayRecord shards of token sentences + manifest.

One shard per work unit (see `corpus`), written atomically; a re-run with the
same settings skips finished shards; a re-run with other settings into the
same directory is refused, so one dataset never mixes two tokenizations.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence

from genemamba_jax.data import jobs
from genemamba_jax.data import readers
from genemamba_jax.data import records
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.errors import DataError
from genemamba_jax.files import read_json, write_json_atomic
from genemamba_jax.data.tokenizer import CellTokenizer, TokenizeConfig

SETTINGS_FILE = "tokenize_settings.json"
_TOKENIZERS: dict = {}


@dataclasses.dataclass(frozen=True)
class Columns:
  """obs columns copied into every record (None = not recorded)."""
  label: str | None = None
  batch: str | None = None

  def names(self) -> list[str]:
    return [c for c in (self.label, self.batch) if c is not None]


def _tokenizer(vocab_dir: str, config: TokenizeConfig, inputs: jobs.InputConfig) -> CellTokenizer:
  key = (vocab_dir, config, inputs.gene_map)
  if key not in _TOKENIZERS:
    _TOKENIZERS[key] = CellTokenizer.from_vocab_dir(vocab_dir, config, jobs.gene_map(inputs))
  return _TOKENIZERS[key]


def _tokenize_unit(unit: jobs.Unit, paths: list[str], vocab_dir: str, out_dir: str,
                   config: TokenizeConfig, inputs: jobs.InputConfig, columns: Columns,
                   dtype: str) -> tuple[int, dict]:
  """Tokenizes one unit into shard `unit.index`; returns (cells read, shard stats)."""
  if records.is_shard_finished(out_dir, unit.index):
    stats = records.read_shard_stats(out_dir, unit.index)
    return unit.stop - unit.start, stats
  tokenizer = _tokenizer(vocab_dir, config, inputs)
  source = jobs.open_cached(paths[unit.source], inputs)
  counts = collections.Counter()
  labels, batches = set(), set()
  with records.ShardWriter(out_dir, unit.index, dtype) as writer:
    for cells in tokenizer.tokenize_source(source, unit.start, unit.stop, columns.names(), counts):
      label = cells.obs[columns.label].astype(str).to_numpy() if columns.label else None
      batch = cells.obs[columns.batch].astype(str).to_numpy() if columns.batch else None
      writer.write_chunk(cells.tokens, cells.offsets, cells.obs_names, unit.source, label, batch)
      labels.update(label if label is not None else ())
      batches.update(batch if batch is not None else ())
    matched = jobs.matched_genes(source, tokenizer.mapper(source))
    stats = {"unit": unit.index, "source": unit.source, "start": unit.start, "stop": unit.stop,
             "counts": dict(counts),
             "labels": sorted(labels), "batches": sorted(batches), "genes_matched": matched}
    writer.finish(stats)
  return unit.stop - unit.start, {**stats, "num_cells": writer.num_cells}


def _check_settings(out_dir: Path, settings: dict) -> None:
  """Records the run's settings; refuses to add shards of other settings to a dataset."""
  path = out_dir / SETTINGS_FILE
  if path.exists():
    old = read_json(path, f"delete {out_dir} and re-run")
    finished = list((out_dir / records.SHARDS_DIR).glob("*.json"))
    if old != settings and finished:
      differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
      raise DataError(f"{out_dir}: holds a tokenization with other settings (differing: "
                      f"{', '.join(differ)}); write to a new --out directory or delete this one")
  out_dir.mkdir(parents=True, exist_ok=True)
  write_json_atomic(path, settings)


def tokenize_corpus(inputs: Sequence[str | os.PathLike], vocab_dir: str | os.PathLike,
                    out_dir: str | os.PathLike, config: TokenizeConfig = TokenizeConfig(),
                    input_config: jobs.InputConfig = jobs.InputConfig(),
                    columns: Columns = Columns(), workers: int = 1,
                    cells_per_shard: int = 50_000, scheduler: str | None = None) -> dict:
  """Tokenizes every cell of `inputs` into `out_dir`; returns the manifest.

  Units run here, in `workers` processes or on the Dask cluster at `scheduler`, whose
  workers write the shards into `out_dir` (shared storage); the manifest is written here.

  Raises:
    DataError: bad input (the message names the file and what to do).
  """
  t0 = time.time()
  out_dir, vocab_dir = Path(out_dir), str(Path(vocab_dir).resolve())
  tokenizer = _tokenizer(vocab_dir, config, input_config)  # fails early on a bad vocab
  paths, units, sizes = jobs.plan(inputs, input_config, cells_per_shard)
  for path in paths:  # fail before any work on a missing column or unmatched genes
    source = jobs.open_cached(path, input_config)
    tokenizer.mapper(source)
    readers.check_obs_columns(source, columns.names())
  vocab_files = [Path(vocab_dir) / vocab_lib.VOCAB_FILE, Path(vocab_dir) / vocab_lib.MEDIANS_FILE]
  settings = {"inputs": paths, "cells": sizes, "vocab": jobs.fingerprint(vocab_files),
              "tokenize": dataclasses.asdict(config), "input": input_config.settings(),
              "columns": dataclasses.asdict(columns), "cells_per_shard": cells_per_shard}
  created = not out_dir.exists()
  _check_settings(out_dir, settings)
  try:
    shared = paths + [str(f) for f in vocab_files] + (
        [input_config.gene_map] if input_config.gene_map else [])
    return _tokenize(paths, units, sum(sizes), out_dir, vocab_dir, tokenizer, config,
                     input_config, columns, (workers, scheduler, shared), t0)
  except BaseException:  # failed or interrupted: keep finished shards (a re-run goes on) only
    _remove_unfinished(out_dir, created)
    raise


def _remove_unfinished(out_dir: Path, created: bool) -> None:
  """Removes what a failed or interrupted run leaves unfinished: the shards being written
  (their .tmp files: a worker process stopped mid-shard cannot remove its own), and when
  it finished no shard, its settings file, empty shards/, and `out_dir` itself when the run
  created it (nothing is left that a re-run trips over)."""
  shards = out_dir / records.SHARDS_DIR
  _remove_temporaries(out_dir)  # this run's writers have all stopped by now
  if any(shards.glob("*.json")):
    return
  (out_dir / SETTINGS_FILE).unlink(missing_ok=True)
  for folder in (shards, out_dir) if created else (shards,):
    with contextlib.suppress(OSError):  # not empty: someone else's files, kept
      folder.rmdir()


def _remove_temporaries(out_dir: Path) -> None:
  """Removes the shards' temporary files: every writer of this run is done, so any left are
  debris of writers that died (a killed process, a lost Dask worker); a writer of an older,
  stopped run that still goes on then fails to publish a shard that is finished anyway."""
  for tmp in (out_dir / records.SHARDS_DIR).glob("*.tmp"):
    tmp.unlink(missing_ok=True)


def _tokenize(paths, units, n_cells: int, out_dir: Path, vocab_dir: str, tokenizer: CellTokenizer,
              config: TokenizeConfig, input_config: jobs.InputConfig, columns: Columns,
              where: tuple, t0: float) -> dict:
  """The shards (finished ones skipped) and the manifest of `tokenize_corpus`."""
  dtype = jobs.token_dtype(len(tokenizer.vocab))
  shard_stats = [None] * len(units)
  args = (paths, vocab_dir, str(out_dir.resolve()), config, input_config, columns, dtype)
  workers, scheduler, shared = where  # local processes, or a Dask cluster sharing these paths
  with contextlib.closing(jobs.run_units(_tokenize_unit, units, args, workers, n_cells,
                                         "tokenize", scheduler, shared,
                                         writable=str(out_dir.resolve()))) as results:
    for stats in results:
      shard_stats[stats["unit"]] = stats
  manifest = _manifest(paths, units, shard_stats, tokenizer, config, input_config, columns, dtype)
  for i, path in enumerate(paths):
    mine = [s for s in shard_stats if s["source"] == i]
    per_file = sum((collections.Counter(s["counts"]) for s in mine), collections.Counter())
    if per_file["cells_kept"] == 0:  # its shards are all empty: drop them with the error
      for s in mine:  # sidecar first: without it the shard no longer counts as finished
        shard = records.shard_path(out_dir, s["unit"])
        for name in (shard.removesuffix(".array_record") + ".json", shard):
          if os.path.exists(name):
            os.remove(name)
    jobs.check_not_empty(per_file, path)
  _remove_temporaries(out_dir)
  records.write_manifest(out_dir, manifest)
  manifest["summary"]["seconds"] = round(time.time() - t0, 2)
  return manifest


def _manifest(paths, units, shard_stats, tokenizer, config, input_config, columns, dtype) -> dict:
  total = sum((collections.Counter(s["counts"]) for s in shard_stats), collections.Counter())
  genes = {paths[s["source"]]: tuple(s["genes_matched"]) for s in shard_stats}
  vocab = tokenizer.vocab
  return {
      "format": records.FORMAT_NAME, "version": records.FORMAT_VERSION,
      "num_cells": sum(s["num_cells"] for s in shard_stats),
      "token_dtype": dtype,
      "shards": [{"file": os.path.relpath(records.shard_path("", u.index)),
                  "num_cells": s["num_cells"], "source": u.source, "start": u.start, "stop": u.stop}
                 for u, s in zip(units, shard_stats)],
      "sources": paths,
      "labels": sorted(set().union(*(s["labels"] for s in shard_stats))),
      "batches": sorted(set().union(*(s["batches"] for s in shard_stats))),
      "label_column": columns.label, "batch_column": columns.batch,
      "vocab": vocab.token_to_id,
      "medians": tokenizer.medians,
      "special_ids": {"pad": vocab.pad_id, "mask": vocab.mask_id, "cls": vocab.cls_id,
                      "eos": vocab.eos_id},
      "settings": {**dataclasses.asdict(config), **input_config.settings()},
      # Sorted: a resumed run reads the counts of finished shards back from their sidecars
      # (sorted JSON), and its manifest must be the same bytes as an uninterrupted run's.
      "summary": {**dict(sorted(total.items())), "genes_matched": genes},
  }
