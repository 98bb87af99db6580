"""Small JSON file helpers shared by the data-directory writers and readers."""

import json
from pathlib import Path
from typing import Any

from genemamba_jax.atomic import atomic_path
from genemamba_jax.data.errors import DataError


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
