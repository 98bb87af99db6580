"""Gene pathway loss (paper section 3.3): InfoNCE that pulls together genes sharing a gene set.

The paper adds `gamma * L_pathway` (gamma = 0.1) to the language loss, with
InfoNCE on the cosine similarity of gene embeddings, positives = genes in the
same pathway, negatives = all other genes of the batch. It gives no
temperature and the released code has no such loss, so the details are ours:

* Genes are the final hidden states of a cell's genes (contextual, one per
  occurrence). Each step samples up to `genes_per_cell` genes per cell that
  belong to at least one set, so the [BK, BK] similarity costs O(batch).
* Positives of anchor i: the other sampled genes of the SAME cell that share at
  least one set with i (the cell is the context that makes a pair meaningful);
  the denominator holds every other sampled gene of the batch, other cells
  included.
* Several positives per anchor: log of the summed positive terms (SupCon's
  "L_in"), averaged over the anchors with at least one positive:

      L = mean_i -log( sum_{p in P(i)} exp(s_ip / tau) / sum_{j != i} exp(s_ij / tau) )

  The paper's formula averages -log softmax over positive pairs instead; with
  one positive per anchor both are the same.
* tau = 0.07: the usual contrastive default (MoCo, SupCon), as the paper gives none.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from genemamba_jax.data import genes as genes_lib
from genemamba_jax.errors import DataError
from genemamba_jax.data.vocab import is_special
from genemamba_jax.train.objectives import position_uniform

_log = logging.getLogger(__name__)
_MASKED = -1e9  # finite stand-in for -inf: keeps gradients of empty rows finite


def gene_token_lookup(vocab: Mapping[str, int], gene_map: Mapping[str, str] | None = None
                      ) -> Callable[[str], int | None]:
  """symbol -> vocabulary id, or None when the gene is not a (non-special) token.

  A symbol maps to `gene_map[symbol]` when that id is a token, else to itself
  when the vocabulary holds symbols (an Ensembl id passes through unchanged).
  """
  vocab = getattr(vocab, "token_to_id", vocab)
  genes = {t: i for t, i in vocab.items() if not is_special(t)}

  def token_id(symbol: str) -> int | None:
    candidates = (gene_map.get(symbol) if gene_map is not None else None, symbol)
    return next((genes[c] for c in candidates if c is not None and c in genes), None)

  return token_id


def load_gene_sets(gmt_paths: str | Path | Sequence[str | Path], vocab: Mapping[str, int],
                   gene_map: Mapping[str, str] | None = None, min_size: int = 2
                   ) -> tuple[np.ndarray, list[str]]:
  """Gene sets of GMT files as a membership matrix over the vocabulary.

  Each symbol maps to `gene_map[symbol]` (symbol -> Ensembl id, e.g.
  `genes.load_gene_map`) when that id is a vocabulary token, else to the
  symbol itself when the vocabulary holds symbols (Ensembl ids in a GMT pass
  through unchanged). Sets with fewer than `min_size` mapped genes are
  dropped; a set name repeated by a later file is prefixed with that file's
  name. The counts mapped are logged at INFO.

  Args:
    vocab: token -> id (a `Vocab.token_to_id`); special tokens are never members.

  Returns:
    (membership [vocab_size, n_sets] bool, set names), vocab_size = max id + 1.

  Raises:
    DataError: no set keeps `min_size` genes (wrong gene map for this vocabulary?).
  """
  paths = [gmt_paths] if isinstance(gmt_paths, (str, Path)) else list(gmt_paths)
  vocab = getattr(vocab, "token_to_id", vocab)
  token_id = gene_token_lookup(vocab, gene_map)
  vocab_size = max(vocab.values()) + 1
  columns, names, symbols, mapped = [], [], set(), set()
  for path in paths:
    for name, members in genes_lib.read_gmt(path).items():
      symbols.update(members)
      ids = []
      for symbol in members:
        token = token_id(symbol)
        if token is not None:
          ids.append(token)
          mapped.add(symbol)
      ids = sorted(set(ids))  # two symbols can map to one token
      if len(ids) < min_size:
        continue
      names.append(f"{Path(path).name}:{name}" if name in names else name)
      columns.append(ids)
  _log.info("gene sets: %d of %d genes mapped onto the vocabulary; %d sets kept (min_size=%d)",
            len(mapped), len(symbols), len(columns), min_size)
  if not columns:
    raise DataError(f"{', '.join(map(str, paths))}: no gene set has {min_size} genes in the "
                    f"vocabulary ({len(mapped)} of {len(symbols)} genes mapped); does the "
                    "gene map fit the vocabulary (symbols vs Ensembl ids)?")
  membership = np.zeros((vocab_size, len(columns)), bool)
  for j, ids in enumerate(columns):
    membership[ids, j] = True
  return membership, names


def sample_gene_positions(tokens: jax.Array, mask: jax.Array, eligible_ids: jax.Array,
                          genes_per_cell: int, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Up to K = genes_per_cell distinct positions per cell whose token is eligible.

  tokens, mask: [B, L]; eligible_ids: [V] bool (token in >= 1 set). Uniform
  without replacement (top-K of per-position draws, padding-invariant).

  Returns:
    (positions [B, K] int32, valid [B, K] bool); invalid slots are filler.
  """
  batch, length = tokens.shape
  eligible = mask & eligible_ids[tokens]
  scores = jnp.where(eligible, position_uniform(rng, batch, length)[..., 0], -1.0)
  if length < genes_per_cell:  # top_k needs K <= width
    scores = jnp.pad(scores, ((0, 0), (0, genes_per_cell - length)), constant_values=-1.0)
  values, positions = jax.lax.top_k(scores, genes_per_cell)
  valid = values >= 0.0
  return jnp.where(valid, positions, 0).astype(jnp.int32), valid


