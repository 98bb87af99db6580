"""Cells -> gene-rank token sentences with a vocabulary and its gene medians.

`CellTokenizer` holds what tokenization needs (vocabulary, medians, settings)
and turns chunks of any `CountSource` into token sentences:

    tokenizer = CellTokenizer.from_vocab_dir("vocab/", TokenizeConfig(max_len=2048, cls=True))
    for cells in tokenizer.tokenize_source(open_source("pbmc.h5ad")):
      cells.tokens, cells.offsets  # flat int32 ids, [cells + 1] offsets

`tokenize_anndata` does the same for an AnnData object in memory.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from genemamba_jax.data import rank_kernel
from genemamba_jax.data import genes as genes_lib
from genemamba_jax.data import qc
from genemamba_jax.data import rank_reference
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.errors import DataError, option
from genemamba_jax.data.readers import AnnDataSource, CellChunk, CountSource


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
  """How cells become sentences. Defaults follow the paper and Geneformer."""
  max_len: int = 2048  # sentence length, special tokens included
  cls: bool = False  # put <cls> first
  eos: bool = False  # put <eos> last
  log1p: bool = False  # paper section 4: rank log1p(normalized) / median
  min_genes: int = 200  # drop cells with fewer expressed vocabulary genes
  primary_only: bool = True  # keep obs.is_primary_data == True when present
  chunk_size: int = 1024  # cells per vectorized step (small chunks stay in cache)

  def __post_init__(self):
    specials = int(self.cls) + int(self.eos)
    if self.max_len <= specials:
      raise DataError(f"{option('max_len')} {self.max_len} leaves no room for genes after "
                      f"{specials} special token(s); use a larger {option('max_len')} (2048 or "
                      "4096 in the paper)")
    if self.min_genes < 0 or self.chunk_size < 1:
      raise DataError("--min-genes must be >= 0 and the chunk size >= 1")

  @property
  def qc(self) -> qc.QCConfig:
    return qc.QCConfig(self.min_genes, self.primary_only, self.log1p)


@dataclasses.dataclass
class TokenizedCells:
  """Sentences of a chunk of cells: `tokens[offsets[i]:offsets[i + 1]]` is cell i."""
  tokens: np.ndarray  # [total] int32
  offsets: np.ndarray  # [cells + 1] int64
  obs_names: np.ndarray  # [cells] str
  obs: pd.DataFrame  # requested obs columns

  def __len__(self) -> int:
    return len(self.obs_names)

  def sentences(self) -> list[np.ndarray]:
    return np.split(self.tokens, self.offsets[1:-1])


class CellTokenizer:
  """Rank tokenization with a fixed vocabulary and fixed gene medians.

  Args:
    vocab: the vocabulary; its gene tokens are the genes that can appear.
    medians: gene id -> non-zero median (in the space `config.log1p` selects).
    config: sentence settings and QC.
    gene_map: optional symbol -> Ensembl id map applied to source gene ids.
  """

  def __init__(self, vocab: vocab_lib.Vocab, medians: Mapping[str, float],
               config: TokenizeConfig = TokenizeConfig(), gene_map: Mapping[str, str] | None = None):
    self.vocab, self.config, self.gene_map = vocab, config, gene_map
    for wanted, token in ((config.cls, vocab_lib.CLS), (config.eos, vocab_lib.EOS)):
      if wanted and token not in vocab:
        raise DataError(f"the vocabulary has no {token} token (e.g. one converted from the "
                        f"original GeneMamba); tokenize without {token}")
    genes = [g for g in vocab.gene_ids if g in medians]
    # Target columns in token-id order, so equal scores rank by token id.
    genes.sort(key=vocab.token_to_id.__getitem__)
    self.targets = {g: i for i, g in enumerate(genes)}
    self.target_tokens = np.asarray([vocab.token_to_id[g] for g in genes], np.int32)
    self.medians = {g: float(medians[g]) for g in genes}
    self.inverse_median = 1.0 / np.asarray(list(self.medians.values()), np.float64)
    self.max_genes = config.max_len - int(config.cls) - int(config.eos)

  @classmethod
  def from_vocab_dir(cls, vocab_dir, config: TokenizeConfig = TokenizeConfig(),
                     gene_map: Mapping[str, str] | None = None) -> "CellTokenizer":
    vocab, medians, info = vocab_lib.load_vocab_dir(vocab_dir)
    space = info.get("median_space", "normalized")
    wanted = "log1p" if config.log1p else "normalized"
    if space != wanted:
      raise DataError(
          f"{vocab_dir}: its medians were computed on {space} values but tokenization asks for "
          f"{wanted} values ({'--log1p given' if config.log1p else 'no --log1p'}); compute matching "
          f"medians with `prepare medians{' --log1p' if config.log1p else ''}` or "
          f"{'drop' if config.log1p else 'add'} --log1p")
    return cls(vocab, medians, config, gene_map)

  def mapper(self, source: CountSource) -> qc.GeneMapper:
    """Maps the source's genes onto the vocabulary; DataError if none match."""
    ids = source.gene_ids
    if self.gene_map is not None:
      ids = genes_lib.map_gene_ids(ids, self.gene_map)
    mapper = qc.GeneMapper(ids, self.targets)
    if mapper.num_matched == 0:
      raise DataError(
          f"{source.path}: none of its {len(ids)} gene ids (e.g. {', '.join(map(str, source.gene_ids[:3]))}) "
          f"is in the vocabulary (e.g. {', '.join(list(self.targets)[:3])}); pick the var column that "
          f"holds matching ids with {option('gene_column')}, or map symbols to Ensembl ids with "
          f"{option('gene_map')}")
    return mapper

  def tokenize_source(self, source: CountSource, start: int = 0, stop: int | None = None,
                      columns: Sequence[str] = (), stats: collections.Counter | None = None
                      ) -> Iterator[TokenizedCells]:
    """Tokenizes cells [start, stop) of `source`, a chunk at a time.

    `columns` are obs columns to carry along (e.g. label and batch); drops and
    counts are added to `stats`.
    """
    stats = collections.Counter() if stats is None else stats
    mapper = self.mapper(source)
    read = qc.obs_columns_to_read(source, self.config.qc, columns)
    for chunk in source.chunks(self.config.chunk_size, start, stop, read):
      yield self.tokenize_chunk(chunk, source, mapper, stats, columns)

  def tokenize_chunk(self, chunk: CellChunk, source: CountSource, mapper: qc.GeneMapper,
                     stats: collections.Counter, columns: Sequence[str] = ()) -> TokenizedCells:
    """QC + ranking of one chunk with the compiled kernel (`fast_tokenize`)."""
    qc.check_counts(chunk, source)
    keep = qc.primary_mask(chunk, self.config.qc, stats)
    counts = chunk.counts
    tokens, offsets, kept = rank_kernel.rank_tokenize(
        counts.data, counts.indices, counts.indptr, mapper.column_to_target, self.inverse_median,
        self.target_tokens, keep, self.config.min_genes, self.max_genes, self.config.log1p)
    stats["cells_read"] += len(kept)
    stats["dropped_min_genes"] += int(np.sum(keep & ~kept))
    stats["cells_kept"] += int(np.sum(kept))
    return self._sentences(tokens, offsets, chunk.obs_names[kept],
                           chunk.obs.iloc[np.flatnonzero(kept)][list(columns)])

  def tokenize_normalized(self, cells: qc.NormalizedCells) -> TokenizedCells:
    """The numpy reference path: ranks cells that `qc.normalize_chunk` produced."""
    columns, offsets = rank_reference.rank_genes(cells.values, self.inverse_median, self.max_genes)
    return self._sentences(self.target_tokens[columns], offsets, cells.obs_names, cells.obs)

  def _sentences(self, tokens: np.ndarray, offsets: np.ndarray, obs_names: np.ndarray,
                 obs: pd.DataFrame) -> TokenizedCells:
    tokens, offsets = rank_reference.add_special_tokens(
        tokens, offsets, self.vocab.cls_id if self.config.cls else None,
        self.vocab.eos_id if self.config.eos else None)
    return TokenizedCells(tokens, offsets, obs_names, obs)


def tokenize_anndata(adata, vocab_dir, config: TokenizeConfig = TokenizeConfig(),
                     layer: str | None = None, gene_column: str | None = None,
                     gene_map: str | None = None, columns: Sequence[str] = ()
                     ) -> tuple[list[np.ndarray], pd.DataFrame, collections.Counter]:
  """Tokenizes an in-memory AnnData; returns (sentences, obs of kept cells, stats).

  The obs frame is indexed by the kept cells' names and holds `columns`.
  """
  tokenizer = CellTokenizer.from_vocab_dir(
      vocab_dir, config, genes_lib.load_gene_map(gene_map) if gene_map else None)
  source = AnnDataSource(adata, "<AnnData>", layer, gene_column)
  stats = collections.Counter()
  sentences, frames = [], []
  for cells in tokenizer.tokenize_source(source, columns=columns, stats=stats):
    sentences.extend(cells.sentences())
    frames.append(cells.obs.set_axis(cells.obs_names, axis=0))
  obs = pd.concat(frames) if frames else pd.DataFrame(columns=list(columns))
  return sentences, obs, stats
