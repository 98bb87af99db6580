"""Loads pickles of plain data without letting them run code.

Geneformer ships its vocabulary, gene medians and symbol map as pickles. A
pickle is a small program: its REDUCE opcode calls whatever callable its
GLOBAL opcodes name, so `pickle.load` on an untrusted file can run
`os.system`. `load_pickle` uses an unpickler whose `find_class` hands out only
an explicit allowlist of callables, each of which can only build plain data.

What the allowlist holds, and why each entry is harmless:

* `builtins` containers, strings and numbers (dict, list, tuple, set,
  frozenset, str, bytes, int, float, bool, complex): protocol 2+ needs a
  GLOBAL only for set/frozenset/complex (and protocol 0/1 for the rest); the
  constructors only build values from values that are themselves allowed.
* `numpy.dtype`: how numpy scalars record their type. A dtype is built from a
  type string such as "<i2"; numpy parses it without importing anything.
* `numpy._core.multiarray.scalar` (numpy >= 2 writes this name) and
  `numpy.core.multiarray.scalar` (numpy 1.x, and the Geneformer pickles): it
  rebuilds one numpy scalar from a dtype and its raw bytes. With the object
  dtype it returns its argument unchanged, which is also one of the allowed
  values, so it cannot smuggle in anything new.
* `_codecs.encode` with the latin-1 codec only: protocol 2 pickles store bytes
  (including numpy scalars' raw bytes) as `encode(text, "latin1")`. The real
  function would accept any codec name, so a wrapper checks it.

Deliberately refused: `numpy.core.multiarray._reconstruct` and
`numpy.ndarray` (plain dictionaries do not need arrays, and array
reconstruction accepts object dtypes whose BUILD state runs through a far
larger surface), `copyreg._reconstructor` (builds instances of any class), and
`collections.OrderedDict` (harmless in itself, but no file we read needs it;
dicts keep insertion order since Python 3.7, and every class admitted widens
what a crafted file can reach, so a file using it gets a clear error instead).
"""

import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from genemamba_jax.errors import DataError

try:  # numpy >= 2 moved the implementation to numpy._core.
  from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # pragma: no cover - numpy 1.x
  from numpy.core.multiarray import scalar as _np_scalar

_REFUSAL = ("only plain containers, strings, numbers and numpy scalars are "
            "allowed")


class _Refused(Exception):
  """Raised while unpickling; load_pickle turns it into a DataError."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
  """`_codecs.encode` limited to what protocol 2 uses to store bytes."""
  # Compare names rather than calling codecs.lookup, which may import codec
  # modules.
  name = encoding.lower().replace("-", "").replace("_", "") if isinstance(
      encoding, str) else None
  if name not in ("latin1", "iso88591") or not isinstance(text, str):
    raise _Refused(f"refusing to call _codecs.encode with codec {encoding!r}:"
                   " only latin1 is allowed")
  return text.encode("latin1")


_BUILTINS = {t.__name__: t for t in (dict, list, tuple, set, frozenset, str,
                                     bytes, int, float, bool, complex)}

# (module, name) -> the object handed to the unpickler. Protocol < 3 pickles
# name the builtins module `__builtin__` (its Python 2 name).
_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("_codecs", "encode"): _latin1_encode,
}
for _name, _type in _BUILTINS.items():
  _ALLOWED[("builtins", _name)] = _type
  _ALLOWED[("__builtin__", _name)] = _type


class _RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves globals only from `_ALLOWED`."""

  def find_class(self, module: str, name: str) -> Any:
    # Never call super().find_class: it would import `module`, and importing
    # is itself running code.
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise _Refused(f"refusing to unpickle {module}.{name}: {_REFUSAL}"
                     ) from None

  def persistent_load(self, pid: Any) -> Any:
    raise _Refused(f"refusing to unpickle a persistent id: {_REFUSAL}")


def _to_plain(value: Any, path: str) -> Any:
  """Replaces numpy scalars with Python ones, recursively.

  Downstream code (JSON writers, dict lookups, id arithmetic) should never see
  `np.int16` ids, whose arithmetic silently wraps at 32,767.
  """
  if isinstance(value, dict):
    return {_to_plain(k, path): _to_plain(v, path) for k, v in value.items()}
  if isinstance(value, (list, tuple, set, frozenset)):
    return type(value)(_to_plain(v, path) for v in value)
  if isinstance(value, np.generic):
    if isinstance(value, np.bool_):
      return bool(value)
    if isinstance(value, np.integer):
      return int(value)
    if isinstance(value, np.floating):
      return float(value)
    if isinstance(value, np.complexfloating):
      return complex(value)
    if isinstance(value, np.str_):
      return str(value)
    if isinstance(value, np.bytes_):
      return bytes(value)
  elif isinstance(value, (str, bytes, int, float, complex)) or value is None:
    # bool is an int; str/bytes/int subclasses from numpy were handled above.
    return value
  raise DataError(
      f"{path}: unpickled a value of type {type(value).__module__}."
      f"{type(value).__name__}, which is not plain data: {_REFUSAL}")


def load_pickle(path: str | Path, source: str = "check the path") -> Any:
  """Loads a pickle that may contain only plain data and numpy scalars; `source` says where to
  get the file when it is missing.

  Args:
    path: the pickle file.

  Returns:
    The unpickled object, with every numpy scalar (at any depth, keys
    included) converted to the matching Python int/float/bool/complex/str/
    bytes.

  Raises:
    DataError: the file is missing, unreadable, truncated or corrupt, or it
      references anything outside the allowlist (nothing it references is
      imported or called in that case).
  """
  path = str(path)
  try:
    with open(path, "rb") as f:
      obj = _RestrictedUnpickler(f).load()
  except _Refused as e:
    raise DataError(f"{path}: {e}") from None
  except FileNotFoundError:
    raise DataError(f"{path}: file not found; {source}") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read the file ({e})") from None
  except RecursionError:
    raise DataError(f"{path}: the pickle is nested too deeply to load; "
                    "re-save it as a flat dict") from None
  except Exception as e:  # pylint: disable=broad-except
    # A truncated or corrupt stream can fail in many ways (EOFError,
    # UnpicklingError, ValueError, struct/Unicode errors, MemoryError...);
    # all of them mean the same thing to the user.
    raise DataError(
        f"{path}: not a readable pickle ({type(e).__name__}: {e}); the file "
        "is truncated or corrupt, download or re-create it") from None
  try:
    return _to_plain(obj, path)
  except RecursionError:
    raise DataError(f"{path}: the unpickled data refers to itself or is "
                    "nested too deeply; re-save it as a flat dict") from None
