"""On-disk format of a tokenized dataset: ArrayRecord shards plus a manifest.

Layout of a tokenized dataset directory ``DIR``::

  DIR/manifest.json             dataset-wide metadata (see `load_manifest`)
  DIR/shards/00000.array_record one record per cell
  DIR/shards/00000.json         per-shard stats sidecar; its presence is what
                                marks the shard as finished

Record encoding (one ArrayRecord record per cell)::

  struct.pack("<I", len(meta))  4 bytes, little-endian meta length in bytes
  meta                          UTF-8 JSON object
  tokens                        token ids, little-endian, manifest["token_dtype"]
                                ("uint16" when the vocab has <= 65536 ids,
                                otherwise "int32"); the rest of the record

meta keys: ``"obs_name"`` (str), ``"source"`` (int index into
manifest["sources"]), and optionally ``"label"`` / ``"batch"`` (category
names, str).

The tokenizer writes shards with `ShardWriter` and the manifest with
`write_manifest`; training and export read them back with `load_manifest`,
`read_tokenized` or the Grain pipeline in `genemamba_jax.data.pipeline`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import struct
import uuid
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from genemamba_jax import files
from genemamba_jax.errors import DataError

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
FORMAT_NAME = "genemamba-tokens"
FORMAT_VERSION = 1
TOKEN_DTYPES = ("uint16", "int32")

_HEADER = struct.Struct("<I")

# Writer options, measured on 5k records of ~1.4k random gene ids:
#   uint16: uncompressed 163k rec/s, snappy 141k, zstd:1 58k, zstd:3 48k, and
#     no codec shrank the file by even 1% (gene-id permutations are
#     incompressible), so uint16 shards are stored uncompressed.
#   int32: uncompressed 94k rec/s, zstd:1 47k rec/s but 32% smaller (the high
#     bytes are mostly zero); random reads drop from 57k to 33k rec/s, still
#     far above what training consumes, so int32 shards use zstd:1.
# group_size:1 puts every record in its own chunk, so Grain's random access
# decodes exactly one record per read instead of a whole group.
_WRITER_OPTIONS = {
    "uint16": "group_size:1,uncompressed",
    "int32": "group_size:1,zstd:1",
}

# How many records `read_tokenized` pulls from a shard per reader call.
_READ_CHUNK = 1024


@functools.lru_cache(maxsize=None)
def _le_dtype(dtype: Any) -> np.dtype:
  """Little-endian numpy dtype for a manifest token dtype name."""
  try:
    name = np.dtype(dtype).name
  except TypeError:
    name = repr(dtype)
  if name not in TOKEN_DTYPES:
    raise DataError(
        f"token_dtype {name!r} is not supported; use one of {TOKEN_DTYPES}.")
  return np.dtype(name).newbyteorder("<")


def _json_default(value: Any) -> Any:
  # Tokenizers hand over numpy scalars (np.int64 source, np.str_ label).
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"{type(value).__name__} {value!r} is not JSON serializable")


def encode_record(tokens: np.ndarray, meta: Mapping[str, Any],
                  dtype: Any) -> bytes:
  """Encodes one cell: [n] integer token ids and a JSON-serializable meta
  dict, with token dtype "uint16" or "int32" (layout: module docstring)."""
  dt = _le_dtype(dtype)
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
    raise DataError(
        f"tokens must be a 1-D integer array, got shape {tokens.shape} "
        f"dtype {tokens.dtype}.")
  meta_bytes = json.dumps(dict(meta), separators=(",", ":"),
                          default=_json_default).encode("utf-8")
  return _HEADER.pack(len(meta_bytes)) + meta_bytes + _as_token_bytes(tokens, dt)


def _as_token_bytes(tokens: np.ndarray, dt: np.dtype) -> bytes:
  """Token ids as `dt` bytes; DataError when an id does not fit."""
  if tokens.size and tokens.dtype != dt:
    info = np.iinfo(dt)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi > info.max:
      raise DataError(
          f"token ids span [{lo}, {hi}], which does not fit token_dtype "
          f"{dt.name}; use int32 for vocabularies above 65536 ids.")
  return tokens.astype(dt, copy=False).tobytes()


def decode_record(data: bytes, dtype: Any) -> tuple[np.ndarray, dict]:
  """Decodes `encode_record` bytes into ([n] int32 token ids, meta dict)."""
  dt = _le_dtype(dtype)
  if len(data) < _HEADER.size:
    raise DataError(
        f"record of {len(data)} bytes is too short to hold its header; the "
        "shard is corrupt, re-run the tokenizer.")
  (meta_len,) = _HEADER.unpack_from(data)
  body = len(data) - _HEADER.size - meta_len
  if body < 0 or body % dt.itemsize:
    raise DataError(
        f"record of {len(data)} bytes does not match its header (meta length "
        f"{meta_len}, token_dtype {dt.name}); the shard is corrupt or the "
        "manifest's token_dtype is wrong, re-run the tokenizer.")
  try:
    meta = json.loads(bytes(data[_HEADER.size:_HEADER.size + meta_len]))
  except ValueError as e:
    raise DataError(f"record meta is not valid JSON ({e}); the shard is "
                    "corrupt, re-run the tokenizer.") from None
  tokens = np.frombuffer(data, dtype=dt, offset=_HEADER.size + meta_len)
  return tokens.astype(np.int32), meta


def shard_path(out_dir: str | os.PathLike, shard_index: int) -> str:
  """Path of shard `shard_index`'s ArrayRecord file."""
  return os.path.join(out_dir, SHARDS_DIR, f"{shard_index:05d}.array_record")


