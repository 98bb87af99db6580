"""python -m genemamba_jax.convert {from-pytorch,to-pytorch}: the original GeneMamba's checkpoints.

The original PyTorch GeneMamba saves a directory with

  config.json           {"architectures": ["MambaModel"], "d_model", "mamba_layer", "vocab_size",
                         "torch_dtype", "transformers_version"}; no combination mode
  model.safetensors     the `MambaModel` state dict (genemamba_jax/model/convert.py lists the keys)
  gene_tokenizer.json   a `tokenizers` WordLevel vocabulary: [UNK]=0, [PAD]=1, then Ensembl ids
                        with the ids 2..25,425 of Geneformer's 30M dictionary; a fine-tuned
                        checkpoint adds [CLS] (id 25,426) and one embedding and lm_head row

`from-pytorch` turns it into a run directory like the ones `train` writes
(model.json, vocab/, checkpoints/0/), so `embed`, `finetune`, `evaluate` and
`train` (`init_checkpoint`) use it; `to-pytorch` writes a run back in the
original's format. From Python: `load_pytorch` / `write_run` and
`export_pytorch`; no torch is needed (safetensors reads and writes numpy).

How names and files map: genemamba_jax/convert/original_files.py; weights:
genemamba_jax/model/convert.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from genemamba_jax import rundir
from genemamba_jax.files import atomic_dir
from genemamba_jax.convert.original_files import (
    CLASSIFIER_FILE, CONFIG_FILE, CONVERT_PICKLE, ORIGINAL_MIXER, ORIGINAL_TOKENIZE, TOKENIZER_FILE,
    TORCH_PICKLES, WEIGHTS_FILE, classifier_tensors, head_from_classifier, installed_version,
    original_tokens, our_vocab, read_config, read_medians, read_safetensors, read_vocab,
    tokenizer_json, write_json)
from genemamba_jax import files
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.errors import DataError
from genemamba_jax.model import GeneMambaConfig
from genemamba_jax.model.config import COMBINES
from genemamba_jax.model.convert import original_state_dict, params_from_original

__all__ = ["Converted", "load_pytorch", "write_run", "export_pytorch", "exportable"]


@dataclasses.dataclass
class Converted:
  """A model in our terms, ready to write as a run directory (`write_run`)."""
  config: GeneMambaConfig
  vocab: vocab_lib.Vocab
  medians: dict[str, float]
  tokenize: dict  # how cells are tokenized for it
  params: dict  # GeneMamba parameters, pure dict of float32 numpy arrays
  info: dict  # where it came from and the original's token names (vocab/vocab_info.json)
  task: dict | None = None  # a fine-tuned classifier's task.json
  head: dict | None = None  # its head's variables (pure dict)


def load_pytorch(directory: str | os.PathLike, *, median_dictionary: str | None,
                 combine: str | None = None, identity_layers: bool = False,
                 token_dictionary: str | None = None, classifier: str | None = None,
                 classes: Sequence[str] | None = None) -> Converted:
  """Reads the original GeneMamba's checkpoint directory (see the module docstring).

  Args:
    directory: holds config.json, model.safetensors and gene_tokenizer.json.
    median_dictionary: Geneformer's gene_median_dictionary.pkl (required: new
      cells must be tokenized with the corpus's medians).
    combine: the bidirectional combination; required for concat / gate (their
      `aggr` tensors look the same), else mean (the original's default) or sum.
    identity_layers: reproduce the public code, whose layers return their input.
    token_dictionary: Geneformer's token_dictionary.pkl, when the directory has
      no gene_tokenizer.json.
    classifier: the original's `Classifier` head as safetensors (fine-tuned
      checkpoints); `classes` names its outputs in label-encoder order.

  Raises:
    DataError: a missing or extra tensor, a shape that does not fit config.json,
      an unknown config key, a vocabulary that does not match the embedding rows,
      a file that is not safetensors, or a torch pickle.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise DataError(f"{directory}: not a directory; pass the original GeneMamba's checkpoint "
                    "directory (config.json, model.safetensors, gene_tokenizer.json)")
  pickles = sorted(p for p in directory.iterdir() if p.suffix in TORCH_PICKLES)
  if not (directory / WEIGHTS_FILE).is_file() and pickles:
    raise DataError(f"{pickles[0]}: a torch pickle, which is refused (loading it can run "
                    "code); " + CONVERT_PICKLE.format(pickles[0], directory / WEIGHTS_FILE))
  raw = read_config(directory)
  weights = directory / WEIGHTS_FILE
  tensors = read_safetensors(weights)
  if "embeddings.weight" not in tensors:
    raise DataError(f"{weights}: missing tensor 'embeddings.weight'")
  rows, width = tensors["embeddings.weight"].shape
  if width != raw["d_model"] or rows not in (raw["vocab_size"], raw["vocab_size"] + 1):
    raise DataError(f"{weights}: 'embeddings.weight' has shape {(rows, width)}, config.json says "
                    f"d_model {raw['d_model']} and vocab_size {raw['vocab_size']} (+1 when "
                    "fine-tuned)")

  tokens = read_vocab(directory, token_dictionary)
  # Fine-tuned (one row more than config.json's vocab_size) with a tokenizer file that predates
  # [CLS]. Only then: a file that lacks one token must not pass for it.
  if rows == raw["vocab_size"] + 1 == len(tokens) + 1 and "[CLS]" not in tokens:
    tokens["[CLS]"] = len(tokens)
  vocab, renamed = our_vocab(tokens, str(directory / TOKENIZER_FILE))
  if len(vocab) != rows:
    raise DataError(f"{directory / TOKENIZER_FILE}: {len(vocab)} tokens, but the embedding has "
                    f"{rows} rows; the vocabulary does not belong to these weights")

  has_aggr = any(k.startswith("mamba_mixer.aggr.") for k in tensors)
  if combine is None and has_aggr:
    raise DataError(f"{weights}: has mamba_mixer.aggr tensors, so the model combined its two "
                    "directions with concat or gate (they look the same); pass --combine concat "
                    "or --combine gate")
  if combine is not None and combine not in COMBINES:
    raise DataError(f"--combine {combine}: use one of {', '.join(COMBINES)}")
  if combine in ("concat", "gate") and not has_aggr:
    raise DataError(f"--combine {combine}: {weights} has no mamba_mixer.aggr tensors, so it used "
                    "mean or sum; pass --combine mean (the original's default) or sum")
  combine = combine or raw.get("mode") or "mean"
  try:
    config = GeneMambaConfig(
        vocab_size=rows, d_model=raw["d_model"], n_layers=raw["mamba_layer"], combine=combine,
        shared_combine=combine in ("concat", "gate"), streams="mixed",
        residual="identity" if identity_layers else "inside", **ORIGINAL_MIXER)
  except ValueError as e:
    raise DataError(f"{directory / CONFIG_FILE}: {e}") from None
  try:
    params = params_from_original(tensors, config)
  except ValueError as e:
    raise DataError(f"{weights}: {e} (config.json: d_model {config.d_model}, "
                    f"mamba_layer {config.n_layers}, combine {combine})") from None

  medians = read_medians(median_dictionary, vocab)
  fine_tuned = vocab.cls_id is not None
  # The original fine-tunes on [CLS] + the top 2,048 genes.
  tokenize = dict(ORIGINAL_TOKENIZE, cls=fine_tuned, max_len=2048 + int(fine_tuned))
  head = task = None
  if classifier:
    if not fine_tuned:
      raise DataError(f"--classifier {classifier}: {directory} is a pretrained checkpoint (no "
                      "[CLS] row); pass the fine-tuned backbone the classifier was trained with")
    head, task = head_from_classifier(classifier, config.d_model, classes)
  info = {"source": "genemamba-pytorch", "checkpoint": str(directory.absolute()),
          "original_tokens": renamed, "median_dictionary": str(median_dictionary),
          "original_config": {k: raw[k] for k in ("torch_dtype", "transformers_version")
                              if k in raw}}
  return Converted(config, vocab, medians, tokenize, params, info, task, head)

