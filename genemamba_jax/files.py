"""Writing files safely: atomic writes (a temporary sibling renamed over the target) and JSON.

Readers of `path` see either the old file or the complete new one, never a
half-written file, and a writer that fails leaves no file behind:

  with atomic_path(out_dir / "cells.h5ad") as tmp:
    write_h5ad(adata, tmp)  # (a full disk: an OSError, see write_h5ad)

An output made of several files is written with `atomic_paths`: all of them
are renamed into place when the block succeeds, none when it fails.

The temporary name lives in the target's directory (os.replace is atomic only
within one file system), starts with a dot (hidden from shell globs), carries
the writer's process id and keeps the target's suffix, so writers that pick the
format from it (AnnData, matplotlib, pandas) still work and numpy's np.save /
np.savez, which append .npy / .npz to a name without it, write exactly the
temporary name: `dir/.<stem>.<pid>-<random>.tmp<suffix>`.

A process killed mid-write (kill -9, out of memory, power loss) cannot remove
its temporary file; the next atomic write of the same target removes it (and
any other temporary of that target whose writer no longer runs on this host),
so a re-run of the command leaves no debris.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from genemamba_jax.errors import DataError


def temp_sibling(path: str | os.PathLike) -> Path:
  """A fresh hidden name beside `path`, same suffix: dir/.<stem>.<pid>-<random>.tmp<suffix>."""
  path = Path(path)
  return path.with_name(f".{path.stem}.{_token()}.tmp{path.suffix}")


def _token() -> str:
  return f"{os.getpid()}-{uuid.uuid4().hex}"


def _writer_is_gone(token: str) -> bool:
  """Whether the process that made a temporary name (`<pid>-<hex>`) no longer runs here.

  Only those temporaries are removed: one a running process is writing (another
  run of the same command, a demo preparation in a second terminal) is left alone.
  Names without a pid (written before names carried one) count as gone.
  """
  pid = token.partition("-")[0] if "-" in token else ""
  if not pid:
    return True
  if int(pid) == os.getpid():
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # another user's process: it runs
    return False
  return False


_TOKEN = r"(?:\d+-)?[0-9a-f]{32}"


def remove_stale_temps(path: str | os.PathLike, directory: bool = False) -> None:
  """Removes the temporaries of `path` (a file, or with `directory` an `atomic_dir`) that a
  writer which no longer runs left behind (a killed process)."""
  path = Path(path)
  if directory:
    pattern = re.compile(re.escape(f".{path.name}.") + f"({_TOKEN})" + re.escape(".tmp"))
  else:
    pattern = re.compile(re.escape(f".{path.stem}.") + f"({_TOKEN})"
                         + re.escape(f".tmp{path.suffix}"))
  try:
    names = os.listdir(path.parent)
  except OSError:  # no parent directory yet: nothing stale either
    return
  for name in names:
    match = pattern.fullmatch(name)
    if match is None or not _writer_is_gone(match.group(1)):
      continue
    stale = path.parent / name
    if stale.is_dir() and not stale.is_symlink():
      shutil.rmtree(stale, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        stale.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
  """Yields a temporary path to write; renames it over `path` when the block succeeds.

  The temporary file is not created in advance: the writer creates it, so it
  gets the usual (umask) permissions. If the block raises, or the rename fails,
  the temporary file is removed and an existing `path` is left untouched.
  Temporaries of `path` left by killed writers are removed first. Parent
  directories are not created; make them first (or use `atomic_paths`).

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
  with atomic_paths([path], fsync=fsync, make_parents=False) as (tmp,):
    yield tmp


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike], fsync: bool = False,
                 make_parents: bool = True) -> Iterator[list[Path]]:
  """`atomic_path` for an output made of several files: all or none of them are replaced.

  Yields one temporary path per target (as `atomic_path` does); when the block
  succeeds they are renamed over their targets, in order; when it fails (an
  error, a full disk, Ctrl-C, SIGTERM) every temporary is removed and every
  target keeps its old content, so no output is left half old, half new. Only
  a process killed during the final renames (microseconds, and renames need no
  space) could leave some targets new and others old.

  Args:
    paths: the files to (re)place.
    fsync: flush each temporary file before the renames.
    make_parents: create missing parent directories; those it created are
      removed again when the block fails (and they are still empty).

  Raises:
    FileNotFoundError: the block succeeded but did not write every temporary path.
  """
  paths = [Path(p) for p in paths]
  created = []
  if make_parents:
    for parent in dict.fromkeys(p.parent for p in paths):
      missing = [d for d in (parent, *parent.parents) if not d.exists()]
      parent.mkdir(parents=True, exist_ok=True)
      created.extend(missing)  # deepest first
  for path in paths:
    remove_stale_temps(path)
  temps = [temp_sibling(p) for p in paths]
  try:
    yield temps
    for tmp in temps:
      if not tmp.exists():
        raise FileNotFoundError(f"{tmp}: the writer wrote nothing here")
    if fsync:
      for tmp in temps:
        fd = os.open(tmp, os.O_RDONLY)
        try:
          os.fsync(fd)
        finally:
          os.close(fd)
    for tmp, path in zip(temps, paths):
      os.replace(tmp, path)
  except BaseException:
    for tmp in temps:
      with contextlib.suppress(OSError):  # keep the original error
        tmp.unlink(missing_ok=True)
    for folder in created:
      with contextlib.suppress(OSError):  # not empty: written by someone else, kept
        folder.rmdir()
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
  process killed mid-block leaves only a hidden `.<name>.<pid>-<random>.tmp`
  sibling, which nothing reads and the next `atomic_dir` on `path` removes
  (unless its process still runs: a second run into the same `path` does not
  pull the first one's directory from under it).
  """
  path = Path(path)
  if path.exists() and not (path.is_dir() and not any(path.iterdir())):
    raise FileExistsError(f"{path} exists")
  path.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_temps(path, directory=True)  # left by a killed earlier run
  tmp = path.with_name(f".{path.name}.{_token()}.tmp")
  tmp.mkdir()
  try:
    yield tmp
    if path.exists():
      path.rmdir()
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# --- JSON -----------------------------------------------------------------------------------------


def write_json_atomic(path: str | Path, obj: Any, default=None, compact: bool = False) -> None:
  """Writes `obj` as JSON so readers see either the old file or the new one.

  `compact` drops indentation and spaces (for large files such as digests);
  NaN and infinity are refused, since they are not JSON.

  Written through atomic.atomic_path (temp file beside `path`, renamed over
  it) and fsynced before the rename.
  """
  with atomic_path(path, fsync=True) as tmp:
    write_json(tmp, obj, default, compact)


def write_json(path: str | Path, obj: Any, default=None, compact: bool = False) -> None:
  """Writes `obj` as JSON to `path` as it is (not atomically: for a temporary path, e.g. one
  of atomic.atomic_paths'); same format as `write_json_atomic`."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=None if compact else 1, allow_nan=False, default=default,
              separators=(",", ":") if compact else None)
    f.write("\n")


def read_json(path: str | Path, hint: str) -> Any:
  """Reads a JSON file; DataError naming the file and ending in `hint`."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: file not found; {hint}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: cannot read it as JSON ({e}); {hint}") from None


# Outputs up to this size are built in memory first (see write_h5ad); larger ones would double
# the memory a command needs, so they are written directly once the disk is known to have room.
_H5AD_IN_MEMORY_BYTES = 1 << 30


def write_h5ad(adata, path: str | os.PathLike) -> None:
  """Writes AnnData `adata` as an .h5ad file at `path` (a temporary path of `atomic_path`).

  HDF5 copes badly with a disk that fills under it: errors when its objects are collected,
  then a crash at exit. So the file is built in memory (what `adata.write_h5ad` writes, through
  anndata's `write_elem`) and written with ordinary writes, where a full disk is an OSError
  like any other. An output over 1 GiB is written by anndata directly, after checking that the
  disk has room for it (a disk that fills during that write can still crash the process).
  """
  import anndata  # pylint: disable=g-import-not-at-top
  size = _h5ad_size(adata)
  if size > _H5AD_IN_MEMORY_BYTES:
    free = shutil.disk_usage(Path(path).parent).free
    if free < size:
      raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {size >> 20:,} MiB needed, "
                    f"{free >> 20:,} MiB free", str(path))
    adata.write_h5ad(path)
    return
  import io  # pylint: disable=g-import-not-at-top
  import h5py  # pylint: disable=g-import-not-at-top
  adata.strings_to_categoricals()  # as write_h5ad does
  buffer = io.BytesIO()
  with h5py.File(buffer, "w") as f:
    f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
    if adata.X is not None:
      anndata.io.write_elem(f, "X", adata.X)
    if adata.raw is not None:
      anndata.io.write_elem(f, "raw", adata.raw)
    for key in ("obs", "var"):
      anndata.io.write_elem(f, key, getattr(adata, key))
    for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
      anndata.io.write_elem(f, key, dict(getattr(adata, key)))
  try:
    with open(path, "wb") as out:
      out.write(buffer.getbuffer())
  except OSError as e:  # name the file (a failed write() does not)
    raise OSError(e.errno, e.strerror, str(path)) from e


def _h5ad_size(adata) -> int:
  """About how many bytes `adata` takes as .h5ad (its arrays, uncompressed)."""
  def nbytes(x) -> int:
    if x is None:
      return 0
    if hasattr(x, "data") and hasattr(x, "indices"):  # a scipy sparse matrix
      return x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
    return int(getattr(x, "nbytes", 0))
  arrays = [adata.X, *adata.obsm.values(), *adata.varm.values(), *adata.layers.values(),
            *adata.obsp.values(), *adata.varp.values()]
  if adata.raw is not None:
    arrays.append(adata.raw.X)
  tables = [adata.obs, adata.var] + ([adata.raw.var] if adata.raw is not None else [])
  return (sum(nbytes(a) for a in arrays)
          + sum(int(t.memory_usage(deep=True).sum()) for t in tables) + (1 << 20))