def _stats_path(out_dir: str | os.PathLike, shard_index: int) -> str:
  return os.path.join(out_dir, SHARDS_DIR, f"{shard_index:05d}.json")


def _fsync(path: str) -> None:
  # Renames are only crash-safe once the renamed data has reached the disk.
  with open(path, "rb") as f:
    os.fsync(f.fileno())


class ShardWriter:
  """Writes one shard atomically: all of it (with its sidecar) or nothing.

  Usage::

    with ShardWriter(out_dir, 3, "uint16") as w:
      for tokens, meta in cells:
        w.write(tokens, meta)
      w.finish({"dropped": 0})

  Records go to ``shards/NNNNN.array_record.<pid>-<hex>.tmp``: a name of this
  writer's own, since two writers of one shard can overlap (a Dask task still
  running after its run was stopped, and the re-run's). `finish` closes it, writes
  the sidecar to a temp name, renames the records file into place and then
  the sidecar, so a shard is finished iff its ``.json`` sidecar exists. Leaving
  the context without `finish` (e.g. on an exception) deletes the temp files.
  """

  def __init__(self, out_dir: str | os.PathLike, shard_index: int,
               token_dtype: Any):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self._dtype = _le_dtype(token_dtype)
    self._path = shard_path(out_dir, shard_index)
    self._stats_path = _stats_path(out_dir, shard_index)
    own = f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    self._tmp = self._path + own
    self._stats_tmp = self._stats_path + own
    self.num_cells = 0
    self._finished = False
    os.makedirs(os.path.dirname(self._path), exist_ok=True)
    self._writer = array_record_module.ArrayRecordWriter(
        self._tmp, _WRITER_OPTIONS[self._dtype.name])

  def __enter__(self) -> ShardWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if not self._finished:
      self.abort()

  def write(self, tokens: np.ndarray, meta: Mapping[str, Any]) -> None:
    """Appends one cell: [n] token ids and its meta dict."""
    if self._writer is None:
      raise RuntimeError(f"ShardWriter for {self._path} is already closed.")
    with _os_errors(self._tmp):
      self._writer.write(encode_record(tokens, meta, self._dtype))
    self.num_cells += 1

  def write_chunk(self, tokens: np.ndarray, offsets: np.ndarray, obs_names: Sequence[str],
                  source: int, labels: Sequence[str] | None = None,
                  batches: Sequence[str] | None = None) -> None:
    """Appends a chunk of cells: `tokens[offsets[i]:offsets[i + 1]]` is cell i.

    Byte for byte what `write` would store, about 4x faster: the token range
    is checked and converted once per chunk and meta JSON is formatted directly.
    """
    if self._writer is None:
      raise RuntimeError(f"ShardWriter for {self._path} is already closed.")
    body = _as_token_bytes(np.asarray(tokens), self._dtype)
    ends = (np.asarray(offsets) * self._dtype.itemsize).tolist()
    quote = json.encoder.encode_basestring_ascii  # what json.dumps uses for str
    fields = [("label", labels), ("batch", batches)]
    fields = [(name, values) for name, values in fields if values is not None]
    write, pack = self._writer.write, _HEADER.pack
    with _os_errors(self._tmp):
      for i, name in enumerate(obs_names):
        meta = f'{{"obs_name":{quote(str(name))},"source":{int(source)}'
        for key, values in fields:
          meta += f',"{key}":{quote(str(values[i]))}'
        meta = (meta + "}").encode("ascii")
        write(pack(len(meta)) + meta + body[ends[i]:ends[i + 1]])
    self.num_cells += len(obs_names)

  def finish(self, stats: Mapping[str, Any] | None = None) -> None:
    """Closes the shard and publishes it with its stats sidecar.

    Args:
      stats: extra JSON-serializable shard statistics for the sidecar; the
        sidecar's ``num_cells`` is always the number of records written.
    """
    if self._writer is None:
      raise RuntimeError(f"ShardWriter for {self._path} is already closed.")
    with _os_errors(self._tmp):
      self._writer.close()
    self._writer = None
    sidecar = dict(stats or {})
    sidecar["num_cells"] = self.num_cells
    with open(self._stats_tmp, "w", encoding="utf-8") as f:
      json.dump(sidecar, f, indent=1, sort_keys=True, default=_json_default)
    _fsync(self._stats_tmp)
    _fsync(self._tmp)
    os.replace(self._tmp, self._path)
    # The sidecar goes last: its presence is what marks the shard finished.
    os.replace(self._stats_tmp, self._stats_path)
    self._finished = True

  def abort(self) -> None:
    """Closes the writer and removes every temp file of this shard."""
    if self._writer is not None:
      writer, self._writer = self._writer, None
      try:
        writer.close()
      except RuntimeError:
        pass  # the shard is thrown away; closing fails as writing did (e.g. a full disk)
    for path in (self._tmp, self._stats_tmp):
      if os.path.exists(path):
        os.remove(path)


