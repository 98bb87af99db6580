"""One train step of a tiny GeneMamba on several meshes and on one device; run by test_sharding.py.

Needs 8 devices, which must exist before JAX starts, so it runs as its own
process:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_check.py

Prints one JSON object: per mesh, the loss and each updated parameter's
largest difference from the one-device run, and the layout of a few parameters.
"""

import concurrent.futures
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from genemamba_jax.train import config as train_config
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.train import optimizer, sharding

# pylint: enable=wrong-import-position

MESHES = {"one_device": (1, 1, 1), "data8": (8, 1, 1), "fsdp8": (1, 8, 1),
          "data2_fsdp2_tensor2": (2, 2, 2)}
# Every dimension divides every mesh axis except the vocabulary: 41 rows do
# not split over tensor = 2, so the embedding and LM head fall back to
# replicating that dimension. The sequential scan compiles fastest at L = 12.
MODEL = GeneMambaConfig(vocab_size=41, d_model=16, n_layers=2, mixer="mamba2", headdim=8,
                        d_state=8, scan_backend="sequential")
BATCH, LENGTH = 8, 12
SHOWN = ("layers/mixer/in_proj/kernel", "layers/mixer/conv1d/kernel", "embeddings/embedding",
         "lm_head/kernel")


def _flat(tree) -> dict:
  return {"/".join(optimizer._names(p)): x  # pylint: disable=protected-access
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _batch() -> dict:
  rng = np.random.default_rng(0)
  mask = np.arange(LENGTH)[None, :] < rng.integers(3, LENGTH + 1, BATCH)[:, None]
  tokens = np.where(mask, rng.integers(2, MODEL.vocab_size, (BATCH, LENGTH)), 0)
  return {"tokens": tokens.astype(np.int32), "mask": mask}


def main() -> None:
  if jax.device_count() != 8:
    sys.exit(f"needs 8 devices, found {jax.device_count()}; set XLA_FLAGS as the docstring says")
  cfg = train_config.default_config().optimizer
  cfg.update(lr=1e-3, warmup_steps=0)
  tx = optimizer.make_optimizer(cfg, num_steps=10)
  graphdef, params = nnx.split(GeneMamba(MODEL, rngs=nnx.Rngs(0)), nnx.Param)
  host_state = jax.device_get({"params": params, "opt_state": tx.init(params),
                               "step": jnp.zeros((), jnp.int32)})
  abstract = jax.eval_shape(lambda: host_state)
  batch = _batch()

  def train_step(state, batch):
    def loss_fn(params):  # next-token cross-entropy over valid positions
      logits = nnx.merge(graphdef, params)(batch["tokens"], batch["mask"]).logits
      ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["tokens"][:, 1:])
      weights = batch["mask"][:, 1:]
      return jnp.sum(ce * weights) / jnp.sum(weights)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
            "step": state["step"] + 1}, loss

  runs = {}
  for name, shape in MESHES.items():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))),
                              jax.devices()[:int(np.prod(shape))])
    shardings = sharding.state_shardings(abstract, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    lowered = jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                      out_shardings=(shardings, None), donate_argnums=0).lower(abstract, batch)
    runs[name] = (lowered, jax.device_put(host_state, shardings),
                  jax.device_put(batch, batch_sharding))
  # XLA compiles outside the GIL: both cores at once.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    compiled = dict(zip(runs, pool.map(lambda run: run[0].compile(), runs.values())))

  results = {}
  for name, (_, state, global_batch) in runs.items():
    new_state, loss = compiled[name](state, global_batch)
    flat = _flat(new_state["params"])
    results[name] = {
        "loss": float(loss), "params": {k: np.asarray(v) for k, v in flat.items()},
        "layout": {k: [str(flat[k].sharding.spec), list(flat[k].addressable_shards[0].data.shape)]
                   for k in SHOWN}}
  reference = results.pop("one_device")
  initial = _flat(host_state["params"])
  print(json.dumps({
      "step_size": max(float(np.max(np.abs(reference["params"][k] - v)))
                       for k, v in initial.items()),
      "meshes": {name: {
          "loss_diff": abs(r["loss"] - reference["loss"]),
          "param_diff": {k: float(np.max(np.abs(v - reference["params"][k])))
                         for k, v in r["params"].items()},
          "layout": r["layout"]} for name, r in results.items()}}))


if __name__ == "__main__":
  main()
