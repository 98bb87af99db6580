"""A trained GeneMamba back from disk: model config, vocabulary, medians and parameters.

`train` and `finetune` write a self-contained run directory:

  <run>/model.json                 GeneMambaConfig fields
  <run>/vocab/                     vocab.json, medians.json, vocab_info.json; the info
                                   holds "tokenize": how the training cells were tokenized
  <run>/task.json                  finetune only: labels, pooling, head sizes
  <run>/checkpoints/<step>/state   Orbax: {"params": ...}; after finetune the params are
                                   {"backbone": GeneMamba params, "head": head variables}

`load_pretrained(path)` accepts the run directory (its latest checkpoint) or one
checkpoint directory (`<run>/checkpoints/<step>`), so the same weights feed
`embed`, `finetune` and `evaluate`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from genemamba_jax import files
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.errors import DataError
from genemamba_jax.data.tokenizer import CellTokenizer, TokenizeConfig
from genemamba_jax.model import GeneMamba, GeneMambaConfig

MODEL_FILE = "model.json"
VOCAB_DIR = "vocab"
TASK_FILE = "task.json"
CHECKPOINTS = "checkpoints"


def write_run_files(run_dir: str | os.PathLike, config: GeneMambaConfig, vocab: vocab_lib.Vocab,
                    medians: Mapping[str, float], tokenize: Mapping[str, Any],
                    task: Mapping[str, Any] | None = None,
                    info: Mapping[str, Any] | None = None) -> None:
  """Writes model.json, vocab/ (and task.json) so the run's checkpoints can be loaded alone.

  `tokenize` holds at least max_len, cls, eos and log1p: how cells must be
  tokenized to look like the training data. `info` goes to vocab/vocab_info.json too.
  """
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  files.write_json_atomic(run_dir / MODEL_FILE, dataclasses.asdict(config))
  vocab_lib.save_vocab_dir(run_dir / VOCAB_DIR, vocab, medians,
                           {**(info or {}), "tokenize": dict(tokenize)})
  if task is not None:
    files.write_json_atomic(run_dir / TASK_FILE, dict(task))


def finished_steps(checkpoints_dir: str | os.PathLike) -> list[int]:
  """Steps with a finished checkpoint under `checkpoints_dir` (Orbax's unfinished tmp dirs and
  a missing directory give none)."""
  return sorted(int(p.name) for p in Path(checkpoints_dir).glob("*")
                if p.name.isdigit() and (p / "state").is_dir())


@dataclasses.dataclass(frozen=True)
class CheckpointPath:
  run_dir: Path  # holds model.json and vocab/
  step_dir: Path  # holds state/
  step: int


def resolve_checkpoint(path: str | os.PathLike) -> CheckpointPath:
  """A run directory (-> its latest step) or a step directory -> CheckpointPath; DataError if neither."""
  path = Path(path).expanduser().absolute()
  hint = ("pass a run directory written by `genemamba_jax.train` or `genemamba_jax.finetune` "
          "(it holds model.json and checkpoints/), or one of its checkpoints/<step> directories")
  if not path.is_dir():
    raise DataError(f"{path}: checkpoint not found; {hint}")
  if (path / "state").is_dir():
    step_dir = path
    run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
  else:
    run_dir = path.parent if path.name == CHECKPOINTS else path
    steps = finished_steps(run_dir / CHECKPOINTS)
    if not steps:
      raise DataError(f"{path}: no finished checkpoint in {run_dir / CHECKPOINTS}; {hint}")
    step_dir = run_dir / CHECKPOINTS / str(max(steps))
  if not (run_dir / MODEL_FILE).is_file():
    raise DataError(f"{run_dir}: no {MODEL_FILE} beside the checkpoints (runs written before "
                    f"model.json existed cannot be loaded; re-run training); {hint}")
  return CheckpointPath(run_dir, step_dir, int(step_dir.name) if step_dir.name.isdigit() else -1)


@dataclasses.dataclass
class Pretrained:
  """A loaded checkpoint. `model` is ready to call; `head` is the fine-tuned head's variables."""
  model: GeneMamba
  config: GeneMambaConfig
  vocab: vocab_lib.Vocab
  medians: dict[str, float]
  tokenize: dict  # max_len, cls, eos, log1p, ... of the training data
  checkpoint: CheckpointPath
  task: dict | None = None  # finetune's task.json
  head: dict | None = None  # pure dict of the head's variables (numpy)

  def tokenizer(self, *, max_len: int | None = None, cls: bool | None = None,
                gene_map: Mapping[str, str] | None = None) -> CellTokenizer:
    """A tokenizer matching the training data; every cell is kept (no QC drop), in input order."""
    settings = self.tokenize
    config = TokenizeConfig(max_len=max_len or settings.get("max_len", 2048),
                            cls=settings.get("cls", False) if cls is None else cls,
                            eos=settings.get("eos", False), log1p=settings.get("log1p", False),
                            min_genes=0, primary_only=False)
    return CellTokenizer(self.vocab, self.medians, config, gene_map)


def load_model_config(run_dir: str | os.PathLike) -> GeneMambaConfig:
  fields = files.read_json(Path(run_dir) / MODEL_FILE, "re-run training to write it")
  known = {f.name for f in dataclasses.fields(GeneMambaConfig)}
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known}
  return GeneMambaConfig(**fields)


