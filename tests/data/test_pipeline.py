"""Tests for the Grain input pipeline (genemamba_jax.data.pipeline)."""

import json

import numpy as np
import pytest

from genemamba_jax.data import pipeline
from genemamba_jax.data import records
from genemamba_jax.errors import DataError

CLS, EOS = 2, 3
NUM_CELLS = 51
LABELS = ["B cell", "T cell"]
BATCHES = ["donor1", "donor2"]


def _build(out_dir, shard_sizes, eos=True, labels=LABELS, seed=0, first=0, **manifest):
  """Writes a dataset; cell i's first gene token is 100 + first + i (its identity). `manifest`
  replaces fields of the manifest written."""
  rng = np.random.default_rng(seed)
  cells, shards, i = [], [], first
  for s, size in enumerate(shard_sizes):
    with records.ShardWriter(out_dir, s, "uint16") as w:
      for _ in range(size):
        genes = rng.choice(np.arange(1000, 5000), int(rng.integers(0, 30)),
                           replace=False)
        tokens = np.concatenate(
            [[CLS, 100 + i], genes, [EOS] if eos else []]).astype(np.int32)
        meta = {"obs_name": f"cell{i}", "source": 0}
        if i % 3:
          meta["label"] = LABELS[i % 2]
        if i % 4:
          meta["batch"] = BATCHES[i % 2]
        w.write(tokens, meta)
        cells.append((tokens, meta))
        i += 1
      w.finish({})
    shards.append({"file": f"shards/{s:05d}.array_record", "num_cells": size})
  records.write_manifest(out_dir, {
      "format": "genemamba-tokens", "version": 1, "num_cells": i - first,
      "token_dtype": "uint16", "shards": shards, "sources": ["a.h5ad"],
      "labels": list(labels), "batches": BATCHES, "vocab": {}, "medians": {},
      "settings": {"max_len": 64, "cls": True, "eos": eos},
      "special_ids": {"pad": 0, "mask": 1, "cls": CLS, "eos": EOS},
      "summary": {}, **manifest})
  return cells


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("tokens")
  # An empty shard in the middle must not shift anything.
  return out_dir, _build(out_dir, (20, 0, 17, 14))


def _config(**kwargs):
  base = dict(batch_size=8, seq_len=16, shard_index=0, shard_count=1)
  return pipeline.PipelineConfig(**{**base, **kwargs})


def _ids(batch):
  """Cell indices of a batch's rows (from the identity token)."""
  return (batch["tokens"][:, 1] - 100).tolist()


def test_batches_shapes_padding_and_fields(dataset):
  data_dir, cells = dataset
  config = _config(batch_size=7, seq_len=40, shuffle=False, num_epochs=1,
                   drop_remainder=False)
  batches = list(pipeline.make_dataset(data_dir, config))
  assert len(batches) == pipeline.num_batches_per_epoch(data_dir, config) == 8
  assert [len(b["tokens"]) for b in batches] == [7] * 7 + [2]
  row = 0
  for batch in batches:
    assert batch["tokens"].dtype == np.int32 and batch["mask"].dtype == bool
    assert batch["label"].dtype == np.int32 and batch["batch"].dtype == np.int32
    assert batch["tokens"].shape[1] == batch["mask"].shape[1] == 40
    for tokens, mask, label, bat in zip(batch["tokens"], batch["mask"],
                                        batch["label"], batch["batch"]):
      want, meta = cells[row]
      n = len(want)
      np.testing.assert_array_equal(tokens[:n], want)
      assert not tokens[n:].any()  # Padded with the pad id 0.
      np.testing.assert_array_equal(mask, np.arange(40) < n)
      assert label == (LABELS.index(meta["label"]) if "label" in meta else -1)
      assert bat == (BATCHES.index(meta["batch"]) if "batch" in meta else -1)
      row += 1
  assert row == NUM_CELLS


def test_crop_keeps_cls_and_eos(dataset):
  data_dir, cells = dataset
  config = _config(batch_size=NUM_CELLS, seq_len=6, shuffle=False,
                   num_epochs=1)
  batch = next(iter(pipeline.make_dataset(data_dir, config)))
  cropped = 0
  for (want, _), tokens, mask in zip(cells, batch["tokens"], batch["mask"]):
    assert tokens[0] == CLS
    if len(want) > 6:
      np.testing.assert_array_equal(tokens, list(want[:5]) + [EOS])
      assert mask.all()
      cropped += 1
    else:
      np.testing.assert_array_equal(tokens[:len(want)], want)
  assert cropped > 20


def test_crop_without_eos_keeps_the_start(tmp_path):
  cells = _build(tmp_path, (12,), eos=False)
  config = _config(batch_size=12, seq_len=4, shuffle=False, num_epochs=1)
  batch = next(iter(pipeline.make_dataset(tmp_path, config)))
  for (want, _), tokens in zip(cells, batch["tokens"]):
    np.testing.assert_array_equal(tokens[:min(4, len(want))], want[:4])


