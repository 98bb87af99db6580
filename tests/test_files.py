"""genemamba_jax.files: temp-then-rename writes leave the old file or the new one, nothing else."""

import json

import numpy as np
import pytest

from genemamba_jax import files


def test_success_renames_into_place(tmp_path):
  target = tmp_path / "out.csv"
  with files.atomic_path(target) as tmp:
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp != target
    tmp.write_text("a,b\n")
    assert not target.exists()  # nothing visible until the block ends
  assert target.read_text() == "a,b\n"
  assert sorted(tmp_path.iterdir()) == [target]


def test_existing_target_is_replaced(tmp_path):
  target = tmp_path / "out.txt"
  target.write_text("old")
  files.write_bytes_atomic(target, b"new")
  assert target.read_bytes() == b"new"
  assert sorted(tmp_path.iterdir()) == [target]


def test_error_leaves_neither_target_nor_temp(tmp_path):
  target = tmp_path / "out.h5ad"
  with pytest.raises(RuntimeError, match="boom"), files.atomic_path(target) as tmp:
    tmp.write_bytes(b"half")
    raise RuntimeError("boom")
  assert list(tmp_path.iterdir()) == []


def test_error_keeps_existing_target(tmp_path):
  target = tmp_path / "metrics.json"
  files.write_json_atomic(target, {"v": 1})
  with pytest.raises(ValueError):  # NaN is refused half-way through the dump
    files.write_json_atomic(target, {"v": 2, "w": float("nan")})
  assert json.loads(target.read_text()) == {"v": 1}
  with pytest.raises(KeyboardInterrupt), files.atomic_path(target) as tmp:
    tmp.write_text("{")
    raise KeyboardInterrupt
  assert json.loads(target.read_text()) == {"v": 1}
  assert sorted(tmp_path.iterdir()) == [target]


def test_writer_that_writes_nothing_fails(tmp_path):
  with pytest.raises(FileNotFoundError), files.atomic_path(tmp_path / "out.txt"):
    pass
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["emb.npy", "emb.npz", "plot.png", "cells.h5ad", "x.tar.gz",
                                  "noext"])
def test_suffix_is_kept(tmp_path, name):
  target = tmp_path / name
  tmp = files.temp_sibling(target)
  assert tmp.parent == tmp_path and tmp.name.endswith(".tmp" + target.suffix)
  assert tmp.name.startswith(".") and tmp != files.temp_sibling(target)  # fresh each time


@pytest.mark.parametrize("name", ["emb.npy", "emb.npz"])
def test_numpy_writes_the_temp_name(tmp_path, name):
  """np.save / np.savez append .npy / .npz to other names; the kept suffix avoids that."""
  target = tmp_path / name
  with files.atomic_path(target) as tmp:
    (np.save if name.endswith(".npy") else np.savez)(tmp, np.arange(3))
  assert sorted(tmp_path.iterdir()) == [target]
  loaded = np.load(target)
  np.testing.assert_array_equal(loaded if name.endswith(".npy") else loaded["arr_0"],
                                np.arange(3))


def test_json_output_unchanged(tmp_path):
  target = tmp_path / "a.json"
  files.write_json_atomic(target, {"k": [1, 2]})
  assert target.read_text() == json.dumps({"k": [1, 2]}, indent=1) + "\n"
  files.write_json_atomic(target, {"k": [1, 2]}, compact=True)
  assert target.read_text() == '{"k":[1,2]}\n'


# --- what a killed writer leaves, and outputs of several files ----------------------------------


def _dead_pid() -> int:
  """The pid of a process that has ended (and been reaped)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  target = tmp_path / "metrics.csv"
  dead, hexa = _dead_pid(), "0" * 32
  stale = [tmp_path / f".metrics.{dead}-{hexa}.tmp.csv",  # a writer killed mid-write
           tmp_path / f".metrics.{hexa}.tmp.csv"]  # a name from before names carried the pid
  live = tmp_path / f".metrics.{os.getppid()}-{hexa}.tmp.csv"  # a writer that still runs
  other = tmp_path / f".metrics.x.{dead}-{hexa}.tmp.csv"  # metrics.x.csv's, not ours
  for path in (*stale, live, other):
    path.write_text("half")
  files.write_bytes_atomic(target, b"new")
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [target.name, live.name, other.name])


def test_several_files_are_replaced_together_or_not_at_all(tmp_path):
  a, b = tmp_path / "a.csv", tmp_path / "b.json"
  a.write_text("old a")
  with pytest.raises(OSError), files.atomic_paths([a, b]) as (ta, tb):
    ta.write_text("new a")
    tb.write_text("new b")
    raise OSError(28, "No space left on device")  # say, while writing a third file
  assert a.read_text() == "old a" and not b.exists()
  assert sorted(tmp_path.iterdir()) == [a]
  with files.atomic_paths([a, b]) as (ta, tb):
    ta.write_text("new a")
    tb.write_text("new b")
  assert (a.read_text(), b.read_text()) == ("new a", "new b")
  assert sorted(tmp_path.iterdir()) == [a, b]


def test_created_folders_are_removed_when_the_write_fails(tmp_path):
  out = tmp_path / "new" / "out"
  with pytest.raises(KeyboardInterrupt), files.atomic_paths([out / "x.csv"]) as (tmp,):
    assert out.is_dir()
    tmp.write_text("half")
    raise KeyboardInterrupt
  assert list(tmp_path.iterdir()) == []


def test_atomic_dir_removes_a_killed_runs_directory_but_not_a_running_ones(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  hexa = "0" * 32
  dead = tmp_path / f".run.{_dead_pid()}-{hexa}.tmp"
  live = tmp_path / f".run.{os.getppid()}-{hexa}.tmp"
  for folder in (dead, live):
    (folder / "checkpoints").mkdir(parents=True)
  with files.atomic_dir(tmp_path / "run") as tmp:
    (tmp / "metrics.json").write_text("{}")
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", live.name])
