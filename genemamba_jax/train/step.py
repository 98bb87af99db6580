"""Pretraining's loss for the training core (train/state.py) and its evaluation step."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from genemamba_jax.train import objectives


def pretraining_loss(objective: objectives.ObjectiveConfig) -> Callable:
  """loss_fn(model, batch, rng, aux_losses) for `TrainCore`: the objective (+ auxiliary losses).

  `aux_losses` (a tuple of auxiliary-loss pytrees such as PathwayLoss and
  CoexpressionLoss, see `objectives.loss_fn`) is the step's `extra` argument, so
  their gene-set and gene-pair arrays are inputs of the compiled step rather
  than constants. Metrics add "tokens" (valid tokens of the batch) and
  "batch_checksum" (to check resumes).
  """

  def loss_fn(model, batch: dict, rng: jax.Array, aux_losses=()):
    loss, metrics = objectives.loss_fn(model, batch, rng, objective, aux_losses)
    return loss, dict(metrics, tokens=jnp.sum(batch["mask"]),
                      batch_checksum=_checksum(batch["tokens"]))

  return loss_fn


def pretraining_core(config, objective: objectives.ObjectiveConfig, optimizer_cfg,
                     num_steps: int, mesh, seed: int = 0):
  """The training core (train/state.py) of a GeneMamba pretrained with `objective`.

  `optimizer_cfg` is the config's `optimizer` section; the schedule spans
  `num_steps` optimizer updates. The training loop, the benchmarks and the tests
  all build their step here.
  """
  from genemamba_jax.model import GeneMamba  # pylint: disable=g-import-not-at-top
  from genemamba_jax.train import optimizer, state  # pylint: disable=g-import-not-at-top
  return state.TrainCore.create(
      lambda: GeneMamba(config, rngs=nnx.Rngs(seed)),
      optimizer.make_optimizer(optimizer_cfg, num_steps), pretraining_loss(objective), mesh,
      seed, schedule=optimizer.learning_rate(optimizer_cfg, num_steps),
      accumulate_steps=optimizer_cfg.accumulate_steps)


def make_eval_step(graphdef, objective: objectives.ObjectiveConfig) -> Callable:
  """(params, batch, rng, aux_losses) -> metrics, without gradients."""

  def eval_step(params, batch: dict, rng: jax.Array, aux_losses=()) -> dict:
    model = nnx.merge(graphdef, params)
    _, metrics = objectives.loss_fn(model, batch, rng, objective, aux_losses)
    return metrics

  return eval_step


def _checksum(tokens: jax.Array) -> jax.Array:
  """A fingerprint of the batch (position-weighted token sum), logged to check resumes."""
  weights = jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.float32)
  return jnp.sum(tokens.astype(jnp.float32) * weights)
