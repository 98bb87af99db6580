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
  labels is dropped. Lookup without a dense [V, V] matrix: the int32 keys
  a * V + b of the pairs, sorted, searched with `jnp.searchsorted`; V must
  be at most `MAX_VOCAB` for the keys to fit.
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
from genemamba_jax.data.errors import DataError
from genemamba_jax.train import pathway

_log = logging.getLogger(__name__)
MAX_VOCAB = 46_340  # the largest V with V * V - 1 < 2**31: every key a * V + b fits in int32
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


def pair_keys(pairs: np.ndarray, vocab_size: int) -> np.ndarray:
  """[P, 2] token ids -> [P] int32 keys a * vocab_size + b.

  Raises:
    DataError: vocab_size > MAX_VOCAB (the keys would overflow int32), or an id
      outside [0, vocab_size).
  """
  if vocab_size > MAX_VOCAB:
    raise DataError(f"vocabulary of {vocab_size} tokens: the co-expression loss's int32 pair "
                    f"keys need at most {MAX_VOCAB}; use a smaller vocabulary or leave "
                    "coexpression.pairs empty")
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  if pairs.size and (pairs.min() < 0 or pairs.max() >= vocab_size):
    raise DataError(f"gene pairs hold token ids in [{pairs.min()}, {pairs.max()}], outside the "
                    f"vocabulary of {vocab_size} tokens; load them with this vocabulary")
  return (pairs[:, 0] * vocab_size + pairs[:, 1]).astype(np.int32)


def lookup_pairs(keys: jax.Array, positive: jax.Array, query: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """keys [P] sorted int32, positive [P] bool, query [...] int32 -> (found, label) [...] bool."""
  if keys.shape[0] == 0:
    return jnp.zeros(query.shape, bool), jnp.zeros(query.shape, bool)
  index = jnp.minimum(jnp.searchsorted(keys, query), keys.shape[0] - 1)
  return keys[index] == query, positive[index]


def coexpression_infonce(hidden: jax.Array, tokens: jax.Array, positions: jax.Array,
                         valid: jax.Array, keys: jax.Array, positive: jax.Array,
                         vocab_size: int, tau: float) -> jax.Array:
  """The InfoNCE of the module docstring on given samples; 0 without any positive pair.

  hidden: [B, L, d]; tokens: [B, L] (ids < vocab_size); positions, valid: [B, K];
  keys, positive: [P] (see `CoexpressionLoss`).
  """
  sampled = jnp.take_along_axis(tokens, positions, axis=1).reshape(-1).astype(jnp.int32)  # [N]
  found, label = lookup_pairs(keys, positive,
                              sampled[:, None] * vocab_size + sampled[None, :])  # [N, N]
  valid = valid.reshape(-1)
  # Two occurrences of one token are not a pair (this also excludes i == j).
  candidates = valid[:, None] & valid[None, :] & (sampled[:, None] != sampled[None, :]) & found
  return pathway.infonce(pathway.sampled_similarity(hidden, positions, tau),
                         candidates & label, candidates)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CoexpressionLoss:
  """The review copy's co-expression InfoNCE; `loss_fn` adds `gamma` times it.

  A pytree whose leaves are the pair arrays, so a jitted step takes them as an
  argument instead of baking them into the program. Build it with `from_pairs`.
  """
  name: ClassVar[str] = "coexpression"  # metric "loss/coexpression"
  keys: jax.Array  # [P] int32, sorted: a * vocab_size + b of every pair, both orders
  positive: jax.Array  # [P] bool: the label of each key
  vocab_size: int = dataclasses.field(metadata={"static": True})  # V of the keys; tokens < V
  gamma: float = dataclasses.field(default=0.1, metadata={"static": True})  # the review copy's
  tau: float = dataclasses.field(default=0.1, metadata={"static": True})  # the review copy's
  genes_per_cell: int = dataclasses.field(default=64, metadata={"static": True})

  @classmethod
  def from_pairs(cls, positive_pairs: np.ndarray, negative_pairs: np.ndarray, vocab_size: int,
                 **static) -> CoexpressionLoss:
    """positive_pairs [P, 2], negative_pairs [Q, 2] token ids (`load_gene_pairs`) -> the loss.

    vocab_size: the model's (every token id is below it; at most MAX_VOCAB).
    static: gamma, tau, genes_per_cell.
    """
    positive_keys = pair_keys(positive_pairs, vocab_size)
    negative_keys = pair_keys(negative_pairs, vocab_size)
    both = np.intersect1d(positive_keys, negative_keys)
    if len(both):  # the lookup would return either label
      raise DataError(f"{len(both)} gene pairs are both positive and negative, e.g. token ids "
                      f"{divmod(int(both[0]), vocab_size)}; give each pair one label")
    keys = np.concatenate([positive_keys, negative_keys])
    labels = np.arange(len(keys)) < len(positive_keys)
    order = np.argsort(keys, kind="stable")
    return cls(jnp.asarray(keys[order]), jnp.asarray(labels[order]), vocab_size, **static)

  def __call__(self, hidden: jax.Array, tokens: jax.Array, mask: jax.Array,
               rng: jax.Array) -> jax.Array:
    """hidden [B, L, d], tokens [B, L], mask [B, L] (positions that may be sampled) -> scalar."""
    keys = jnp.asarray(self.keys, jnp.int32)
    in_a_pair = jnp.zeros(self.vocab_size, bool).at[keys // self.vocab_size].set(True)  # [V]
    positions, valid = pathway.sample_gene_positions(tokens, mask, in_a_pair,
                                                     self.genes_per_cell, rng)
    return coexpression_infonce(hidden, tokens, positions, valid, keys,
                                jnp.asarray(self.positive, bool), self.vocab_size, self.tau)