# What ArrayRecord's RuntimeError says when the C library's write fails for lack of space.
_OUT_OF_SPACE = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                 "File too large": errno.EFBIG}


@contextlib.contextmanager
def _os_errors(path: str):
  """ArrayRecord reports a failed write as a RuntimeError carrying the system's message: the
  OSError it is (a full disk: ENOSPC), so a command says so in one line (cli.guarded)."""
  try:
    yield
  except RuntimeError as e:
    code = next((c for message, c in _OUT_OF_SPACE.items() if message in str(e)), None)
    if code is None:
      raise
    raise OSError(code, os.strerror(code), path) from e


def is_shard_finished(out_dir: str | os.PathLike, shard_index: int) -> bool:
  """Whether shard `shard_index` was written completely (sidecar exists)."""
  return os.path.exists(_stats_path(out_dir, shard_index))


def read_shard_stats(out_dir: str | os.PathLike, shard_index: int) -> dict:
  """Returns the sidecar stats dict (incl. ``num_cells``) of a finished shard."""
  path = _stats_path(out_dir, shard_index)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise DataError(f"{path} does not exist: shard {shard_index} was not "
                    "finished; re-run the tokenizer to complete it.") from None
  except ValueError as e:
    raise DataError(f"{path} is not valid JSON ({e}); delete it and re-run the "
                    "tokenizer to rewrite the shard.") from None


