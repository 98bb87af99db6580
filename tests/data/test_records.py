"""Tests for the tokenized-record format (genemamba_jax.data.records)."""

import json
import os

import numpy as np
import pytest

from genemamba_jax.data import records
from genemamba_jax.errors import DataError

SPECIAL = {"pad": 0, "mask": 1, "cls": 2, "eos": 3}


def _manifest(shards, num_cells, dtype="uint16", labels=(), batches=()):
  return {
      "format": "genemamba-tokens", "version": 1, "num_cells": num_cells,
      "token_dtype": dtype, "shards": shards,
      "sources": ["a.h5ad", "b.h5ad"], "labels": sorted(labels),
      "batches": sorted(batches), "vocab": {}, "medians": {},
      "settings": {"max_len": 64, "cls": True, "eos": True},
      "special_ids": SPECIAL, "summary": {},
  }


def build_dataset(out_dir, shard_sizes=(4, 0, 3), dtype="uint16", seed=0):
  """Writes a small dataset; returns the cells as read_tokenized should."""
  rng = np.random.default_rng(seed)
  vocab_size = 60000 if dtype == "uint16" else 200000
  cells, shards, i = [], [], 0
  for s, size in enumerate(shard_sizes):
    with records.ShardWriter(out_dir, s, dtype) as w:
      for _ in range(size):
        genes = rng.choice(np.arange(4, vocab_size), int(rng.integers(0, 30)),
                           replace=False)
        tokens = np.concatenate([[2], genes, [3]]).astype(np.int32)
        meta = {"obs_name": f"cell{i}", "source": i % 2}
        cell = {"tokens": tokens, "obs_name": f"cell{i}",
                "source": ["a.h5ad", "b.h5ad"][i % 2]}
        if i % 3:
          meta["label"] = cell["label"] = "B cell" if i % 2 else "T cell"
        if i % 2:
          meta["batch"] = cell["batch"] = "donor1"
        w.write(tokens, meta)
        cells.append(cell)
        i += 1
      w.finish({"unit": s})
    shards.append({"file": f"shards/{s:05d}.array_record", "num_cells": size})
  records.write_manifest(out_dir, _manifest(
      shards, i, dtype, labels=("B cell", "T cell"), batches=("donor1",)))
  return cells


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_encode_decode_round_trip(dtype):
  top = 65535 if dtype == "uint16" else 2**31 - 1
  for tokens in (np.array([2, 7, top, 3]), np.array([], np.int64)):
    meta = {"obs_name": "AAAC-1 ü", "source": 1, "label": "T cell"}
    data = records.encode_record(tokens, meta, dtype)
    assert isinstance(data, bytes)
    got, got_meta = records.decode_record(data, dtype)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, tokens)
    assert got_meta == meta


def test_encode_accepts_numpy_scalars_in_meta():
  meta = {"obs_name": np.str_("c"), "source": np.int64(1), "label": "x"}
  data = records.encode_record(np.array([5], np.int32), meta, "uint16")
  assert records.decode_record(data, "uint16")[1] == {
      "obs_name": "c", "source": 1, "label": "x"}


def test_encoding_layout_is_little_endian():
  data = records.encode_record(np.array([1, 258]), {"obs_name": "c"}, "uint16")
  (meta_len,) = np.frombuffer(data[:4], "<u4")
  assert json.loads(data[4:4 + meta_len]) == {"obs_name": "c"}
  assert data[4 + meta_len:] == b"\x01\x00\x02\x01"


def test_encode_decode_errors():
  with pytest.raises(DataError, match="does not fit token_dtype uint16"):
    records.encode_record(np.array([70000]), {}, "uint16")
  with pytest.raises(DataError, match="1-D integer"):
    records.encode_record(np.zeros((2, 2), np.int32), {}, "uint16")
  with pytest.raises(DataError, match="not supported"):
    records.encode_record(np.array([1]), {}, "float32")
  with pytest.raises(DataError, match="too short"):
    records.decode_record(b"\x01", "uint16")
  good = records.encode_record(np.array([5, 6]), {"obs_name": "c"}, "int32")
  with pytest.raises(DataError, match="does not match its header"):
    records.decode_record(good[:-1], "int32")


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_read_tokenized_order_and_content(tmp_path, dtype):
  cells = build_dataset(tmp_path, dtype=dtype)
  got = list(records.read_tokenized(tmp_path))
  assert [c["obs_name"] for c in got] == [f"cell{i}" for i in range(7)]
  for want, have in zip(cells, got):
    assert set(have) == set(want)
    np.testing.assert_array_equal(have["tokens"], want["tokens"])
    assert have["tokens"].dtype == np.int32
    for key in ("obs_name", "source", "label", "batch"):
      assert have.get(key) == want.get(key)


def test_read_tokenized_is_exported():
  import genemamba_jax.data  # pylint: disable=g-import-not-at-top
  assert genemamba_jax.data.read_tokenized is records.read_tokenized


