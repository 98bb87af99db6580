"""Pretraining objectives: leak-free next-gene prediction, the paper's faithful one, and MLM.

* `next_gene` (default): the token at position t is predicted from the
  forward stream at t - 1 (tokens before t) and the reverse stream at t + 1
  (tokens after t) of a separate-streams model (`GeneMambaConfig(streams=
  "separate")`, `GeneMamba.encode_next_gene`): nothing at t is seen.
* `next_gene_faithful`: the paper's L_lang exactly as the original code
  computes it, cross-entropy of `logits[:, :-1]` against `tokens[:, 1:]` on the
  mixed model. With bidirectional layers the reverse stream at t has already
  read t + 1, so the loss is solvable by copying (docs/commands.md, "Objectives, and
  why the default is leak-free"); here it exists to reproduce the paper. Unlike the original, padding is masked out
  (the original trains on pad targets too).
* `mlm`: BERT-style masked genes on the mixed model: 15% of the valid gene
  positions, of which 80% become <mask>, 10% a random gene, 10% stay.

All losses are the mean over the predicted positions of the whole batch; pad
and `special_ids` (<cls>, <eos>) are never predicted nor masked. Random draws
for position t of row b depend only on (rng, b, t), so padding a batch to a
longer width does not change any loss.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

OBJECTIVES = ("next_gene", "next_gene_faithful", "mlm")
# Fractions of the chosen MLM positions replaced by <mask>, and by <mask> or a random gene.
_MASK_FRACTION, _CORRUPT_FRACTION = 0.8, 0.9


class LeakWarning(UserWarning):
  """The objective can be solved by copying its target from the input (see docs/commands.md)."""


def model_streams_for(objective: str) -> str:
  """The `GeneMambaConfig.streams` an objective trains: "separate" for next_gene, else "mixed"."""
  if objective not in OBJECTIVES:
    raise ValueError(f"objective {objective!r}; use one of {OBJECTIVES}")
  return "separate" if objective == "next_gene" else "mixed"


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Which objective, and the token ids it must treat specially.

  special_ids: ids never masked nor predicted besides pad and mask (<cls>,
  <eos>: the data manifest's `special_ids`). Constructing a
  `next_gene_faithful` config emits a `LeakWarning` (Python shows it once per
  calling line under the default warning filters).
  """
  name: str = "next_gene"
  pad_id: int = 0
  mask_id: int = 1
  special_ids: tuple[int, ...] = ()
  mlm_probability: float = 0.15

  def __post_init__(self):
    model_streams_for(self.name)  # validates the name
    # A tuple keeps the config hashable (it is a static argument under jit).
    object.__setattr__(self, "special_ids", tuple(int(i) for i in self.special_ids))
    if not 0.0 < self.mlm_probability <= 1.0:
      raise ValueError(f"mlm_probability={self.mlm_probability} must be in (0, 1]")
    if self.name == "next_gene_faithful":
      warnings.warn(
          "objective next_gene_faithful leaks its target: the reverse stream at t has read "
          "token t + 1, so the loss can be solved by copying (docs/commands.md, "
          "\"Objectives, and why the default is leak-free\"); use next_gene for a leak-free "
          "objective", LeakWarning, stacklevel=3)

  @property
  def excluded_ids(self) -> tuple[int, ...]:
    """Ids that are never targets nor random replacements: pad, mask and special_ids."""
    return tuple(sorted({self.pad_id, self.mask_id, *self.special_ids}))


class Predictions(NamedTuple):
  logits: jax.Array  # [B, L, V] float32; logits[:, t] predicts targets[:, t]
  targets: jax.Array  # [B, L] int32
  weights: jax.Array  # [B, L] bool: positions that count in the loss
  hidden: jax.Array | None  # [B, L, d] same-position states (for auxiliary losses), or None
  gene_mask: jax.Array  # [B, L] bool: positions whose `hidden` stands for their own gene


def position_uniform(rng: jax.Array, batch: int, length: int, n: int = 1) -> jax.Array:
  """[B, L, n] uniform [0, 1) draws; those at (b, t) depend on (rng, t, B, n), not on L.

  One key per position (fold_in t), so a wider batch gets the same draws at its
  first positions: the objectives stay padding-invariant.
  """
  keys = jax.vmap(lambda t: jax.random.fold_in(rng, t))(jnp.arange(length))
  draws = jax.vmap(lambda key: jax.random.uniform(key, (batch, n)))(keys)  # [L, B, n]
  return jnp.swapaxes(draws, 0, 1)


def _is_any(tokens: jax.Array, ids: tuple[int, ...]) -> jax.Array:
  return jnp.any(tokens[..., None] == jnp.asarray(ids, tokens.dtype), axis=-1)


