"""One train step of a tiny GeneMamba on several meshes and on one device; run by test_sharding.py.

Needs 8 devices, which must exist before JAX starts, so it runs as its own
process:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train/sharding_check.py

The step is the training loop's own (`step.pretraining_core`: the TrainCore's jitted,
sharded step with donated state), its batch placed by `sharding.shard_batch` as in the loop.
Prints one JSON object: per mesh, the loss and each updated parameter's
largest difference from the one-device run, and the layout of a few parameters.
"""

import concurrent.futures
import json
import os
import sys
import warnings

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# pylint: disable=wrong-import-position
import jax
import ml_collections
import numpy as np

from genemamba_jax.model import GeneMambaConfig
from genemamba_jax.train import config as train_config
from genemamba_jax.train import objectives, optimizer, sharding
from genemamba_jax.train import step as step_lib

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
  with warnings.catch_warnings():  # the faithful objective's LeakWarning: known here
    warnings.simplefilter("ignore")
    # Next-token cross-entropy over valid positions, the mixed model: the training loop's step.
    objective = objectives.ObjectiveConfig("next_gene_faithful")
  core = lambda mesh: step_lib.pretraining_core(MODEL, objective, cfg, 10, mesh)
  one_device = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                  jax.devices()[:1])
  host_state = jax.device_get(core(one_device).init())
  batch = _batch()

  runs = {}
  for name, shape in MESHES.items():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))),
                              jax.devices()[:int(np.prod(shape))])
    mesh_core = core(mesh)
    state = jax.device_put(host_state, mesh_core.shardings)
    global_batch = sharding.shard_batch(batch, mesh)  # as the training loop places its batches
    runs[name] = (mesh_core.lower(mesh_core.restore_target(), global_batch), state, global_batch)
  # XLA compiles outside the GIL: both cores at once.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    compiled = dict(zip(runs, pool.map(lambda run: run[0].compile(), runs.values())))

  results = {}
  for name, (_, state, global_batch) in runs.items():
    new_state, metrics = compiled[name](state, global_batch, ())
    loss = metrics["loss"]
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
