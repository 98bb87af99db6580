"""`prepare medians`: a vocabulary and per-gene non-zero medians from count files.

Every input is read in chunks with the same QC as tokenization; the
normalized non-zero values (`counts / total * 10_000`, or log1p of it) of each
candidate gene stream into one t-digest per gene. Work units run in parallel
processes (or on a Dask cluster) and their digests merge in unit order (the
same bytes however the units were spread). The vocabulary is every candidate
gene seen expressed at least once: `<pad>`=0, `<mask>`=1, `<cls>`=2, `<eos>`=3, then
genes sorted by id from 4. Candidates are all gene ids of the inputs (after the
optional symbol -> Ensembl map), restricted to the biotypes of a gene table
when one is given (the paper keeps protein-coding and miRNA genes).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

from genemamba_jax.data import jobs
from genemamba_jax.data import genes as genes_lib
from genemamba_jax.data import qc
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.data.digests import GeneDigests
from genemamba_jax.errors import DataError

DIGESTS_FILE = "digests.json"


@dataclasses.dataclass(frozen=True)
class MedianConfig:
  min_genes: int = 200
  primary_only: bool = True
  log1p: bool = False  # digest log1p(normalized) values (for `tokenize --log1p`)
  gene_table: str | None = None  # TSV with gene ids and biotypes
  biotypes: tuple[str, ...] = ("protein_coding", "miRNA")
  chunk_size: int = 4096


_ALLOWED: dict = {}


def _allowed_genes(config: MedianConfig) -> set[str] | None:
  if config.gene_table is None:
    return None
  if config.gene_table not in _ALLOWED:
    table = genes_lib.load_gene_table(config.gene_table)
    _ALLOWED[config.gene_table] = genes_lib.genes_with_biotypes(table, config.biotypes)
  return _ALLOWED[config.gene_table]


def candidate_mapper(source, config: MedianConfig, inputs: jobs.InputConfig
                     ) -> tuple[qc.GeneMapper, list[str]]:
  """Maps a source's genes onto its own candidate genes; returns (mapper, candidate ids)."""
  ids = source.gene_ids
  if inputs.gene_map is not None:
    ids = genes_lib.map_gene_ids(ids, jobs.gene_map(inputs))
  allowed = _allowed_genes(config)
  candidates = sorted({g for g in ids if g is not None and (allowed is None or g in allowed)})
  if not candidates:
    why = (f"in the gene table {config.gene_table} with biotypes {','.join(config.biotypes)}"
           if allowed is not None else "mapped by --gene-map")
    raise DataError(f"{source.path}: none of its {len(ids)} gene ids (e.g. "
                    f"{', '.join(map(str, source.gene_ids[:3]))}) is {why}; check --gene-column "
                    "and --gene-map")
  return qc.GeneMapper(ids, {g: i for i, g in enumerate(candidates)}), candidates


def _digest_unit(unit: jobs.Unit, paths: list[str], config: MedianConfig,
                 inputs: jobs.InputConfig) -> tuple[int, tuple]:
  source = jobs.open_cached(paths[unit.source], inputs)
  mapper, genes = candidate_mapper(source, config, inputs)
  digests, stats = GeneDigests(), collections.Counter()
  qc_config = qc.QCConfig(config.min_genes, config.primary_only, config.log1p)
  read = qc.obs_columns_to_read(source, qc_config)
  for chunk in source.chunks(config.chunk_size, unit.start, unit.stop, read):
    cells = qc.normalize_chunk(chunk, source, mapper, qc_config, stats)
    digests.update(genes, cells.values)
  matched = (mapper.num_matched, len(source.gene_ids))
  return unit.stop - unit.start, (unit.source, digests, stats, matched)


def compute_medians(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                    config: MedianConfig = MedianConfig(),
                    input_config: jobs.InputConfig = jobs.InputConfig(), workers: int = 1,
                    cells_per_unit: int = 50_000, scheduler: str | None = None
                    ) -> tuple[vocab_lib.Vocab, dict[str, float], dict]:
  """Digests every input and writes a vocabulary directory; returns (vocab, medians, info).

  Units run here, in `workers` processes or on the Dask cluster at `scheduler`; their
  digests merge in unit order, so the files written are the same bytes either way.
  """
  _allowed_genes(config)  # fail early on a bad gene table
  paths, units, sizes = jobs.plan(inputs, input_config, cells_per_unit)
  for path in paths:
    candidate_mapper(jobs.open_cached(path, input_config), config, input_config)
  digests, stats, genes = GeneDigests(), collections.Counter(), {}
  per_file = collections.defaultdict(collections.Counter)
  args = (paths, config, input_config)
  shared = paths + [p for p in (config.gene_table, input_config.gene_map) if p is not None]
  with contextlib.closing(jobs.run_units(_digest_unit, units, args, workers, sum(sizes),
                                         "medians", scheduler, shared, ordered=True)) as results:
    for source, part, part_stats, matched in results:
      digests.merge(part)
      stats.update(part_stats)
      per_file[paths[source]].update(part_stats)
      genes[paths[source]] = matched
  for path in paths:
    jobs.check_not_empty(per_file[path], path)
  info = {"source": "data", "median_space": "log1p" if config.log1p else "normalized",
          "inputs": paths, "min_genes": config.min_genes, "gene_table": config.gene_table,
          "biotypes": list(config.biotypes) if config.gene_table else None,
          "layer": input_config.layer, "gene_column": input_config.gene_column,
          "summary": {**dict(stats), "genes_matched": genes}}
  vocab, medians = write_vocab_dir(digests, out_dir, info)
  return vocab, medians, info


def write_vocab_dir(digests: GeneDigests, out_dir: str | os.PathLike, info: dict
                    ) -> tuple[vocab_lib.Vocab, dict[str, float]]:
  """Saves digests, the vocabulary of the digested genes and their medians."""
  medians = digests.medians()
  if not medians:
    raise DataError(f"{out_dir}: no gene was seen expressed; nothing to write")
  vocab = vocab_lib.Vocab.from_genes(sorted(medians))
  # One group with the vocabulary files: the directory gets all four or keeps what it had.
  save_digests = functools.partial(digests.save, atomic=False)
  vocab_lib.save_vocab_dir(Path(out_dir), vocab, medians, info,
                           extra_files={DIGESTS_FILE: save_digests})
  return vocab, medians


def merge_vocab_dirs(vocab_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike
                     ) -> tuple[vocab_lib.Vocab, dict[str, float], dict]:
  """Merges the digests of several `prepare medians` outputs (e.g. one per node)."""
  digests, spaces, summary = GeneDigests(), set(), collections.Counter()
  for d in vocab_dirs:
    path = Path(d) / DIGESTS_FILE
    if not path.exists():
      raise DataError(f"{d}: has no {DIGESTS_FILE}; only directories written by "
                      "`prepare medians` can be merged")
    digests.merge(GeneDigests.load(path))
    _, _, info = vocab_lib.load_vocab_dir(d)
    spaces.add(info.get("median_space", "normalized"))
    summary.update({k: v for k, v in info.get("summary", {}).items() if isinstance(v, int)})
  if len(spaces) > 1:
    raise DataError(f"cannot merge medians of different spaces ({', '.join(sorted(spaces))}); "
                    "compute all of them with or all without --log1p")
  info = {"source": "merged", "median_space": spaces.pop(), "merged": [str(d) for d in vocab_dirs],
          "summary": dict(summary)}
  vocab, medians = write_vocab_dir(digests, out_dir, info)
  return vocab, medians, info