def test_exception_inside_shard_writer_leaves_nothing(tmp_path):
  with pytest.raises(RuntimeError, match="boom"):
    with records.ShardWriter(tmp_path, 0, "uint16") as w:
      w.write(np.array([2, 5, 3]), {"obs_name": "c0", "source": 0})
      raise RuntimeError("boom")
  assert os.listdir(tmp_path / "shards") == []
  assert not records.is_shard_finished(tmp_path, 0)


def test_unfinished_shard_writer_leaves_nothing(tmp_path):
  with records.ShardWriter(tmp_path, 3, "int32") as w:
    w.write(np.array([2, 5, 3]), {"obs_name": "c0", "source": 0})
  assert os.listdir(tmp_path / "shards") == []


def test_is_shard_finished_and_stats(tmp_path):
  with records.ShardWriter(tmp_path, 1, "uint16") as w:
    w.write(np.array([2, 5, 3]), {"obs_name": "c0", "source": 0})
    w.write(np.array([2, 3]), {"obs_name": "c1", "source": 0})
    assert not records.is_shard_finished(tmp_path, 1)
    w.finish({"unit": 1, "num_cells": 99})
  assert records.is_shard_finished(tmp_path, 1)
  assert not records.is_shard_finished(tmp_path, 0)
  assert sorted(os.listdir(tmp_path / "shards")) == [
      "00001.array_record", "00001.json"]
  # The count of records actually written wins over a stale given value.
  assert records.read_shard_stats(tmp_path, 1) == {"unit": 1, "num_cells": 2}
  with pytest.raises(DataError, match="00000.json.*not finished"):
    records.read_shard_stats(tmp_path, 0)


def test_shard_without_sidecar_is_unfinished_and_rewritable(tmp_path):
  # A crash between the two renames leaves records but no sidecar.
  with records.ShardWriter(tmp_path, 0, "uint16") as w:
    w.write(np.array([9]), {"obs_name": "old", "source": 0})
    w.finish({})
  os.remove(tmp_path / "shards" / "00000.json")
  assert not records.is_shard_finished(tmp_path, 0)
  build_dataset(tmp_path, shard_sizes=(2,))
  assert [c["obs_name"] for c in records.read_tokenized(tmp_path)] == [
      "cell0", "cell1"]


def test_write_manifest_is_atomic_and_loads(tmp_path):
  manifest = _manifest([], 0)
  records.write_manifest(tmp_path, manifest)
  assert os.listdir(tmp_path) == ["manifest.json"]
  assert records.load_manifest(tmp_path) == manifest


def test_load_manifest_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    records.load_manifest(tmp_path / "missing")
  with pytest.raises(DataError, match=f"{tmp_path} is not a tokenized dataset"):
    records.load_manifest(tmp_path)
  path = tmp_path / "manifest.json"
  path.write_text("{not json")
  with pytest.raises(DataError, match="not valid JSON"):
    records.load_manifest(tmp_path)
  path.write_text(json.dumps({"format": "something-else"}))
  with pytest.raises(DataError, match="'format'"):
    records.load_manifest(tmp_path)
  path.write_text(json.dumps({**_manifest([], 0), "version": 2}))
  with pytest.raises(DataError, match="version 2"):
    records.load_manifest(tmp_path)
  bad = _manifest([], 0)
  del bad["token_dtype"]
  path.write_text(json.dumps(bad))
  with pytest.raises(DataError, match="'token_dtype'"):
    records.load_manifest(tmp_path)


def test_read_tokenized_missing_or_short_shard(tmp_path):
  build_dataset(tmp_path)
  manifest = records.load_manifest(tmp_path)
  manifest["shards"][0]["num_cells"] = 5
  records.write_manifest(tmp_path, manifest)
  with pytest.raises(DataError, match="00000.array_record holds 4 records"):
    list(records.read_tokenized(tmp_path))
  os.remove(tmp_path / "shards" / "00002.array_record")
  with pytest.raises(DataError, match="00002.array_record is listed"):
    list(records.read_tokenized(tmp_path))


def test_write_chunk_stores_the_same_bytes_as_write(tmp_path):
  from array_record.python import array_record_module
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 60000, 50).astype(np.int32)
  offsets = np.array([0, 10, 10, 50])
  names = ["a", "b\u00e9\"q", "c"]
  labels, batches = ["T", "B\u00e9", "NK"], ["x", "y", "z"]
  for chunked in (False, True):
    with records.ShardWriter(tmp_path / str(chunked), 0, "uint16") as w:
      if chunked:
        w.write_chunk(tokens, offsets, names, 3, labels, batches)
      else:
        for i, name in enumerate(names):
          w.write(tokens[offsets[i]:offsets[i + 1]],
                  {"obs_name": name, "source": 3, "label": labels[i], "batch": batches[i]})
      w.finish()
  read = lambda d: array_record_module.ArrayRecordReader(
      records.shard_path(d, 0)).read_all()
  assert read(tmp_path / "True") == read(tmp_path / "False")
  assert len(read(tmp_path / "True")) == 3
  with pytest.raises(DataError, match="does not fit token_dtype uint16"):
    with records.ShardWriter(tmp_path / "big", 0, "uint16") as w:
      w.write_chunk(np.array([70000]), np.array([0, 1]), ["a"], 0)
