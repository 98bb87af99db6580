"""Pretraining objectives: no target leak (but the faithful mode's), padding, MLM statistics."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.train import objectives
from genemamba_jax.train.objectives import ObjectiveConfig
from genemamba_jax.train.pathway import PathwayLoss
from tests.conftest import fast_first

jax.config.update("jax_default_matmul_precision", "highest")
# Backend -O0: halves XLA's compile time on CPU, which dominates these tiny runs.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

VOCAB, CLS, EOS = 40, 2, 3
LENGTHS = (10, 7, 3)


def _config(name, **kw):
  if name == "next_gene_faithful":
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", objectives.LeakWarning)
      return ObjectiveConfig(name=name, special_ids=(CLS, EOS), **kw)
  return ObjectiveConfig(name=name, special_ids=(CLS, EOS), **kw)


def _model_config(name, mixer="mamba1"):
  return GeneMambaConfig(vocab_size=VOCAB, d_model=16, n_layers=2, d_state=8, headdim=8,
                         mixer=mixer, combine="gate", scan_backend="sequential",
                         streams=objectives.model_streams_for(name))


@functools.cache
def _model(name, mixer="mamba1"):
  """A small model, built once per (streams, mixer): construction compiles, slowly on CPU."""
  return GeneMamba(_model_config(name, mixer), rngs=nnx.Rngs(0))


def _jit(fn, model):
  """jax.jit(fn)(model, *args), the model split into graphdef and state (NNX transforms
  inside the model cannot run on a module closed over from outside the trace)."""
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args),
                     compiler_options=FAST_COMPILE)
  return lambda *args: compiled(state, *args)


def _batch(width=10, lengths=LENGTHS, seed=0):
  """<cls> gene ... gene <eos>, right-padded with garbage ids that the mask marks invalid."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, VOCAB, (len(lengths), 64))[:, :width]  # same genes at any width
  mask = np.arange(width)[None, :] < np.array(lengths)[:, None]
  tokens[:, 0] = CLS
  tokens[np.arange(len(lengths)), np.array(lengths) - 1] = EOS
  tokens = np.where(mask, tokens, rng.integers(0, VOCAB, tokens.shape))
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


def test_streams_names_and_warning():
  assert [objectives.model_streams_for(n) for n in objectives.OBJECTIVES] == [
      "separate", "mixed", "mixed"]
  with pytest.raises(ValueError, match="objective"):
    ObjectiveConfig(name="causal")
  with pytest.warns(objectives.LeakWarning, match="docs/commands.md"):
    ObjectiveConfig(name="next_gene_faithful")
  tokens, mask = _batch()
  with pytest.raises(ValueError, match="separate-streams"):
    mixed = nnx.eval_shape(lambda: GeneMamba(_model_config("mlm"), rngs=nnx.Rngs(0)))
    objectives.loss_fn(mixed, {"tokens": tokens, "mask": mask}, jax.random.key(0),
                       ObjectiveConfig())
  # No predicted position: the loss is 0, not nan.
  loss, accuracy = objectives.cross_entropy(jnp.zeros((1, 2, 5)), jnp.zeros((1, 2), jnp.int32),
                                            jnp.zeros((1, 2), bool))
  assert float(loss) == 0.0 and float(accuracy) == 0.0


@fast_first("name, mixer", [("next_gene", "mamba2"), ("next_gene_faithful", "mamba1"),
                             ("next_gene", "mamba1")])
def test_next_gene_logits_do_not_see_their_target(name, mixer, monkeypatch):
  """d logits[t] / d (input embedding at t): zero for next_gene, non-zero (the leak) if faithful."""
  model, objective = _model(name, mixer), _config(name)
  tokens, mask = _batch()
  projection = jax.random.normal(jax.random.key(1), (VOCAB,))
  shift = {}
  embed_call = nnx.Embed.__call__
  monkeypatch.setattr(nnx.Embed, "__call__", lambda self, x: embed_call(self, x) + shift["delta"])

  graphdef, state = nnx.split(model)

  def projected_logits(delta):  # [B, L, d] -> [B, L]: logits[:, t] predict tokens[:, t]
    shift["delta"] = delta
    m = nnx.merge(graphdef, state, copy=True)
    pred = objectives.predictions(m, tokens, mask, jax.random.key(0), objective)
    states = ()
    if name == "next_gene":  # the loss's one pass gives the model's own states
      full = objectives.predictions(m, tokens, mask, jax.random.key(0), objective,
                                    with_hidden=True)
      states = ((full.logits, full.hidden),
                (m.logits(m.encode_next_gene(tokens, mask)[0]), m.encode(tokens, mask)))
    return pred.logits @ projection, (pred.weights, states)

  delta = jnp.zeros(tokens.shape + (16,))
  # Forward mode: the same exact Jacobian as reverse mode, and cheaper to compile here.
  jacobian, (weights, states) = jax.jit(jax.jacfwd(projected_logits, has_aux=True),
                                        compiler_options=FAST_COMPILE)(delta)
  b, t = np.nonzero(np.asarray(weights))
  own = np.abs(np.asarray(jacobian)[b, t, b, t]).max(-1)
  before = np.abs(np.asarray(jacobian)[b, t, b, t - 1]).max(-1)
  if name == "next_gene":
    np.testing.assert_array_equal(own, 0.0)
    assert np.all(before > 0)  # the context is used: the zero is not a dead model
    inner = t + 1 < np.array(LENGTHS)[b]
    assert np.all(np.abs(np.asarray(jacobian)[b, t, b, t + 1]).max(-1)[inner] > 0)
    for ours, expected in zip(*states):
      np.testing.assert_allclose(ours, expected, atol=1e-6)
  else:
    assert np.all(own > 1e-6)  # the documented leak: the target is read through the reverse stream


