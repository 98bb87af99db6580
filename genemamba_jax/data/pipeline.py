"""Grain input pipeline: tokenized ArrayRecord shards -> fixed-shape batches.

The pipeline is a chain of Grain ``MapDataset`` steps, so every batch is a pure
function of (seed, batch index) and iterator state is just a position::

  source (all shards, manifest order)
    -> shuffle(seed)                  global; reseeded per epoch by `repeat`
    -> slice(shard_index::shard_count) this JAX process's share
    -> map(decode, crop/pad to seq_len)
    -> batch(batch_size)              per epoch, so epochs have whole batches
    -> repeat(num_epochs)
    -> to_iter_dataset()              thread prefetch
    -> mp_prefetch(worker_count)      optional worker processes

Batches are dicts::

  tokens: [B, L] int32  token ids, padded with the pad id 0
  mask:   [B, L] bool   True on real (non-pad) tokens
  label:  [B] int32     index into manifest["labels"], -1 when unlabeled
  batch:  [B] int32     index into manifest["batches"], -1 when absent

The iterator's `get_state()` is a JSON-serializable dict, so it can be stored
in an Orbax checkpoint with ``grain.checkpoint.CheckpointSave`` (or by hand);
`set_state()` on a fresh iterator resumes with exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from genemamba_jax.data import corpora, records
from genemamba_jax.errors import DataError

# Threads per process that build whole batches ahead of the consumer. Decoding
# is Python-bound, so more threads only fight over the GIL: at B=32, L=2048 one
# thread gave ~315 batches/s, two ~270, four ~150 (2-core host); use workers
# to scale. Batches are large ([B, L] int32 + mask), so the buffer holds a few
# batches rather than Grain's default of 500 elements.
_READ_THREADS = 1
_PREFETCH_BATCHES = 4
# Batches each worker process keeps ready in shared memory.
_WORKER_BUFFER = 2
# Record meta key -> manifest list its index is taken from.
_CATEGORY_FIELDS = {"label": "labels", "batch": "batches"}


@dataclasses.dataclass
class PipelineConfig:
  """Settings of the input pipeline.

  Attributes:
    batch_size: cells per batch (per JAX process).
    seq_len: L, the fixed sequence length batches are cropped/padded to.
    seed: shuffle seed; the same on every process so shards stay disjoint.
    shuffle: shuffle globally (reshuffled every epoch).
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop each epoch's last partial batch (training). Also
      makes every process shard the same size, so hosts step in lockstep.
    worker_count: worker processes for prefetching; 0 = in this process.
    shard_index: this process's shard; defaults to jax.process_index().
    shard_count: number of shards; defaults to jax.process_count().
    eval_fraction: fraction of the cells held out for evaluation, chosen at
      random once (with a fixed seed, whatever `seed` is) so train and eval
      never share a cell and every run holds out the same cells.
    split: "train" reads the other cells, "eval" the held-out ones.
  """
  batch_size: int
  seq_len: int
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  drop_remainder: bool = True
  worker_count: int = 0
  shard_index: int | None = None
  shard_count: int | None = None
  eval_fraction: float = 0.0
  split: str = "train"

# The held-out split does not move with the training seed.
_SPLIT_SEED = 20_240_101


def _split(total: int, config: "PipelineConfig") -> slice:
  """The slice of the split-shuffled cells that `config.split` reads."""
  if not 0.0 <= config.eval_fraction < 1.0:
    raise DataError(f"PipelineConfig.eval_fraction={config.eval_fraction} must be in [0, 1).")
  if config.split not in ("train", "eval"):
    raise DataError(f"PipelineConfig.split={config.split!r}; use 'train' or 'eval'.")
  n_eval = int(round(total * config.eval_fraction))
  if config.eval_fraction > 0 and n_eval == 0:
    n_eval = 1
  if config.split == "eval":
    if n_eval == 0:
      raise DataError("PipelineConfig.split='eval' needs eval_fraction > 0.")
    return slice(total - n_eval, total)
  return slice(0, total - n_eval)


class _ToExample:
  """Decodes one record into fixed-length arrays (a Grain map transform).

  A plain picklable class, so worker processes can rebuild it.
  """

  def __init__(self, data_dir: str, manifest: Mapping[str, Any], seq_len: int):
    self._data_dir = data_dir
    self._dtype = manifest["token_dtype"]
    self._seq_len = seq_len
    settings = manifest.get("settings", {})
    special = manifest.get("special_ids", {})
    # Only when <eos> was appended does a cropped sequence need it restored.
    self._eos_id = None
    if settings.get("eos"):
      if not isinstance(special.get("eos"), int):
        raise DataError(
            f"{data_dir}/manifest.json has settings.eos set but no integer "
            "special_ids.eos; re-run the tokenizer.")
      self._eos_id = special["eos"]
    self._index = {
        key: {name: i for i, name in enumerate(manifest.get(field) or [])}
        for key, field in _CATEGORY_FIELDS.items()
    }

  def _category(self, meta: dict, key: str) -> int:
    name = meta.get(key)
    if name is None:
      return -1
    try:
      return self._index[key][name]
    except KeyError:
      raise DataError(
          f"cell {meta.get('obs_name')!r} in {self._data_dir} has {key} "
          f"{name!r}, which is not in the manifest's "
          f"{_CATEGORY_FIELDS[key]!r}; re-run "
          "the tokenizer.") from None

  def __call__(self, data: bytes) -> dict[str, np.ndarray]:
    """Returns tokens [L] int32, mask [L] bool, label [] and batch [] int32."""
    tokens, meta = records.decode_record(data, self._dtype)
    length = self._seq_len
    n = min(len(tokens), length)
    out = np.zeros(length, np.int32)
    out[:n] = tokens[:n]
    if len(tokens) > length and self._eos_id is not None:
      # Cropping keeps the start (so <cls> stays first); put the end marker
      # back in the last slot so the model always sees where the cell ends.
      out[length - 1] = self._eos_id
    mask = np.zeros(length, np.bool_)
    mask[:n] = True
    return {
        "tokens": out,
        "mask": mask,
        "label": np.int32(self._category(meta, "label")),
        "batch": np.int32(self._category(meta, "batch")),
    }


def _check_int(name: str, value: Any, lo: int, hint: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise DataError(f"PipelineConfig.{name} must be an int, got {value!r}.")
  if value < lo:
    raise DataError(f"PipelineConfig.{name}={value} must be >= {lo}; {hint}")
  return int(value)


def _plan(data_dir, config: PipelineConfig) -> tuple[dict, slice, int]:
  """Validates `config` against the dataset (one directory or several, `corpora`).

  Returns:
    (manifest, slice of the shuffled global order this process reads, number
    of cells in that slice).
  """
  manifest = corpora.load_manifest(data_dir)
  data_dir = corpora.describe(data_dir)
  _check_int("batch_size", config.batch_size, 1, "use a positive batch size.")
  settings = manifest.get("settings", {})
  num_special = int(bool(settings.get("cls"))) + int(bool(settings.get("eos")))
  _check_int("seq_len", config.seq_len, max(2, num_special + 1),
             f"the dataset adds {num_special} special token(s) per cell "
             "(cls/eos), so seq_len must leave room for at least one gene.")
  _check_int("seed", config.seed, 0, "use a seed in [0, 2**32).")
  if config.seed >= 2**32:
    raise DataError(f"PipelineConfig.seed={config.seed} must be < 2**32.")
  if config.num_epochs is not None:
    _check_int("num_epochs", config.num_epochs, 1,
               "use None to repeat forever.")
  _check_int("worker_count", config.worker_count, 0,
             "use 0 to read in this process.")
  index, count = config.shard_index, config.shard_count
  if index is None or count is None:
    import jax  # pylint: disable=g-import-not-at-top
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
  count = _check_int("shard_count", count, 1, "use one shard per process.")
  index = _check_int("shard_index", index, 0, "shards are numbered from 0.")
  if index >= count:
    raise DataError(f"PipelineConfig.shard_index={index} must be < "
                    f"shard_count={count}.")
  split = _split(int(manifest["num_cells"]), config)
  total = split.stop - split.start
  if config.drop_remainder:
    # Equal shards: every host runs the same number of steps per epoch. The
    # `total % count` cells left out are random ones, different every epoch.
    per_shard = total // count
    sl = slice(index, per_shard * count, count)
  else:
    per_shard = len(range(index, total, count))
    sl = slice(index, None, count)
  if per_shard == 0:
    raise DataError(f"{data_dir} has {total} cells, too few to give each of "
                    f"{count} process shards at least one.")
  if config.drop_remainder and config.batch_size > per_shard:
    raise DataError(
        f"PipelineConfig.batch_size={config.batch_size} is larger than the "
        f"{per_shard} cells of {data_dir} available to process shard "
        f"{index}/{count}; with drop_remainder=True no batch could be made. "
        "Use a smaller batch_size or drop_remainder=False.")
  return manifest, sl, per_shard


def num_batches_per_epoch(data_dir, config: PipelineConfig) -> int:
  """Batches one epoch yields on this process shard."""
  _, _, per_shard = _plan(data_dir, config)
  if config.drop_remainder:
    return per_shard // config.batch_size
  return math.ceil(per_shard / config.batch_size)


def _allow_unparsed_profiling_flag() -> None:
  """Lets grain start workers in programs that never parse absl flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  # grain 0.2.18 reads this absl flag when starting worker processes once JAX
  # is imported and raises UnparsedFlagAccessError unless flags were parsed
  # (google/grain#1355, fixed upstream by #1362). Marking just this flag as
  # present makes it read its default: the trick grain itself applies to its
  # debug flags in worker processes. Parsed flags are left alone.
  name = "grain_enable_multiprocess_worker_profiling"
  if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
    flags.FLAGS[name].present = True


