"""Tests for genemamba_jax.train.checkpoint: exact resume of model, optimizer, RNG and data."""

import jax
import numpy as np
import pytest

from genemamba_jax.data import pipeline, records
from genemamba_jax.model import GeneMambaConfig
from genemamba_jax.train import config as train_config
from genemamba_jax.train import objectives, sharding
from genemamba_jax.train import step as step_lib
from genemamba_jax.train.checkpoint import Checkpointer

VOCAB, MASK_ID, CLS = 40, 1, 2
MODEL = GeneMambaConfig(vocab_size=VOCAB, d_model=16, n_layers=2, mixer="mamba2", headdim=8,
                        d_state=8)
PIPE = pipeline.PipelineConfig(batch_size=4, seq_len=12, seed=3, shard_index=0, shard_count=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """30 cells of 3..15 random gene tokens in [4, VOCAB), one shard."""
  out = tmp_path_factory.mktemp("tokens")
  rng = np.random.default_rng(0)
  with records.ShardWriter(out, 0, "uint16") as w:
    for i in range(30):
      genes = rng.choice(np.arange(4, VOCAB), int(rng.integers(3, 16)), replace=False)
      w.write(np.concatenate([[CLS], genes]).astype(np.int32), {"obs_name": f"c{i}", "source": 0})
    w.finish({})
  records.write_manifest(out, {
      "format": "genemamba-tokens", "version": 1, "num_cells": 30, "token_dtype": "uint16",
      "shards": [{"file": "shards/00000.array_record", "num_cells": 30}], "sources": ["a"],
      "labels": [], "batches": [], "vocab": {}, "medians": {},
      "settings": {"max_len": 16, "cls": True, "eos": False},
      "special_ids": {"pad": 0, "mask": MASK_ID, "cls": CLS}, "summary": {}})
  return out


@pytest.fixture(scope="module")
def setup():
  """(init, the training loop's jitted step, abstract state, state shardings), shared by runs.

  The objective is mlm: its masks draw on the state's RNG, so a resume that lost
  the RNG would change the loss.
  """
  cfg = train_config.default_config().optimizer
  cfg.update(lr=1e-2, warmup_steps=2)
  objective = objectives.ObjectiveConfig("mlm", pad_id=0, mask_id=MASK_ID, special_ids=(CLS,))
  mesh = sharding.make_mesh(train_config.default_config().mesh)
  core = lambda seed: step_lib.pretraining_core(MODEL, objective, cfg, 6, mesh, seed)
  main = core(0)
  step = lambda state, batch: main.step(state, batch)
  return (lambda seed: core(seed).init()), step, main.abstract_state, main.shardings


def _run(step, state, it, n):
  batches = []
  for _ in range(n):
    batch = next(it)
    batches.append(batch)
    state, _ = step(state, batch)
  return state, batches


@pytest.mark.slow  # over ~10 s on 2 cores
def test_resume_is_exact(data_dir, setup, tmp_path):
  init, step, abstract, shardings = setup
  straight, batches = _run(step, init(0), iter(pipeline.make_dataset(data_dir, PIPE)), 6)

  it = iter(pipeline.make_dataset(data_dir, PIPE))
  state, _ = _run(step, init(0), it, 3)
  ckpt = Checkpointer(tmp_path / "ckpt", keep=2, save_every=3)
  assert ckpt.save(3, state, it)  # async: returns once arrays are on the host
  state, _ = step(state, next(it))  # donates the saved buffers; the checkpoint must not care
  del state
  ckpt.close()

  # A new process would build everything afresh: other init, new objects.
  ckpt = Checkpointer(tmp_path / "ckpt", keep=2, save_every=3)
  assert ckpt.latest_step() == 3
  fresh_it = iter(pipeline.make_dataset(data_dir, PIPE))
  restored = ckpt.restore(None, sharding.with_shardings(abstract, shardings), fresh_it)
  assert int(restored["step"]) == 3
  assert jax.tree.structure(restored) == jax.tree.structure(straight)
  resumed, after = _run(step, restored, fresh_it, 3)
  ckpt.close()

  for got, want in zip(after, batches[3:]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bit-identical


def test_save_policy_keep_and_no_data(setup, tmp_path):
  init, _, abstract, shardings = setup
  state = init(1)
  with Checkpointer(tmp_path, keep=2, save_every=2, async_save=False) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.restore(None, abstract)
    saved = [s for s in range(1, 8) if ckpt.save(s, state)]
    assert saved == [2, 4, 6]
    assert ckpt.save(7, state, force=True)
    assert not ckpt.save(7, state, force=True)  # already there: left as it is
    assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
    restored = ckpt.restore(6, sharding.with_shardings(abstract, shardings))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
      np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="holds no data iterator state"):
      ckpt.restore(6, abstract, data_iterator=iter([]))


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="keep=0"):
    Checkpointer(tmp_path, keep=0, save_every=1)
