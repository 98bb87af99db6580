"""Tests for genemamba_jax.train.optimizer: schedule, weight-decay mask, clipping, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from genemamba_jax.train import config as train_config
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.train import optimizer


def test_schedule_warmup_then_cosine():
  schedule = optimizer.make_schedule(1e-3, warmup_steps=10, num_steps=110, end_lr_fraction=0.1)
  lr = lambda s: float(schedule(s))
  assert lr(0) == 0.0
  np.testing.assert_allclose([lr(5), lr(10)], [5e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(lr(60), (1e-3 + 1e-4) / 2, rtol=1e-5)  # cosine midpoint
  np.testing.assert_allclose([lr(110), lr(500)], [1e-4, 1e-4], rtol=1e-5)  # held at the end
  values = [lr(s) for s in range(10, 111)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_schedule_warmup_longer_than_run_is_shortened():
  assert optimizer.effective_warmup_steps(1000, 5000) == 1000
  assert optimizer.effective_warmup_steps(1000, 50) == 5
  schedule = optimizer.make_schedule(1.0, warmup_steps=1000, num_steps=50)
  np.testing.assert_allclose([schedule(5), schedule(50)], [1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "lr=0.0"),
    (dict(num_steps=0), "num_steps >= 1"),
    (dict(warmup_steps=-1), "warmup_steps >= 0"),
    (dict(end_lr_fraction=1.5), "end_lr_fraction"),
])
def test_schedule_errors(kwargs, match):
  args = dict(lr=1e-3, warmup_steps=1, num_steps=10) | kwargs
  with pytest.raises(ValueError, match=match):
    optimizer.make_schedule(**args)


# Parameters that get weight decay: every kernel and the embedding table.
DECAYED = {
    "mamba1": {"embeddings/embedding", "layers/combine/aggr/kernel", "layers/mixer/conv1d/kernel",
               "layers/mixer/dt_proj/kernel", "layers/mixer/in_proj/kernel",
               "layers/mixer/out_proj/kernel", "layers/mixer/x_proj/kernel", "lm_head/kernel"},
    "mamba2": {"embeddings/embedding", "layers/combine/aggr/kernel", "layers/mixer/conv1d/kernel",
               "layers/mixer/in_proj/kernel", "layers/mixer/out_proj/kernel", "lm_head/kernel"},
}


def _flat(tree):
  return {"/".join(optimizer._names(path)): leaf  # pylint: disable=protected-access
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_weight_decay_mask_on_genemamba(mixer):
  config = GeneMambaConfig(vocab_size=40, d_model=16, n_layers=2, mixer=mixer, headdim=8,
                           combine="gate", prenorm=True, proj_bias=True)
  params = nnx.state(nnx.eval_shape(lambda: GeneMamba(config, rngs=nnx.Rngs(0))), nnx.Param)
  mask = optimizer.weight_decay_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)  # what optax.masked needs
  flat = _flat(mask)
  assert {name for name, decay in flat.items() if decay} == DECAYED[mixer]
  # Spot checks of the exclusions the brief names, by kind.
  no_decay = {name for name, decay in flat.items() if not decay}
  for name in ("layers/mixer/A_log", "layers/mixer/D", "layers/norm/scale", "norm_f/scale",
               "lm_head/bias", "layers/mixer/conv1d/bias", "layers/mixer/in_proj/bias",
               "layers/combine/aggr/bias"):
    assert name in no_decay
  assert ("layers/mixer/dt_proj/bias" if mixer == "mamba1" else "layers/mixer/dt_bias") in no_decay
  if mixer == "mamba2":
    assert "layers/mixer/norm/weight" in no_decay
  # Tied embeddings: the separate LM-head bias is not decayed, the table is.
  tied = config.replace(tie_embeddings=True)
  flat = _flat(optimizer.weight_decay_mask(
      nnx.state(nnx.eval_shape(lambda: GeneMamba(tied, rngs=nnx.Rngs(0))), nnx.Param)))
  assert not flat["lm_head_bias"] and flat["embeddings/embedding"]


def _config(**kwargs):
  cfg = train_config.default_config().optimizer
  cfg.update(dict(warmup_steps=0) | kwargs)
  return cfg


PARAMS = {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones((2,))},
          "norm": {"scale": jnp.ones((2,))}}


def test_weight_decay_only_where_masked():
  tx = optimizer.make_optimizer(_config(lr=0.1, weight_decay=0.5), num_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
  assert not updates["dense"]["bias"].any() and not updates["norm"]["scale"].any()


def test_clip_by_global_norm():
  # A huge eps turns Adam's first update into -lr * g / eps: it shows the clipped gradient.
  cfg = _config(lr=1.0, eps=1e9, weight_decay=0.0, clip_norm=1.0)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), PARAMS)
  tx = optimizer.make_optimizer(cfg, 10)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0 / 1e9, rtol=1e-4)
  cfg.clip_norm = 0.0  # disabled
  tx = optimizer.make_optimizer(cfg, 10)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(optax.tree.norm(updates), optax.tree.norm(grads) / 1e9,
                             rtol=1e-4)


def test_accumulation_applies_the_mean_every_k():
  cfg = _config(lr=0.1, accumulate_steps=2)
  tx = optimizer.make_optimizer(cfg, num_steps=10)
  single = optimizer.make_optimizer(_config(lr=0.1), num_steps=10)
  g1 = jax.tree.map(lambda p: jnp.full_like(p, 1.0), PARAMS)
  g2 = jax.tree.map(lambda p: jnp.full_like(p, 3.0), PARAMS)
  state = tx.init(PARAMS)
  first, state = tx.update(g1, state, PARAMS)
  assert not any(leaf.any() for leaf in jax.tree.leaves(first))  # micro-step: no update
  second, state = tx.update(g2, state, PARAMS)
  want, _ = single.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), single.init(PARAMS),
                          PARAMS)
  for got, expected in zip(jax.tree.leaves(second), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, expected, rtol=1e-6)
  with pytest.raises(ValueError, match="accumulate_steps=0"):
    optimizer.make_optimizer(_config(accumulate_steps=0), 10)


def test_default_config_fields():
  cfg = train_config.default_config().optimizer
  assert set(cfg) == {"lr", "warmup_steps", "end_lr_fraction", "b1", "b2", "eps",
                      "weight_decay", "clip_norm", "accumulate_steps"}
  assert cfg.lr == 6e-4 and cfg.weight_decay == 0.1 and cfg.clip_norm == 1.0