def write_run(converted: Converted, out: str | os.PathLike) -> Path:
  """Writes a run directory (model.json, vocab/, task.json, checkpoints/0/) atomically."""
  from genemamba_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  out = Path(out)
  try:
    with atomic_dir(out) as tmp:
      rundir.write_run_files(tmp, converted.config, converted.vocab, converted.medians,
                             converted.tokenize, converted.task, converted.info)
      params = converted.params
      if converted.head is not None:
        params = {"backbone": params, "head": converted.head}
      with Checkpointer(tmp / rundir.CHECKPOINTS, keep=1, save_every=1) as ckpt:
        ckpt.save(0, {"params": params}, force=True)
  except FileExistsError:
    raise DataError(f"{out}: exists and is not empty; choose a new --out or remove it") from None
  return out

# --- writing the original's files --------------------------------------------


def exportable(config: GeneMambaConfig) -> None:
  """DataError naming the first setting the original `MambaModel` cannot express."""
  for key, want in ORIGINAL_MIXER.items():
    have = config.state_size if key == "d_state" else getattr(config, key)
    if have != want:
      raise DataError(f"model setting {key}={have!r}: the original's layers are mamba_ssm "
                      f"Mamba2 with {key}={want!r}; it cannot be exported")
  checks = [
      (config.streams != "mixed", "streams='separate' (the leak-free objective's separate "
       "streams; the original mixes the directions in every layer)"),
      (config.combine in ("concat", "gate") and not config.shared_combine,
       f"per-layer {config.combine} weights (shared_combine=False; the original shares one aggr)"),
      (config.prenorm, "prenorm=True"), (config.tie_embeddings, "tie_embeddings=True"),
      (not config.lm_head_bias, "lm_head_bias=False"),
      (config.residual == "around" and config.combine != "mean",
       f"residual='around' with combine={config.combine} (the original computes "
       "combine(x + f, x + b))"),
  ]
  for failed, setting in checks:
    if failed:
      raise DataError(f"model setting {setting}: the original GeneMamba cannot express it")