def mlm_corrupt(tokens: jax.Array, mask: jax.Array, rng: jax.Array, objective: ObjectiveConfig,
                vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """tokens, mask [B, L] -> (inputs [B, L] int32, chosen [B, L] bool).

  Each valid non-excluded position is chosen with probability
  `mlm_probability`; a row with eligible positions but none chosen gets its
  eligible position of smallest draw, so every such row has a target. Chosen
  positions become <mask> (80%), a uniformly drawn gene id (10%: an id below
  `vocab_size` that is not excluded), or stay (10%).
  """
  batch, length = tokens.shape
  eligible = mask & ~_is_any(tokens, objective.excluded_ids)
  draws = position_uniform(rng, batch, length, 3)
  choose, kind, pick = draws[..., 0], draws[..., 1], draws[..., 2]
  chosen = eligible & (choose < objective.mlm_probability)
  first = jnp.argmin(jnp.where(eligible, choose, 2.0), axis=1)
  empty = ~jnp.any(chosen, axis=1) & jnp.any(eligible, axis=1)
  chosen |= empty[:, None] & (jnp.arange(length)[None, :] == first[:, None])
  genes = np.setdiff1d(np.arange(vocab_size), objective.excluded_ids).astype(np.int32)
  random_genes = jnp.asarray(genes)[jnp.minimum((pick * len(genes)).astype(jnp.int32),
                                                len(genes) - 1)]
  inputs = jnp.where(chosen & (kind < _MASK_FRACTION), objective.mask_id, tokens)
  inputs = jnp.where(chosen & (kind >= _MASK_FRACTION) & (kind < _CORRUPT_FRACTION),
                     random_genes, inputs)
  return inputs.astype(jnp.int32), chosen


def predictions(model, tokens: jax.Array, mask: jax.Array, rng: jax.Array,
                objective: ObjectiveConfig, with_hidden: bool = False) -> Predictions:
  """The objective's logits aligned with their targets (see `Predictions`)."""
  streams = model.config.streams
  if objective.name == "next_gene" and streams != "separate":
    raise ValueError("objective next_gene needs a separate-streams model: build it with "
                     "GeneMambaConfig(streams=model_streams_for('next_gene'))")
  targets_ok = mask & ~_is_any(tokens, objective.excluded_ids)
  if objective.name == "next_gene":
    # One pass gives both: the same-position states too, for an auxiliary loss.
    next_hidden, hidden = model.encode_next_gene(tokens, mask)
    return Predictions(model.logits(next_hidden), tokens, targets_ok,
                       hidden if with_hidden else None, mask)
  if objective.name == "next_gene_faithful":
    hidden = model.encode(tokens, mask)
    # Shifting the states instead of the logits gives the original's
    # logits[:, :-1] vs tokens[:, 1:] without a second [B, L, V] array.
    previous = jnp.pad(hidden, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    previous_valid = jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    return Predictions(model.logits(previous), tokens, targets_ok & previous_valid,
                       hidden if with_hidden else None, mask)
  inputs, chosen = mlm_corrupt(tokens, mask, rng, objective, model.config.vocab_size)
  hidden = model.encode(inputs, mask)
  # A corrupted position's state is not its own gene's: leave it out of auxiliary losses.
  return Predictions(model.logits(hidden), tokens, chosen,
                     hidden if with_hidden else None, mask & ~chosen)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and accuracy over the positions where `weights` (0 when none)."""
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - picked
  count = jnp.maximum(jnp.sum(weights), 1).astype(jnp.float32)
  loss = jnp.sum(jnp.where(weights, nll, 0.0)) / count
  # Correct where the target's logit is the largest. (An argmax compared with the target
  # differs only on exact ties, and XLA:CPU runs its variadic reduce over the vocabulary
  # unvectorised: visible in a small model's train step, bench/NOTES.md.)
  correct = (picked >= jnp.max(logits, axis=-1)) & weights
  return loss, jnp.sum(correct).astype(jnp.float32) / count


def _aux_tuple(aux_losses) -> tuple:
  """None, one auxiliary loss or a sequence of them -> a tuple; names must differ."""
  if aux_losses is None:
    return ()
  aux_losses = (aux_losses,) if hasattr(aux_losses, "name") else tuple(aux_losses)
  names = [aux.name for aux in aux_losses]
  if len(set(names)) != len(names):
    raise ValueError(f"auxiliary losses {names}: each name once (they are logged as loss/<name>)")
  return aux_losses


def loss_fn(model, batch: dict, rng: jax.Array, objective: ObjectiveConfig, aux_losses=None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss (objective + sum of gamma * auxiliary loss) and metrics for one batch.

  batch: {"tokens": [B, L] int32, "mask": [B, L] bool (default tokens != pad), ...}.
  aux_losses: None, or one or a sequence of auxiliary losses
  (`pathway.PathwayLoss`, `coexpression.CoexpressionLoss`: pytrees with a
  class attribute `name`, a static `gamma`, and `__call__(hidden, tokens,
  mask, rng) -> scalar`); each is applied to the same-position states of the
  genes the objective leaves uncorrupted.
  Metrics: "loss" (the total), f"loss/{name}" of the objective and of each
  auxiliary loss, and "accuracy".
  """
  aux_losses = _aux_tuple(aux_losses)
  tokens = jnp.asarray(batch["tokens"], jnp.int32)
  mask = batch.get("mask")
  mask = tokens != objective.pad_id if mask is None else jnp.asarray(mask, bool)
  objective_rng, aux_rng = jax.random.split(rng)
  pred = predictions(model, tokens, mask, objective_rng, objective, bool(aux_losses))
  loss, accuracy = cross_entropy(pred.logits, pred.targets, pred.weights)
  metrics = {f"loss/{objective.name}": loss, "accuracy": accuracy}
  total = loss
  for i, aux in enumerate(aux_losses):
    # The first keeps the key the pathway loss always had (same draws as before the
    # co-expression loss existed); the others get keys of their own.
    aux_loss = aux(pred.hidden, tokens, pred.gene_mask,
                   aux_rng if i == 0 else jax.random.fold_in(aux_rng, i))
    metrics[f"loss/{aux.name}"] = aux_loss
    total = total + aux.gamma * aux_loss
  metrics["loss"] = total
  return total, metrics
