"""Several tokenized directories read as one corpus.

`data.path` may list directories, comma-separated (``/a/tokens,/b/tokens``):
corpora tokenized at different times or on different machines, trained on
together. They must hold the same tokenization, or the cells of one would mean
something else to the model than those of the other: the same vocabulary (token
-> id), gene medians, special token ids, token dtype and sentence settings
(`SHARED_SETTINGS`). How each read its inputs (layer, gene column, QC filters)
may differ.

The combined manifest lists every directory's shards in the order given, with
absolute paths, so the pipeline sees one sequence of records: its global
shuffle, per-process slices and checkpointed position span all directories.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from genemamba_jax.data import records
from genemamba_jax.errors import DataError

# Manifest settings that decide what a token sentence is: these must agree across directories.
# The rest (`layer`, `gene_column`, `min_genes`, ...) say how each corpus's inputs were read and
# filtered, which may differ between corpora.
SHARED_SETTINGS = ("max_len", "cls", "eos", "log1p")


def split_paths(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """`data.path` -> its directories: a comma-separated string, or a list of paths."""
  if isinstance(path, (str, os.PathLike)):
    parts = [p.strip() for p in os.fspath(path).split(",")]
  else:
    parts = [os.fspath(p).strip() for p in path]
  parts = [p for p in parts if p]
  if not parts:
    raise DataError(f"data.path={path!r} names no directory; give a tokenized directory, or "
                    "several separated by commas")
  if len(set(parts)) != len(parts):
    twice = next(p for p in parts if parts.count(p) > 1)
    raise DataError(f"data.path lists {twice} twice; give each tokenized directory once")
  return parts


def _first_difference(a: dict, b: dict) -> tuple[Any, Any, Any]:
  """(key, a's value, b's value) of the first key (sorted) on which two dicts differ."""
  key = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[0]
  return key, a.get(key, "(absent)"), b.get(key, "(absent)")


def check_compatible(first: str, manifest: dict, other: str, theirs: dict) -> None:
  """DataError naming the setting that differs between two directories and both values."""
  def fail(what: str, mine: Any, yours: Any) -> None:
    raise DataError(f"data.path: {other} and {first} were tokenized differently ({what}: "
                    f"{yours!r} vs {mine!r}); tokenize both with the same --vocab and settings")

  if manifest.get("token_dtype") != theirs.get("token_dtype"):
    fail("token_dtype", manifest.get("token_dtype"), theirs.get("token_dtype"))
  for field in ("vocab", "medians", "special_ids"):
    mine, yours = manifest.get(field) or {}, theirs.get(field) or {}
    if mine != yours:
      key, a, b = _first_difference(mine, yours)
      fail(f"{field}[{key!r}]", a, b)
  mine, yours = manifest.get("settings", {}), theirs.get("settings", {})
  for key in SHARED_SETTINGS:
    if mine.get(key) != yours.get(key):
      fail(f"settings.{key}", mine.get(key), yours.get(key))


def load_manifest(path: str | os.PathLike | Sequence[str | os.PathLike]) -> dict:
  """The manifest of one tokenized directory, or the combined one of several.

  A single directory's manifest is returned as `records.load_manifest` reads it.
  For several, after `check_compatible`: ``num_cells`` is the sum; ``shards``
  lists every directory's shards in order, ``file`` made absolute (so
  `records.shard_files` finds them whatever directory it is given);
  ``labels`` / ``batches`` are the sorted union (the pipeline maps a cell's
  label by name); ``sources`` are concatenated (a record's ``source`` index is
  into its own directory's list); ``settings`` keeps the keys on which all
  agree; ``directories`` lists the directories.
  """
  paths = split_paths(path)
  manifests = [records.load_manifest(p) for p in paths]
  if len(paths) == 1:
    return manifests[0]
  for p, m in zip(paths[1:], manifests[1:]):
    check_compatible(paths[0], manifests[0], p, m)
  combined = dict(manifests[0])
  combined["directories"] = [os.path.abspath(p) for p in paths]
  combined["num_cells"] = sum(int(m["num_cells"]) for m in manifests)
  combined["shards"] = [{**s, "file": os.path.abspath(os.path.join(p, s["file"]))}
                        for p, m in zip(paths, manifests) for s in m["shards"]]
  combined["sources"] = [s for m in manifests for s in m.get("sources", [])]
  for field in ("labels", "batches"):
    combined[field] = sorted(set().union(*(m.get(field) or [] for m in manifests)))
  settings = [m.get("settings", {}) for m in manifests]
  combined["settings"] = {k: v for k, v in settings[0].items()
                          if all(s.get(k) == v for s in settings[1:])}
  combined.pop("summary", None)
  return combined


def describe(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
  """How messages name a corpus: its directory, or "a, b (2 directories)"."""
  paths = split_paths(path)
  return paths[0] if len(paths) == 1 else f"{', '.join(paths)} ({len(paths)} directories)"