def sampled_similarity(hidden: jax.Array, positions: jax.Array, tau: float) -> jax.Array:
  """Cosine similarity / tau of the sampled genes' states, across the whole batch.

  hidden: [B, L, d]; positions: [B, K]. Returns [N, N] float32, N = B * K,
  row b * K + k for slot k of cell b (filler slots included: mask them).
  """
  h = jnp.take_along_axis(hidden, positions[..., None], axis=1).astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.maximum(jnp.sum(h * h, axis=-1, keepdims=True), 1e-12))
  flat = h.reshape(positions.size, -1)
  return flat @ flat.T / tau


def infonce(similarity: jax.Array, positive: jax.Array, candidates: jax.Array) -> jax.Array:
  """Multi-positive InfoNCE; 0 without any positive pair.

  similarity: [N, N] (already / tau); candidates: [N, N] bool, the terms of
  anchor i's denominator; positive: [N, N] bool, a subset of candidates, its
  numerator. The mean over the anchors with >= 1 positive of

      -log( sum_{p in positive(i)} exp(s_ip) / sum_{j in candidates(i)} exp(s_ij) )
  """
  log_positive = jax.nn.logsumexp(jnp.where(positive, similarity, _MASKED), axis=1)
  log_all = jax.nn.logsumexp(jnp.where(candidates, similarity, _MASKED), axis=1)
  anchor = jnp.any(positive, axis=1)
  per_anchor = jnp.where(anchor, log_all - log_positive, 0.0)
  return jnp.sum(per_anchor) / jnp.maximum(jnp.sum(anchor), 1).astype(jnp.float32)


def pathway_infonce(hidden: jax.Array, tokens: jax.Array, positions: jax.Array,
                    valid: jax.Array, membership: jax.Array, tau: float) -> jax.Array:
  """The InfoNCE of the module docstring on given samples; 0 without any positive pair.

  hidden: [B, L, d]; tokens: [B, L]; positions, valid: [B, K]; membership: [V, S] bool.
  """
  batch, k = positions.shape
  sets = jnp.asarray(membership)[jnp.take_along_axis(tokens, positions, axis=1)]
  sets = sets.astype(jnp.float32)  # [B, K, S]
  shared = jnp.einsum("bks,bjs->bkj", sets, sets) > 0  # within a cell only: O(B K^2 S)
  n = batch * k
  valid = valid.reshape(n)
  others = valid[:, None] & valid[None, :] & ~jnp.eye(n, dtype=bool)
  cell = jnp.arange(n) // k
  slot = jnp.arange(n) % k
  same_cell = cell[:, None] == cell[None, :]
  positive = others & same_cell & shared[cell[:, None], slot[:, None], slot[None, :]]
  return infonce(sampled_similarity(hidden, positions, tau), positive, others)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PathwayLoss:
  """`L_pathway` of paper section 3.3; `loss_fn` adds `gamma` times it.

  A pytree whose only leaf is `membership`, so a jitted step can take it as an
  argument instead of baking a [V, S] constant into the program.
  """
  name: ClassVar[str] = "pathway"  # metric "loss/pathway"
  membership: jax.Array  # [V, S] bool, from `load_gene_sets`
  gamma: float = dataclasses.field(default=0.1, metadata={"static": True})  # the paper's
  tau: float = dataclasses.field(default=0.07, metadata={"static": True})  # paper: not given
  genes_per_cell: int = dataclasses.field(default=64, metadata={"static": True})

  def __call__(self, hidden: jax.Array, tokens: jax.Array, mask: jax.Array,
               rng: jax.Array) -> jax.Array:
    """hidden [B, L, d], tokens [B, L], mask [B, L] (positions that may be sampled) -> scalar."""
    membership = jnp.asarray(self.membership, bool)
    positions, valid = sample_gene_positions(tokens, mask, jnp.any(membership, axis=1),
                                             self.genes_per_cell, rng)
    return pathway_infonce(hidden, tokens, positions, valid, membership, self.tau)
