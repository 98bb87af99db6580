"""The training core: one way to build a train state in its shardings and to step it.

Pretraining (train/loop.py), fine-tuning (finetune/trainer.py), the benchmarks and
the tests all go through `TrainCore`:

    core = TrainCore.create(lambda: GeneMamba(config, rngs=nnx.Rngs(seed)), tx, loss_fn,
                            mesh, seed, schedule=schedule)
    state = core.init()                                  # never whole on one host
    state, metrics = core.step(state, batch, extra)      # jitted, sharded, state donated
    state = checkpointer.restore(step, core.restore_target(), data_iterator)

The model is split once into a static graphdef and its state; the step merges
them inside `jax.jit`, so parameters, optimizer state and batches carry
`NamedSharding`s (data parallel, FSDP, tensor parallel; see train/sharding.py).
Train state: {"params", "opt_state", "step", "rng"}, plus "model_state" for a
model with state besides its parameters (BatchNorm statistics, dropout RNG
streams), which the step carries forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from genemamba_jax.train import sharding

# loss_fn(model, batch, rng, extra) -> (scalar loss, {name: scalar metric}); `extra` is a
# pytree argument of the step (auxiliary losses, class weights), not a compiled-in constant.
LossFn = Callable[[nnx.Module, dict, jax.Array, Any], tuple[jax.Array, dict]]


def _split(model: nnx.Module):
  """(graphdef, params, model_state or None): model_state is None when the model has none."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, (rest if jax.tree.leaves(rest) else None)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> dict:
  """The train state of a freshly built model."""
  _, params, model_state = _split(model)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(seed))}
  if model_state is not None:
    state["model_state"] = model_state
  return state


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: LossFn,
                    schedule: Callable | None = None, accumulate_steps: int = 1) -> Callable:
  """(state, batch, extra) -> (state, metrics): one optimizer update (or accumulation step).

  Metrics: the loss function's, plus "grad_norm" and, with a schedule, "lr".
  The step's RNG is split from the state's, so a resumed run draws as an
  uninterrupted one. It is the same on every process (one SPMD program):
  draws over the global batch differ by row, whichever process holds the row,
  so N processes draw what one process does with the same global batch.
  """

  def train_step(state: dict, batch: dict, extra=()) -> tuple[dict, dict]:
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    parts = (state["model_state"],) if "model_state" in state else ()

    def loss(params):
      # Fresh Variables for the model state in this (grad) trace: nnx refuses to update
      # BatchNorm's running statistics held by Variables of the outer (jit) trace.
      model = nnx.merge(graphdef, params, *jax.tree.map(jnp.asarray, parts))
      value, metrics = loss_fn(model, batch, step_rng, extra)
      return value, (metrics, nnx.state(model, nnx.Not(nnx.Param)) if parts else None)

    (_, (metrics, model_state)), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": jax.random.key_data(rng)}
    if parts:
      new_state["model_state"] = model_state
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    if schedule is not None:
      metrics["lr"] = schedule(state["step"] // accumulate_steps)
    return new_state, metrics

  return train_step


@dataclasses.dataclass
class TrainCore:
  """A model's train state, its shardings on `mesh` and the jitted step (see module docstring)."""
  graphdef: Any  # the model's structure, merged with the state inside the step
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  abstract_state: dict  # ShapeDtypeStructs of the train state: nothing allocated
  shardings: dict  # NamedShardings of the train state (train/sharding.py's rules)
  _build: Callable[[], dict]  # -> a fresh train state
  _step: Callable  # jitted (state, batch, extra) -> (state, metrics)

  @classmethod
  def create(cls, build_model: Callable[[], nnx.Module], tx: optax.GradientTransformation,
             loss_fn: LossFn, mesh: jax.sharding.Mesh, seed: int, *,
             schedule: Callable | None = None, accumulate_steps: int = 1) -> "TrainCore":
    graphdef = nnx.graphdef(nnx.eval_shape(build_model))
    build = lambda: init_state(build_model(), tx, seed)
    abstract = jax.eval_shape(build)
    shardings = sharding.state_shardings(abstract, mesh)
    step = jax.jit(make_train_step(graphdef, tx, loss_fn, schedule, accumulate_steps),
                   in_shardings=(shardings, sharding.batch_sharding(mesh), None),
                   out_shardings=(shardings, None), donate_argnums=0)
    return cls(graphdef, tx, mesh, abstract, shardings, build, step)

  def init(self) -> dict:
    """A fresh train state, built directly in its shardings (never whole on one host)."""
    return jax.jit(self._build, out_shardings=self.shardings)()

  def step(self, state: dict, batch: dict, extra=()) -> tuple[dict, dict]:
    """One step on a batch of global arrays (`shard_batch`); `state` is donated."""
    return self._step(state, batch, extra)

  def lower(self, state, batch, extra=()):
    """The step lowered for these (possibly abstract) arguments: `.compile()` it to time it."""
    return self._step.lower(state, batch, extra)

  def restore_target(self) -> dict:
    """The abstract state with its shardings: what `Checkpointer.restore` restores into."""
    return sharding.with_shardings(self.abstract_state, self.shardings)

  def model(self, state: dict) -> nnx.Module:
    """The model holding `state`'s parameters (and model state), for evaluation."""
    parts = (state["model_state"],) if "model_state" in state else ()
    return nnx.merge(self.graphdef, state["params"], *parts)

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_state["params"]))


def place_params(state: dict, params, shardings: dict) -> dict:
  """`state` with its parameters replaced by `params` (a pure dict of the same structure,
  numpy or jax arrays), placed in `shardings` (a warm start, a pretrained backbone)."""
  from genemamba_jax import rundir  # pylint: disable=g-import-not-at-top
  current = state["params"]
  like = nnx.to_pure_dict(current)
  values = jax.tree.map(lambda ref, value: np.asarray(value, ref.dtype), like,
                        rundir.select_like(params, like))
  nnx.replace_by_pure_dict(current, values)
  return {**state, "params": jax.device_put(current, shardings["params"])}
