"""genemamba_jax.atomic: temp-then-rename writes leave the old file or the new one, nothing else."""

import json

import numpy as np
import pytest

from genemamba_jax import atomic
from genemamba_jax.data import jsonio


def test_success_renames_into_place(tmp_path):
  target = tmp_path / "out.csv"
  with atomic.atomic_path(target) as tmp:
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp != target
    tmp.write_text("a,b\n")
    assert not target.exists()  # nothing visible until the block ends
  assert target.read_text() == "a,b\n"
  assert sorted(tmp_path.iterdir()) == [target]


def test_existing_target_is_replaced(tmp_path):
  target = tmp_path / "out.txt"
  target.write_text("old")
  atomic.write_bytes_atomic(target, b"new")
  assert target.read_bytes() == b"new"
  assert sorted(tmp_path.iterdir()) == [target]


def test_error_leaves_neither_target_nor_temp(tmp_path):
  target = tmp_path / "out.h5ad"
  with pytest.raises(RuntimeError, match="boom"), atomic.atomic_path(target) as tmp:
    tmp.write_bytes(b"half")
    raise RuntimeError("boom")
  assert list(tmp_path.iterdir()) == []


def test_error_keeps_existing_target(tmp_path):
  target = tmp_path / "metrics.json"
  jsonio.write_json_atomic(target, {"v": 1})
  with pytest.raises(ValueError):  # NaN is refused half-way through the dump
    jsonio.write_json_atomic(target, {"v": 2, "w": float("nan")})
  assert json.loads(target.read_text()) == {"v": 1}
  with pytest.raises(KeyboardInterrupt), atomic.atomic_path(target) as tmp:
    tmp.write_text("{")
    raise KeyboardInterrupt
  assert json.loads(target.read_text()) == {"v": 1}
  assert sorted(tmp_path.iterdir()) == [target]


def test_writer_that_writes_nothing_fails(tmp_path):
  with pytest.raises(FileNotFoundError), atomic.atomic_path(tmp_path / "out.txt"):
    pass
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["emb.npy", "emb.npz", "plot.png", "cells.h5ad", "x.tar.gz",
                                  "noext"])
def test_suffix_is_kept(tmp_path, name):
  target = tmp_path / name
  tmp = atomic.temp_sibling(target)
  assert tmp.parent == tmp_path and tmp.name.endswith(".tmp" + target.suffix)
  assert tmp.name.startswith(".") and tmp != atomic.temp_sibling(target)  # fresh each time


@pytest.mark.parametrize("name", ["emb.npy", "emb.npz"])
def test_numpy_writes_the_temp_name(tmp_path, name):
  """np.save / np.savez append .npy / .npz to other names; the kept suffix avoids that."""
  target = tmp_path / name
  with atomic.atomic_path(target) as tmp:
    (np.save if name.endswith(".npy") else np.savez)(tmp, np.arange(3))
  assert sorted(tmp_path.iterdir()) == [target]
  loaded = np.load(target)
  np.testing.assert_array_equal(loaded if name.endswith(".npy") else loaded["arr_0"],
                                np.arange(3))


def test_json_output_unchanged(tmp_path):
  target = tmp_path / "a.json"
  jsonio.write_json_atomic(target, {"k": [1, 2]})
  assert target.read_text() == json.dumps({"k": [1, 2]}, indent=1) + "\n"
  jsonio.write_json_atomic(target, {"k": [1, 2]}, compact=True)
  assert target.read_text() == '{"k":[1,2]}\n'
