"""Atomic file writes: write to a temporary sibling, then rename it over the target.

Readers of `path` see either the old file or the complete new one, never a
half-written file, and a writer that fails leaves no file behind:

  with atomic_path(out_dir / "cells.h5ad") as tmp:
    adata.write_h5ad(tmp)

The temporary name lives in the target's directory (os.replace is atomic only
within one file system), starts with a dot (hidden from shell globs) and keeps
the target's suffix, so writers that pick the format from it (AnnData,
matplotlib, pandas) still work and numpy's np.save / np.savez, which append
.npy / .npz to a name without it, write exactly the temporary name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_sibling(path: str | os.PathLike) -> Path:
  """A fresh hidden name beside `path` with the same suffix: dir/.<stem>.<random>.tmp<suffix>."""
  path = Path(path)
  return path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
  """Yields a temporary path to write; renames it over `path` when the block succeeds.

  The temporary file is not created in advance: the writer creates it, so it
  gets the usual (umask) permissions. If the block raises, or the rename fails,
  the temporary file is removed and an existing `path` is left untouched.
  Parent directories are not created; make them first.

  Args:
    path: the file to (re)place.
    fsync: flush the temporary file's data to disk before the rename, so after
      a crash the name points at the complete new data or the old file.

  Yields:
    The temporary path (same directory and suffix as `path`).

  Raises:
    FileNotFoundError: the block succeeded but wrote nothing at the temporary
      path (for instance np.save given a name whose suffix is not .npy).
  """
  path = Path(path)
  tmp = temp_sibling(path)
  try:
    yield tmp
    if fsync:
      fd = os.open(tmp, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):  # keep the original error
      tmp.unlink(missing_ok=True)
    raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (see atomic_path)."""
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a fresh temporary directory beside `path`; renames it to `path` when the block succeeds.

  Readers never see a half-written `path`: it appears complete or not at all.
  `path` must not exist, or be an empty directory (replaced); otherwise
  FileExistsError. If the block raises, the temporary directory is removed. A
  process killed mid-block leaves only a hidden `.<name>.<random>.tmp`
  sibling, which nothing reads and the next `atomic_dir` on `path` removes.
  """
  path = Path(path)
  if path.exists() and not (path.is_dir() and not any(path.iterdir())):
    raise FileExistsError(f"{path} exists")
  path.parent.mkdir(parents=True, exist_ok=True)
  for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed earlier run
    shutil.rmtree(stale, ignore_errors=True)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  tmp.mkdir()
  try:
    yield tmp
    if path.exists():
      path.rmdir()
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