@pytest.mark.slow  # over ~5 s on 2 cores
@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_mlm_logits_do_not_see_masked_originals(mixer):
  model, objective = _model("mlm", mixer), _config("mlm", mlm_probability=0.5)
  tokens, mask = _batch(width=16, lengths=(16, 12, 9))
  rng = jax.random.key(3)
  inputs, chosen = objectives.mlm_corrupt(tokens, mask, rng, objective, VOCAB)
  masked = np.asarray(chosen & (inputs == objective.mask_id))
  assert masked.sum() >= 3
  # Other gene ids at the masked positions: same corruption, same logits, other targets.
  changed = jnp.where(masked, 4 + (tokens - 3) % (VOCAB - 4), tokens)
  assert np.all(np.asarray(changed != tokens)[masked])
  run = _jit(lambda m, x: objectives.predictions(m, x, mask, rng, objective), model)
  first, second = run(tokens), run(changed)
  np.testing.assert_array_equal(first.weights, second.weights)
  np.testing.assert_array_equal(np.asarray(first.logits)[masked], np.asarray(second.logits)[masked])


@fast_first("name", objectives.OBJECTIVES)
def test_padding_does_not_change_the_loss(name):
  model, objective = _model(name), _config(name)
  membership = np.random.default_rng(0).random((VOCAB, 4)) < 0.4
  membership[:4] = False
  pathway = PathwayLoss(jnp.asarray(membership), genes_per_cell=5)
  run = _jit(lambda m, tokens, mask: objectives.loss_fn(
      m, {"tokens": tokens, "mask": mask}, jax.random.key(7), objective, pathway), model)
  narrow = run(*_batch(width=10))
  wide = run(*_batch(width=23))
  assert set(narrow[1]) == {"loss", f"loss/{name}", "accuracy", "loss/pathway"}
  for key in narrow[1]:
    np.testing.assert_allclose(narrow[1][key], wide[1][key], atol=1e-6, rtol=0, err_msg=key)
  assert float(narrow[1]["loss/pathway"]) > 0
  np.testing.assert_allclose(narrow[0], narrow[1][f"loss/{name}"] + 0.1 * narrow[1]["loss/pathway"],
                             rtol=1e-6)


def test_mlm_corruption_statistics():
  objective = _config("mlm")
  vocab = 1000
  lengths = np.random.default_rng(1).integers(2, 512, 128)
  lengths[:2] = (3, 2)  # one gene; no gene (only <cls> <eos>)
  rng = np.random.default_rng(2)
  tokens = rng.integers(4, vocab, (128, 512))
  mask = np.arange(512)[None, :] < lengths[:, None]
  tokens[:, 0] = CLS
  tokens[np.arange(128), lengths - 1] = EOS
  tokens = np.where(mask, tokens, 0)
  corrupt = jax.jit(lambda key: objectives.mlm_corrupt(
      jnp.asarray(tokens), jnp.asarray(mask), key, objective, vocab), compiler_options=FAST_COMPILE)
  inputs, chosen = map(np.asarray, corrupt(jax.random.key(0)))
  eligible = mask & (tokens >= 4)
  assert not np.any(chosen & ~eligible)  # never pad, <cls>, <eos>
  assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.01
  assert np.all(chosen.sum(1)[eligible.any(1)] >= 1) and chosen[1].sum() == 0
  np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
  by_mask = inputs[chosen] == objective.mask_id
  kept = inputs[chosen] == tokens[chosen]
  random = ~by_mask & ~kept
  assert abs(by_mask.mean() - 0.8) < 0.02
  assert abs(kept.mean() - 0.1) < 0.015 and abs(random.mean() - 0.1) < 0.015
  replaced = inputs[chosen][random]
  assert replaced.min() >= 4 and replaced.max() < vocab
  assert replaced.min() < 50 and replaced.max() > 950  # drawn over the whole gene range
  again, _ = corrupt(jax.random.key(0))
  other, _ = corrupt(jax.random.key(1))
  np.testing.assert_array_equal(again, inputs)
  assert np.any(np.asarray(other) != inputs)