def test_epochs_cover_every_cell_once_and_reshuffle(dataset):
  data_dir, _ = dataset

  def epochs(seed):
    config = _config(batch_size=7, seed=seed, num_epochs=2,
                     drop_remainder=False)
    ids = [i for b in pipeline.make_dataset(data_dir, config) for i in _ids(b)]
    return ids[:NUM_CELLS], ids[NUM_CELLS:]

  first, second = epochs(seed=5)
  assert sorted(first) == sorted(second) == list(range(NUM_CELLS))
  assert first != second and first != list(range(NUM_CELLS))
  assert epochs(seed=5) == (first, second)  # Deterministic for a seed.
  assert epochs(seed=6)[0] != first


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_process_shards_are_disjoint_and_cover(dataset, drop_remainder):
  data_dir, _ = dataset
  seen = []
  for index in range(2):
    config = _config(batch_size=5, num_epochs=1, shard_index=index,
                     shard_count=2, drop_remainder=drop_remainder)
    batches = list(pipeline.make_dataset(data_dir, config))
    assert len(batches) == pipeline.num_batches_per_epoch(data_dir, config)
    seen.append({i for b in batches for i in _ids(b)})
  assert not seen[0] & seen[1]
  if drop_remainder:  # Equal shards (25 each), whole batches of 5.
    assert len(seen[0]) == len(seen[1]) == 25
  else:
    assert seen[0] | seen[1] == set(range(NUM_CELLS))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches, expected):
  assert len(batches) == len(expected)
  for got, want in zip(batches, expected):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_resume_in_process(dataset):
  data_dir, _ = dataset
  config = _config(batch_size=8)  # 6 batches per epoch, repeats forever.
  ds = pipeline.make_dataset(data_dir, config)
  reference = _take(iter(ds), 16)
  it = iter(pipeline.make_dataset(data_dir, config))
  _take(it, 9)
  state = json.loads(json.dumps(it.get_state()))
  fresh = iter(pipeline.make_dataset(data_dir, config))
  fresh.set_state(state)
  _assert_same(_take(fresh, 7), reference[9:])


@pytest.mark.slow  # over ~10 s on 2 cores
def test_resume_with_worker_processes(dataset):
  data_dir, _ = dataset
  reference = _take(iter(pipeline.make_dataset(data_dir, _config())), 10)
  config = _config(worker_count=2)
  it = iter(pipeline.make_dataset(data_dir, config))
  try:
    # Worker processes give exactly the in-process batches.
    _assert_same(_take(it, 5), reference[:5])
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  fresh = iter(pipeline.make_dataset(data_dir, config))
  try:
    fresh.set_state(state)
    _assert_same(_take(fresh, 5), reference[5:])
  finally:
    fresh.close()


def test_orbax_checkpoint_round_trip(dataset, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain  # pylint: disable=g-import-not-at-top
  data_dir, _ = dataset
  config = _config(batch_size=8)
  reference = _take(iter(pipeline.make_dataset(data_dir, config)), 10)
  it = iter(pipeline.make_dataset(data_dir, config))
  _take(it, 7)
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(7, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  fresh = iter(pipeline.make_dataset(data_dir, config))
  restored = ocp.CheckpointManager(tmp_path / "ckpt").restore(
      7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert restored["data"] is fresh
  _assert_same(_take(fresh, 3), reference[7:])


def test_config_errors(dataset, tmp_path):
  data_dir, _ = dataset
  with pytest.raises(DataError, match="seq_len=1 must be >= 3"):
    pipeline.make_dataset(data_dir, _config(seq_len=1))
  with pytest.raises(DataError, match="seq_len=2 .*2 special token"):
    pipeline.num_batches_per_epoch(data_dir, _config(seq_len=2))
  with pytest.raises(DataError, match="batch_size=60 is larger than the 51"):
    pipeline.make_dataset(data_dir, _config(batch_size=60))
  with pytest.raises(DataError, match="batch_size=30 is larger than the 25"):
    pipeline.make_dataset(data_dir, _config(batch_size=30, shard_count=2))
  # Without drop_remainder a small dataset still gives one partial batch.
  assert pipeline.num_batches_per_epoch(
      data_dir, _config(batch_size=60, drop_remainder=False)) == 1
  with pytest.raises(DataError, match="shard_index=2 must be < shard_count=2"):
    pipeline.make_dataset(data_dir, _config(shard_index=2, shard_count=2))
  with pytest.raises(DataError, match="num_epochs=0"):
    pipeline.make_dataset(data_dir, _config(num_epochs=0))
  with pytest.raises(DataError, match="not a tokenized dataset"):
    pipeline.make_dataset(tmp_path, _config())


def test_default_shard_is_this_jax_process(dataset):
  data_dir, _ = dataset
  config = pipeline.PipelineConfig(batch_size=NUM_CELLS, seq_len=8,
                                   shuffle=False)
  assert pipeline.num_batches_per_epoch(data_dir, config) == 1


def test_unknown_label_is_a_data_error(tmp_path):
  _build(tmp_path, (6,), labels=["B cell"])
  config = _config(batch_size=6, num_epochs=1)
  with pytest.raises(DataError, match="'T cell', which is not in .*'labels'"):
    next(iter(pipeline.make_dataset(tmp_path, config)))


def test_eval_split_is_held_out_and_fixed(dataset):
  """Train and eval never share a cell, whatever the training seed."""
  data_dir, _ = dataset
  seen = {}
  for split in ("train", "eval"):
    for seed in (0, 7):
      config = _config(batch_size=1, seed=seed, num_epochs=1, drop_remainder=False,
                       eval_fraction=0.2, split=split)
      ids = [i for b in pipeline.make_dataset(data_dir, config) for i in _ids(b)]
      assert len(ids) == len(set(ids))
      seen.setdefault(split, set(ids))
      assert set(ids) == seen[split]
  assert len(seen["eval"]) == round(NUM_CELLS * 0.2)
  assert seen["eval"] | seen["train"] == set(range(NUM_CELLS))
  assert not seen["eval"] & seen["train"]
  with pytest.raises(DataError, match="eval_fraction"):
    pipeline.make_dataset(data_dir, _config(eval_fraction=1.5))
