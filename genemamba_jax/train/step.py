"""The jitted training and evaluation steps, over split NNX state.

The model is split once into a static `graphdef` and its parameters; a step
merges them inside `jax.jit`, so parameters, optimizer state and batches can
carry `NamedSharding`s (data parallel, FSDP, tensor parallel) and the state is
donated. Train state: {"params", "opt_state", "step", "rng"}.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from genemamba_jax.train import objectives


def init_state(model, tx: optax.GradientTransformation, seed: int) -> dict:
  """The train state of a freshly built model."""
  params = nnx.state(model, nnx.Param)
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(jax.random.key(seed))}


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable,
                    objective: objectives.ObjectiveConfig, accumulate_steps: int = 1) -> Callable:
  """(state, batch, aux_losses) -> (state, metrics); one optimizer update (or accumulation step).

  `aux_losses` (a tuple of auxiliary-loss pytrees such as PathwayLoss and
  CoexpressionLoss, see `objectives.loss_fn`) is an argument, not a closure, so
  their gene-set and gene-pair arrays are inputs of the compiled step rather
  than constants.
  """

  def train_step(state: dict, batch: dict, aux_losses=()) -> tuple[dict, dict]:
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    step_rng = jax.random.fold_in(step_rng, jax.process_index())

    def loss(params):
      model = nnx.merge(graphdef, params)
      return objectives.loss_fn(model, batch, step_rng, objective, aux_losses)

    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"] // accumulate_steps),
                   tokens=jnp.sum(batch["mask"]), batch_checksum=_checksum(batch["tokens"]))
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": jax.random.key_data(rng)}
    return new_state, metrics

  return train_step


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