def make_dataset(data_dir, config: PipelineConfig):
  """Builds the input pipeline of a tokenized dataset.

  Args:
    data_dir: tokenized dataset directory (manifest.json + shards/), or
      several read as one corpus: a comma-separated string or a list of paths
      (`genemamba_jax.data.corpora`); their shards are concatenated in order.
    config: pipeline settings.

  Returns:
    A ``grain.IterDataset``; ``iter()`` on it gives a checkpointable iterator
    (``get_state()`` / ``set_state()``) of batch dicts, see the module
    docstring. With worker_count > 0, call ``close()`` on the iterator when
    done to stop the worker processes promptly.
  """
  import grain  # pylint: disable=g-import-not-at-top
  manifest, sl, _ = _plan(data_dir, config)
  # Several directories: the combined manifest's shard paths are absolute.
  files = records.shard_files(corpora.split_paths(data_dir)[0], manifest)
  data_dir = corpora.describe(data_dir)
  source = grain.sources.ArrayRecordDataSource([path for path, _ in files])
  if len(source) != int(manifest["num_cells"]):
    raise DataError(
        f"the shards of {data_dir} hold {len(source)} records but the "
        f"manifest says num_cells={manifest['num_cells']}; re-run the "
        "tokenizer.")
  ds = grain.MapDataset.source(source)
  split = _split(len(source), config)
  if split != slice(0, len(source)):
    ds = ds.shuffle(seed=_SPLIT_SEED)[split]
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds[sl]
  ds = ds.map(_ToExample(data_dir, manifest, config.seq_len))
  # Batch before repeat so each epoch ends on a batch boundary and
  # `num_batches_per_epoch` is exact.
  ds = ds.batch(config.batch_size, drop_remainder=config.drop_remainder)
  ds = ds.repeat(config.num_epochs)
  ids = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES))
  if config.worker_count:
    _allow_unparsed_profiling_flag()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.worker_count,
        per_worker_buffer_size=_WORKER_BUFFER))
  return ids