def load_pretrained(path: str | os.PathLike, **config_changes) -> Pretrained:
  """Loads a checkpoint (see `resolve_checkpoint`); `config_changes` override run-time fields.

  Only fields that do not change parameter shapes make sense to override:
  dtype, scan_backend, scan_chunk_size, remat.
  """
  where = resolve_checkpoint(path)
  config = load_model_config(where.run_dir).replace(**config_changes)
  vocab, medians, info = vocab_lib.load_vocab_dir(where.run_dir / VOCAB_DIR)
  if len(vocab) != config.vocab_size:
    raise DataError(f"{where.run_dir}: vocab/ holds {len(vocab)} tokens but model.json says "
                    f"vocab_size={config.vocab_size}; the run directory is inconsistent")
  task = None
  if (where.run_dir / TASK_FILE).is_file():
    task = files.read_json(where.run_dir / TASK_FILE, "re-run finetune")
  params = restore_params(where.step_dir)
  head = None
  if "backbone" in params:  # a fine-tuned checkpoint
    params, head = params["backbone"], params.get("head")
  model = build_model(config, params, f"{where.step_dir}/state")
  return Pretrained(model, config, vocab, medians, dict(info.get("tokenize", {})), where, task,
                    head)


def restore_params(step_dir: str | os.PathLike) -> dict:
  """The "params" of a saved train state, as a pure dict of numpy arrays (host memory)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state_dir = Path(step_dir).absolute() / "state"
  try:
    saved = ocp.StandardCheckpointer().restore(state_dir)
  except (FileNotFoundError, ValueError) as e:
    raise DataError(f"{state_dir}: cannot read the checkpoint ({e})") from None
  if "params" not in saved:
    raise DataError(f"{state_dir}: the checkpoint holds no 'params' (keys: {sorted(saved)})")
  return _unwrap_values(saved["params"])


def _unwrap_values(tree: Any) -> Any:
  """NNX states save each variable as {"value": array}; pure dicts hold the array itself."""
  if isinstance(tree, Mapping):
    if set(tree) == {"value"}:
      return np.asarray(tree["value"])
    return {k: _unwrap_values(v) for k, v in tree.items()}
  return np.asarray(tree)


def build_model(config: GeneMambaConfig, params: Mapping, where: str = "checkpoint") -> GeneMamba:
  """GeneMamba(config) holding `params` (a pure dict); DataError names a missing or misshapen array."""
  abstract = nnx.eval_shape(lambda: GeneMamba(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = nnx.to_pure_dict(state)
  flat_expected = dict(_flatten(expected))
  flat_given = dict(_flatten(params))
  missing = sorted(set(flat_expected) - set(flat_given))
  if missing:
    raise DataError(f"{where}: lacks parameters {', '.join(missing[:5])} for the model in "
                    "model.json; is it the checkpoint of that run?")
  for key, leaf in flat_expected.items():
    if tuple(flat_given[key].shape) != tuple(leaf.shape):
      raise DataError(f"{where}: parameter {key} has shape {flat_given[key].shape}, the model in "
                      f"model.json needs {leaf.shape}")
  loaded = jax.tree.map(lambda leaf, value: jax.numpy.asarray(value, leaf.dtype), expected,
                        select_like(params, expected))
  nnx.replace_by_pure_dict(state, loaded)
  return nnx.merge(graphdef, state)


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
  if isinstance(tree, Mapping):
    return [kv for k, v in tree.items() for kv in _flatten(v, f"{prefix}/{k}" if prefix else str(k))]
  return [(prefix, tree)]


def select_like(given: Mapping, like: Mapping) -> dict:
  """`given` restricted to the keys of `like` (same nesting)."""
  def pick(k):  # Orbax gives string keys where the model's state may use ints
    return given[k] if k in given else given[str(k)]
  return {k: select_like(pick(k), v) if isinstance(v, Mapping) else pick(k) for k, v in like.items()}


def add_tokens(loaded: Pretrained, tokens: Sequence[str]) -> Pretrained:
  """`loaded` with `tokens` appended to its vocabulary (the next free ids) and to the model.

  The new embedding (and untied LM head) rows start at the mean of the gene
  rows, as the original starts its [CLS] for fine-tuning. Tokens the vocabulary
  already holds are skipped.
  """
  new = [t for t in tokens if t not in loaded.vocab]
  if not new:
    return loaded
  vocab = vocab_lib.Vocab({**loaded.vocab.token_to_id,
                           **{t: len(loaded.vocab) + i for i, t in enumerate(new)}},
                          f"{loaded.checkpoint.run_dir}/vocab + {', '.join(new)}")
  config = loaded.config.replace(vocab_size=len(vocab))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)))
  gene_rows = loaded.vocab.gene_token_ids(loaded.vocab.gene_ids)

  def grow(table: np.ndarray, axis: int) -> np.ndarray:
    mean = np.take(table, gene_rows, axis=axis).mean(axis=axis, keepdims=True)
    return np.concatenate([table] + [mean] * len(new), axis=axis)

  params["embeddings"]["embedding"] = grow(params["embeddings"]["embedding"], 0)
  if "lm_head" in params:
    for name, axis in (("kernel", 1), ("bias", 0)):
      if name in params["lm_head"]:
        params["lm_head"][name] = grow(params["lm_head"][name], axis)
  if "lm_head_bias" in params:
    params["lm_head_bias"] = grow(params["lm_head_bias"], 0)
  model = build_model(config, params, f"{loaded.checkpoint.step_dir}")
  return dataclasses.replace(loaded, model=model, config=config, vocab=vocab)


def start_at_gene_mean(model: GeneMamba, vocab: vocab_lib.Vocab, token_id: int) -> None:
  """Sets embedding row `token_id` to the mean gene embedding, in place (a token never trained)."""
  table = model.embeddings.embedding
  gene_rows = vocab.gene_token_ids(vocab.gene_ids)
  table[...] = table[...].at[token_id].set(table[...][gene_rows].mean(axis=0))
