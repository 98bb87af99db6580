"""Co-expression InfoNCE over Gene2Vec gene pairs: the review copy's auxiliary loss, optional.

An anonymous review copy of the original PyTorch GeneMamba adds, beside the
language loss, an InfoNCE whose positives and negatives come from a gene-pair
file with 0/1 labels (the Gene2Vec format), with tau = 0.1 and weight
gamma = 0.1, over the valid gene tokens of the batch. The released code and the
paper have the pathway loss instead (`pathway.py`); this one is kept as an option.

* Genes are the final hidden states of up to `genes_per_cell` sampled gene
  occurrences per cell whose token is in at least one pair (the original takes
  every valid token; sampling keeps the [N, N] similarity linear in the batch).
* The sampled genes of the whole batch, across cells, are compared: for anchor
  i, positives = the sampled j != i whose token pair (t_i, t_j) has label 1,
  negatives = those whose pair has label 0. A pair absent from the file is
  neither, and so are two occurrences of the same token.

      L = mean_{i with >= 1 positive} -log( sum_pos exp(s_ij / tau)
                                            / (sum_pos exp(s_ij / tau) + sum_neg exp(s_ij / tau)) )

  on cosine similarities s, the arithmetic of `pathway.infonce`.
* Pairs are symmetric (both orders are stored) and a pair listed with both
  labels is dropped. Lookup without a dense [V, V] matrix: each token maps to a
  compact index over the G genes in at least one pair, and the two relations
  are bit-packed [G, ceil(G / 32)] matrices (see `CoexpressionLoss`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from genemamba_jax.data import genes as genes_lib
from genemamba_jax.errors import DataError
from genemamba_jax.train import pathway

_log = logging.getLogger(__name__)
_TEXT, _LABEL = "_text.txt", "_label.txt"


def _pair_files(pairs, labels, split: str) -> list[tuple[Path, Path]]:
  """(text, label) paths of each folder ({split}_text.txt) or *_text.txt file in `pairs`."""
  items = [pairs] if isinstance(pairs, (str, Path)) else list(pairs)
  label_items = None
  if labels is not None:
    label_items = [labels] if isinstance(labels, (str, Path)) else list(labels)
    if len(label_items) != len(items):
      raise DataError(f"{len(items)} gene-pair files but {len(label_items)} label files; "
                      "give one label file per *_text.txt file")
  files = []
  for i, item in enumerate(items):
    path = Path(item)
    text = path / f"{split}{_TEXT}" if path.is_dir() else path
    if label_items is not None:
      label = Path(label_items[i])
    elif text.name.endswith(_TEXT):
      label = text.with_name(text.name[:-len(_TEXT)] + _LABEL)
    else:
      raise DataError(f"{path}: neither a folder of Gene2Vec pair files nor a *{_TEXT} file "
                      f"(the files come from {genes_lib.GENE2VEC_PAIRS_SOURCE}); give one, or "
                      "pass the label file")
    files.append((text, label))
  return files


def load_gene_pairs(pairs: str | Path | Sequence[str | Path], vocab: Mapping[str, int],
                    gene_map: Mapping[str, str] | None = None,
                    labels: str | Path | Sequence[str | Path] | None = None,
                    split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Gene2Vec pairs as token ids: (positive [P, 2] int32, negative [Q, 2] int32).

  Args:
    pairs: a folder of Gene2Vec pair files (its `{split}_text.txt` and
      `{split}_label.txt` are read), a `*_text.txt` file (its labels are the
      `*_label.txt` beside it), or a list of them.
    vocab: token -> id (a `Vocab.token_to_id`); special tokens are never in a pair.
    gene_map: symbol -> vocabulary token (e.g. `genes.load_gene_map`), used as
      in `pathway.load_gene_sets`: a symbol maps to `gene_map[symbol]` when
      that is a token, else to itself.
    labels: label files, one per text file, instead of the `*_label.txt` beside it.
    split: which files of a folder ("train", "valid", "test").

  Returns:
    Both orders of each pair whose two genes are distinct tokens, deduplicated
    and sorted (by first, then second id). A pair listed with both labels is
    in neither array. The counts are logged at INFO.

  Raises:
    DataError: a file is missing or malformed (see `genes.read_gene_pairs`),
      or no positive or no negative pair has both genes in the vocabulary.
  """
  files = _pair_files(pairs, labels, split)
  table = [genes_lib.read_gene_pairs(text, label) for text, label in files]
  token_id = pathway.gene_token_lookup(vocab, gene_map)
  symbols = sorted({s for t in table for s in (*t["gene_a"], *t["gene_b"])})
  ids = {s: token_id(s) for s in symbols}
  ids = {s: -1 if i is None else i for s, i in ids.items()}
  a = np.array([ids[s] for t in table for s in t["gene_a"]], np.int64)
  b = np.array([ids[s] for t in table for s in t["gene_b"]], np.int64)
  label = np.concatenate([t["label"].to_numpy() for t in table]) == 1
  mapped = (a >= 0) & (b >= 0)
  keep = mapped & (a != b)  # one token twice (or two symbols of one gene): never compared
  a, b, label = a[keep], b[keep], label[keep]
  n = max(max(getattr(vocab, "token_to_id", vocab).values()) + 1, 1)
  keys = [np.unique(np.concatenate([a[m] * n + b[m], b[m] * n + a[m]])) for m in (label, ~label)]
  conflicting = np.intersect1d(*keys)
  positive, negative = (np.setdiff1d(k, conflicting) for k in keys)
  names = ", ".join(str(text) for text, _ in files)
  n_mapped = sum(i >= 0 for i in ids.values())
  _log.info("gene pairs %s: %d of %d genes mapped onto the vocabulary; of %d pairs, %d have both "
            "genes, %d of them one token twice; %d conflicting pairs dropped; kept %d positive "
            "and %d negative pairs", names, n_mapped, len(symbols), len(keep),
            int(mapped.sum()), int((mapped & ~keep).sum()), len(conflicting) // 2,
            len(positive) // 2, len(negative) // 2)
  if not len(positive) or not len(negative):
    raise DataError(f"{names}: {len(positive) // 2} positive and {len(negative) // 2} negative "
                    f"pairs have both genes in the vocabulary ({n_mapped} of {len(symbols)} "
                    "genes mapped), need both kinds; does the gene map fit the vocabulary "
                    "(symbols vs Ensembl ids)?")
  return tuple(np.stack([k // n, k % n], axis=1).astype(np.int32) for k in (positive, negative))


def pack_pairs(pairs: np.ndarray, index: np.ndarray, num_genes: int) -> np.ndarray:
  """[P, 2] token ids -> [G, ceil(G / 32)] uint32, the pairs as bits.

  The pair (a, b) sets bit j & 31 of word [i, j >> 5], i = index[a], j = index[b]:
  ordered, as given (both orders are set only if both are listed); duplicates
  are allowed. index: [V] int32, token -> compact gene index in [0, G) (every
  token of `pairs` has one); G = num_genes (a [1, 1] zero matrix if 0).
  """
  words = max(-(-num_genes // 32), 1)
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  # Unique bit positions, so the bits summed into a word never overlap: sum == or.
  # bincount (float64 weights, exact below 2**53) avoids a slow np.bitwise_or.at.
  bit = np.unique(index[pairs[:, 0]].astype(np.int64) * (32 * words) + index[pairs[:, 1]])
  packed = np.bincount(bit >> 5, weights=np.left_shift(1, bit & 31).astype(np.float64),
                       minlength=max(num_genes, 1) * words)
  return packed.astype(np.uint32).reshape(max(num_genes, 1), words)


def pair_relations(index: jax.Array, positive: jax.Array, negative: jax.Array,
                   tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Labels of every ordered pair of N tokens: (positive, negative) [N, N] bool.

  index: [V] int32 (-1: token in no pair); positive, negative: [G, W] uint32
  (`pack_pairs`); tokens: [N] int32 ids < V. Entry (i, j) is the label of the
  pair (tokens[i], tokens[j]); a token in no pair has none.
  """
  gene = index[tokens]  # [N]
  in_pair = gene >= 0
  gene = jnp.maximum(gene, 0)  # a valid row for the gather; masked by in_pair below
  word = gene >> 5  # [N]
  shift = (gene & 31).astype(jnp.uint32)
  known = in_pair[:, None] & in_pair[None, :]

  def bits(table):
    # Rows first ([N, W], contiguous), then one word per column: two cheap gathers
    # instead of a general 2-D gather of N * N (row, word) pairs.
    rows = jnp.take(table, gene, axis=0, mode="clip")
    words = jnp.take(rows, word, axis=1, mode="clip")  # [N, N]
    return known & ((words >> shift[None, :]) & 1).astype(bool)

  return bits(positive), bits(negative)


def coexpression_infonce(hidden: jax.Array, tokens: jax.Array, positions: jax.Array,
                         valid: jax.Array, index: jax.Array, positive: jax.Array,
                         negative: jax.Array, tau: float) -> jax.Array:
  """The InfoNCE of the module docstring on given samples; 0 without any positive pair.

  hidden: [B, L, d]; tokens: [B, L]; positions, valid: [B, K]; index [V],
  positive and negative [G, W]: see `CoexpressionLoss`.
  """
  sampled = jnp.take_along_axis(tokens, positions, axis=1).reshape(-1).astype(jnp.int32)  # [N]
  is_positive, is_negative = pair_relations(index, positive, negative, sampled)  # [N, N]
  valid = valid.reshape(-1)
  # Two occurrences of one token are not a pair (this also excludes i == j).
  candidates = (valid[:, None] & valid[None, :] & (sampled[:, None] != sampled[None, :])
                & (is_positive | is_negative))
  return pathway.infonce(pathway.sampled_similarity(hidden, positions, tau),
                         candidates & is_positive, candidates)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CoexpressionLoss:
  """The review copy's co-expression InfoNCE; `loss_fn` adds `gamma` times it.

  A pytree whose leaves are the pair arrays, so a jitted step takes them as an
  argument instead of baking them into the program. Build it with `from_pairs`.

  The label of the token pair (a, b) is bit gj & 31 of `positive[gi, gj >> 5]`
  (or of `negative`), gi = index[a], gj = index[b]: a gather and a shift per
  pair. Memory: 4 V bytes for `index` plus 2 * 4 G ceil(G / 32) ~ G^2 / 4 bytes
  for the two matrices, G the genes in at least one pair: ~40 MB at G = 12.5k;
  the Gene2Vec train pairs on the Geneformer vocabulary (V = 25,428) have
  G = 8,429, 2 x 8.9 MB. A dense [V, V] bool table would be 650 MB.
  """
  name: ClassVar[str] = "coexpression"  # metric "loss/coexpression"
  index: jax.Array  # [V] int32: token -> compact gene index in [0, G), -1 if in no pair
  positive: jax.Array  # [G, ceil(G / 32)] uint32: bit-packed label-1 pairs (`pack_pairs`)
  negative: jax.Array  # [G, ceil(G / 32)] uint32: bit-packed label-0 pairs
  gamma: float = dataclasses.field(default=0.1, metadata={"static": True})  # the review copy's
  tau: float = dataclasses.field(default=0.1, metadata={"static": True})  # the review copy's
  genes_per_cell: int = dataclasses.field(default=64, metadata={"static": True})

  @classmethod
  def from_pairs(cls, positive_pairs: np.ndarray, negative_pairs: np.ndarray, vocab_size: int,
                 **static) -> CoexpressionLoss:
    """positive_pairs [P, 2], negative_pairs [Q, 2] token ids (`load_gene_pairs`) -> the loss.

    vocab_size: the model's (every token id is below it).
    static: gamma, tau, genes_per_cell.

    Raises:
      DataError: an id outside [0, vocab_size), or a pair with both labels.
    """
    positive_pairs, negative_pairs = (np.asarray(p, np.int64).reshape(-1, 2)
                                      for p in (positive_pairs, negative_pairs))
    every = np.concatenate([positive_pairs, negative_pairs]).reshape(-1)
    if every.size and (every.min() < 0 or every.max() >= vocab_size):
      raise DataError(f"gene pairs hold token ids in [{every.min()}, {every.max()}], outside the "
                      f"vocabulary of {vocab_size} tokens; load them with this vocabulary")
    both = np.intersect1d(*(p[:, 0] * vocab_size + p[:, 1]
                            for p in (positive_pairs, negative_pairs)))
    if len(both):  # the lookup would return both labels
      raise DataError(f"{len(both)} gene pairs are both positive and negative, e.g. token ids "
                      f"{divmod(int(both[0]), vocab_size)}; give each pair one label")
    genes = np.unique(every)  # [G]
    index = np.full(vocab_size, -1, np.int32)
    index[genes] = np.arange(len(genes), dtype=np.int32)
    return cls(jnp.asarray(index), jnp.asarray(pack_pairs(positive_pairs, index, len(genes))),
               jnp.asarray(pack_pairs(negative_pairs, index, len(genes))), **static)

  def __call__(self, hidden: jax.Array, tokens: jax.Array, mask: jax.Array,
               rng: jax.Array) -> jax.Array:
    """hidden [B, L, d], tokens [B, L], mask [B, L] (positions that may be sampled) -> scalar."""
    index = jnp.asarray(self.index, jnp.int32)
    positions, valid = pathway.sample_gene_positions(tokens, mask, index >= 0,
                                                     self.genes_per_cell, rng)
    return coexpression_infonce(hidden, tokens, positions, valid, index,
                                jnp.asarray(self.positive, jnp.uint32),
                                jnp.asarray(self.negative, jnp.uint32), self.tau)