def export_pytorch(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
  """A run directory (or one of its checkpoints) -> the original's checkpoint directory.

  Writes config.json, model.safetensors and gene_tokenizer.json that the
  original's `MambaModel.from_pretrained` loads with its strict
  `load_state_dict` (plus classifier.safetensors, the original `Classifier`'s
  state dict, for a run fine-tuned with the MLP head), atomically. DataError
  names the first setting the original cannot express.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  where = rundir.resolve_checkpoint(checkpoint)
  config = rundir.load_model_config(where.run_dir)
  exportable(config)
  vocab, _, info = vocab_lib.load_vocab_dir(where.run_dir / rundir.VOCAB_DIR)
  tokens = original_tokens(vocab, info, info.get("tokenize", {}))
  params = rundir.restore_params(where.step_dir)
  head = None
  if "backbone" in params:
    params, head = params["backbone"], params.get("head")
  tensors = original_state_dict(params, config)
  rows = len(tokens)  # drop the rows of unused trailing <cls> / <eos>
  for key in ("embeddings.weight", "lm_head.weight", "lm_head.bias"):
    tensors[key] = np.ascontiguousarray(tensors[key][:rows])
  original = info.get("original_config", {})
  vocab_size = rows - int("[CLS]" in tokens)
  config_json = {"architectures": ["MambaModel"], "d_model": config.d_model,
                 "mamba_layer": config.n_layers, "vocab_size": vocab_size,
                 "torch_dtype": "float32"}
  version = original.get("transformers_version") or installed_version("transformers")
  if version:
    config_json["transformers_version"] = version
  task = None
  if head is not None and (where.run_dir / rundir.TASK_FILE).is_file():
    task = files.read_json(where.run_dir / rundir.TASK_FILE, "re-run finetune")
  out = Path(out)
  try:
    with atomic_dir(out) as tmp:
      save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
      write_json(tmp / CONFIG_FILE, config_json)
      write_json(tmp / TOKENIZER_FILE, tokenizer_json(tokens))
      classifier = classifier_tensors(head, task or {}) if head is not None else None
      if classifier is not None:
        save_file(classifier, tmp / CLASSIFIER_FILE, metadata={"format": "pt"})
  except FileExistsError:
    raise DataError(f"{out}: exists and is not empty; choose a new --out or remove it") from None
  return out