def write_manifest(out_dir: str | os.PathLike, manifest: Mapping[str, Any]):
  """Writes ``manifest.json`` atomically (temp file, then os.replace)."""
  os.makedirs(out_dir, exist_ok=True)
  files.write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), dict(manifest),
                          default=_json_default)


def load_manifest(data_dir: str | os.PathLike) -> dict:
  """Reads and checks the manifest dict of a tokenized dataset directory.

  Readers rely on ``format``, ``version``, ``num_cells``, ``token_dtype``,
  ``shards`` ([{"file", "num_cells"}] in input order), ``sources``,
  ``labels``, ``batches``, ``vocab``, ``settings`` and ``special_ids``.
  """
  path = os.path.join(data_dir, MANIFEST_NAME)
  if not os.path.isdir(data_dir):
    raise DataError(f"{data_dir} does not exist or is not a directory; pass "
                    "the output directory of the tokenizer.")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise DataError(
        f"{data_dir} is not a tokenized dataset (no {MANIFEST_NAME}); pass "
        "the output directory of the tokenizer, or finish tokenizing into "
        "it.") from None
  except ValueError as e:
    raise DataError(f"{path} is not valid JSON ({e}); re-run the tokenizer."
                    ) from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
    raise DataError(f"{path} is not a {FORMAT_NAME} manifest (field 'format'); "
                    "pass the output directory of the tokenizer.")
  if manifest.get("version") != FORMAT_VERSION:
    raise DataError(
        f"{path} has format version {manifest.get('version')!r}; this code "
        f"reads version {FORMAT_VERSION}. Re-tokenize with this version.")
  for key in ("num_cells", "token_dtype", "shards"):
    if key not in manifest:
      raise DataError(f"{path} lacks the field {key!r}; re-run the tokenizer.")
  _le_dtype(manifest["token_dtype"])
  return manifest


def shard_files(data_dir: str | os.PathLike, manifest: Mapping[str, Any]
                ) -> list[tuple[str, int]]:
  """(path, num_cells) of every shard in manifest order; checks they exist."""
  out = []
  for shard in manifest["shards"]:
    path = os.path.join(data_dir, shard["file"])
    if not os.path.isfile(path):
      raise DataError(f"{path} is listed in {data_dir}/{MANIFEST_NAME} but "
                      "missing; re-run the tokenizer to rewrite it.")
    out.append((path, int(shard["num_cells"])))
  return out


def read_tokenized(data_dir: str | os.PathLike) -> Iterator[dict]:
  """Yields every cell of a tokenized dataset in input order.

  Args:
    data_dir: the tokenized dataset directory.

  Yields:
    One dict per cell, shard by shard and record by record: ``tokens`` ([n]
    int32), ``obs_name`` (str), ``source`` (the input file path, str) and
    ``label`` / ``batch`` (str) when the cell has them.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  manifest = load_manifest(data_dir)
  sources = manifest.get("sources", [])
  dtype = manifest["token_dtype"]
  for path, num_cells in shard_files(data_dir, manifest):
    reader = array_record_module.ArrayRecordReader(path)
    try:
      if reader.num_records() != num_cells:
        raise DataError(
            f"{path} holds {reader.num_records()} records but the manifest "
            f"says {num_cells}; re-run the tokenizer.")
      for start in range(0, num_cells, _READ_CHUNK):
        chunk = reader.read(start, min(start + _READ_CHUNK, num_cells))
        for i, data in enumerate(chunk, start):
          tokens, meta = decode_record(data, dtype)
          src = meta.get("source")
          if not (isinstance(src, int) and 0 <= src < len(sources)):
            raise DataError(
                f"{path} record {i} has source {src!r}, which is not an index "
                f"into the manifest's {len(sources)} 'sources'; re-run the "
                "tokenizer.")
          cell = {"tokens": tokens, "obs_name": meta.get("obs_name"),
                  "source": sources[src]}
          for key in ("label", "batch"):
            if meta.get(key) is not None:
              cell[key] = meta[key]
          yield cell
    finally:
      reader.close()
