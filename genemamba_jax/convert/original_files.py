"""The original PyTorch GeneMamba's files: config.json, model.safetensors, gene_tokenizer.json
and its `Classifier` head, read into and written from our terms (numpy, no torch).

Token ids are kept; names map as [UNK] -> <pad> (id 0), [PAD] -> <mask> (id 1)
and [CLS] -> <cls>: Geneformer's ids for <pad> and <mask>. Our padding is
always masked, so which row pads never reaches a valid position.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from genemamba_jax.data import safe_pickle
from genemamba_jax import files
from genemamba_jax.data.genes import GENEFORMER_SOURCE
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.errors import DataError

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "gene_tokenizer.json"
CLASSIFIER_FILE = "classifier.safetensors"
# config.json keys the original writes (PretrainedConfig.to_diff_dict of its config); `mode` is
# there only when the saving script set it.
CONFIG_KEYS = {"architectures", "d_model", "mamba_layer", "vocab_size", "torch_dtype", "dtype",
               "transformers_version", "mode", "model_type", "_name_or_path"}
# The original's special tokens -> ours, with the ids they must have (None: any id).
SPECIALS = {"[UNK]": (vocab_lib.PAD, 0), "[PAD]": (vocab_lib.MASK, 1), "[CLS]": (vocab_lib.CLS, None)}
# What the original's tokenized corpus looked like (Geneformer's way, 2,048 genes).
ORIGINAL_TOKENIZE = {"max_len": 2048, "cls": False, "eos": False, "log1p": False}
# mamba_ssm's Mamba2(d_model, d_state=64, d_conv=4, expand=2) with its defaults.
ORIGINAL_MIXER = dict(mixer="mamba2", d_state=64, d_conv=4, expand=2, headdim=64, ngroups=1,
                      norm_eps=1e-5, conv_bias=True, proj_bias=False)
TORCH_PICKLES = (".bin", ".pt", ".pth", ".ckpt")
CONVERT_PICKLE = ("convert it to safetensors first, where torch is installed: python -c "
                  "\"import torch, safetensors.torch as st; st.save_file(torch.load('{}', "
                  "map_location='cpu', weights_only=True), '{}')\"")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  if path.suffix in TORCH_PICKLES:
    raise DataError(f"{path}: a torch pickle, which is refused (loading it can run code); "
                    + CONVERT_PICKLE.format(path, path.with_suffix(".safetensors")))
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise DataError(f"{path}: not a safetensors file ({' '.join(str(e).split())})") from None


def read_config(directory: Path) -> dict:
  path = directory / CONFIG_FILE
  config = files.read_json(path, "pass the original GeneMamba's checkpoint directory (it holds "
                            "config.json, model.safetensors and gene_tokenizer.json)")
  if not isinstance(config, dict):
    raise DataError(f"{path}: expected a JSON object")
  unknown = sorted(set(config) - CONFIG_KEYS)
  if unknown:
    raise DataError(f"{path}: unknown key {unknown[0]!r}; this is not the original GeneMamba's "
                    f"MambaModel config (keys {', '.join(sorted(CONFIG_KEYS))})")
  for key in ("d_model", "mamba_layer", "vocab_size"):
    if not isinstance(config.get(key), int) or config[key] < 1:
      raise DataError(f"{path}: {key} is {config.get(key)!r}; expected a positive integer")
  return config


def read_vocab(directory: Path, token_dictionary: str | None) -> dict[str, int]:
  """token -> id in the original's names, from gene_tokenizer.json or Geneformer's pickle."""
  path = directory / TOKENIZER_FILE
  if path.is_file():
    data = files.read_json(path, "it should be the original's tokenizers WordLevel file")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
      raise DataError(f"{path}: no model.vocab; expected a tokenizers WordLevel file")
    tokens = dict(model["vocab"])
    for added in data.get("added_tokens") or []:
      tokens[added["content"]] = added["id"]
    return tokens
  if token_dictionary is None:
    raise DataError(f"{directory}: no {TOKENIZER_FILE}; pass --token-dictionary (Geneformer's "
                    f"token_dictionary.pkl, whose ids the original uses; {GENEFORMER_SOURCE})")
  tokens = safe_pickle.load_pickle(token_dictionary, GENEFORMER_SOURCE)
  if not isinstance(tokens, dict):
    raise DataError(f"{token_dictionary}: expected a dict of token -> id")
  return {str(t): int(i) for t, i in tokens.items()}


def our_vocab(tokens: Mapping[str, int], source: str) -> tuple[vocab_lib.Vocab, dict[str, str]]:
  """The original's token -> id in our names; also {our name: original name} of the specials."""
  ours, renamed = {}, {}
  for token, idx in tokens.items():
    if token in SPECIALS:
      name, want = SPECIALS[token]
      if want is not None and idx != want:
        raise DataError(f"{source}: {token} has id {idx}; the original's has {want}")
      ours[name], renamed[name] = idx, token
    elif token.startswith("[") and token.endswith("]"):
      raise DataError(f"{source}: special token {token} is not one of the original's "
                      f"({', '.join(SPECIALS)}); this converter does not know what it means")
    else:
      ours[token] = idx
  return vocab_lib.Vocab(ours, source), renamed


def read_medians(path: str | None, vocab: vocab_lib.Vocab) -> dict[str, float]:
  if not path:
    raise DataError("--median-dictionary is required: the gene medians the original's corpus "
                    "was tokenized with (Geneformer's gene_median_dictionary.pkl; "
                    f"{GENEFORMER_SOURCE})")
  medians = safe_pickle.load_pickle(path, GENEFORMER_SOURCE)
  if not isinstance(medians, dict):
    raise DataError(f"{path}: expected a dict of Ensembl id -> median")
  missing = [g for g in vocab.gene_ids if g not in medians]
  if missing:
    raise DataError(f"{path}: {len(missing)} of the checkpoint's {len(vocab.gene_ids)} genes have "
                    f"no median (e.g. {missing[0]}); pass the median dictionary of the "
                    f"vocabulary the model was trained with ({GENEFORMER_SOURCE})")
  return {g: float(medians[g]) for g in vocab.gene_ids}

def head_from_classifier(path: str, d_model: int, classes: Sequence[str] | None
                     ) -> tuple[dict, dict]:
  """The original's `Classifier` safetensors -> (our head's variables, task.json)."""
  tensors = read_safetensors(Path(path))
  linears = sorted(int(k.split(".")[1]) for k in tensors
                   if k.startswith("layers.") and k.endswith(".weight") and tensors[k].ndim == 2)
  if not linears or any(not k.startswith("layers.") for k in tensors):
    raise DataError(f"{path}: expected the original's Classifier state dict (layers.<i>.weight, "
                    "...); found " + ", ".join(sorted(tensors)[:4]))
  expected = {f"layers.{i}.{p}" for i in linears for p in ("weight", "bias")}
  expected |= {f"layers.{i + 1}.{p}" for i in linears[:-1]
               for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
  if linears != list(range(0, 4 * len(linears), 4)) or set(tensors) - expected:
    raise DataError(f"{path}: not the original Classifier's layout ([Linear, BatchNorm1d, "
                    f"Dropout, LeakyReLU] blocks + Linear); unexpected "
                    f"{sorted(set(tensors) - expected)[:3] or linears}")
  missing = sorted(expected - set(tensors))
  if missing:
    raise DataError(f"{path}: missing tensor {missing[0]!r}")
  f32 = lambda k: np.asarray(tensors[k], np.float32)
  if tensors[f"layers.{linears[0]}.weight"].shape[1] != d_model:
    raise DataError(f"{path}: its input width is {tensors['layers.0.weight'].shape[1]}, the "
                    f"backbone's d_model is {d_model}")
  blocks = {}
  for b, i in enumerate(linears[:-1]):
    blocks[b] = {"linear": {"kernel": f32(f"layers.{i}.weight").T, "bias": f32(f"layers.{i}.bias")},
                 "norm": {"scale": f32(f"layers.{i + 1}.weight"), "bias": f32(f"layers.{i + 1}.bias"),
                          "mean": f32(f"layers.{i + 1}.running_mean"),
                          "var": f32(f"layers.{i + 1}.running_var")}}
  last = linears[-1]
  head = {"blocks": blocks, "out": {"kernel": f32(f"layers.{last}.weight").T,
                                    "bias": f32(f"layers.{last}.bias")}}
  n_classes = head["out"]["bias"].shape[0]
  classes = list(classes) if classes else [str(i) for i in range(n_classes)]
  if len(classes) != n_classes:
    raise DataError(f"--classes: {len(classes)} names for a classifier of {n_classes} classes")
  task = {"label_column": "cell_type", "classes": classes, "pooling": "cls",
          "head_hidden": [blocks[b]["linear"]["bias"].shape[0] for b in blocks],
          "dropout": 0.5, "negative_slope": 0.1, "init_checkpoint": str(path), "num_steps": 0}
  return head, task

def original_tokens(vocab: vocab_lib.Vocab, info: Mapping, tokenize: Mapping) -> list[str]:
  """Our vocabulary in the original's names, id order; unused trailing <cls>/<eos> dropped."""
  names = {vocab_lib.PAD: "[UNK]", vocab_lib.MASK: "[PAD]", vocab_lib.CLS: "[CLS]"}
  names.update({ours: theirs for ours, theirs in info.get("original_tokens", {}).items()})
  tokens = vocab.id_to_token
  unused = {vocab_lib.EOS} | (set() if tokenize.get("cls") else {vocab_lib.CLS})
  while tokens and tokens[-1] in unused:
    tokens = tokens[:-1]
  leftover = [t for t in tokens if vocab_lib.is_special(t) and t not in names]
  if leftover:
    raise DataError(f"vocabulary token {leftover[0]} (id {vocab.token_to_id[leftover[0]]}) has no "
                    "counterpart in the original's tokenizer ([UNK], [PAD], genes, [CLS] last)")
  if vocab_lib.CLS in tokens and tokens[-1] != vocab_lib.CLS:
    raise DataError(f"<cls> has id {vocab.cls_id}; the original's [CLS] is the last id")
  return [names.get(t, t) for t in tokens]


def tokenizer_json(tokens: Sequence[str]) -> dict:
  base = [t for t in tokens if t != "[CLS]"]
  added = [{"id": tokens.index("[CLS]"), "content": "[CLS]", "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}] if "[CLS]" in tokens else []
  return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
          "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
          "decoder": None, "model": {"type": "WordLevel", "unk_token": "[UNK]",
                                     "pad_token": "[PAD]",
                                     "vocab": {t: i for i, t in enumerate(base)}}}

def classifier_tensors(head: Mapping, task: Mapping) -> dict[str, np.ndarray] | None:
  """Our MLP head -> the original `Classifier` state dict; None for a linear probe."""
  blocks = head.get("blocks") or {}
  if not blocks:
    return None
  out, i = {}, 0
  for b in sorted(blocks, key=int):
    block = blocks[b]
    out[f"layers.{i}.weight"] = np.asarray(block["linear"]["kernel"]).T
    out[f"layers.{i}.bias"] = np.asarray(block["linear"]["bias"])
    norm = block["norm"]
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                         ("var", "running_var")):
      out[f"layers.{i + 1}.{theirs}"] = np.asarray(norm[ours])
    out[f"layers.{i + 1}.num_batches_tracked"] = np.asarray(task.get("num_steps", 0), np.int64)
    i += 4
  out[f"layers.{i}.weight"] = np.asarray(head["out"]["kernel"]).T
  out[f"layers.{i}.bias"] = np.asarray(head["out"]["bias"])
  # np.array, not np.ascontiguousarray: that makes the 0-d num_batches_tracked [1], which the
  # original's strict load refuses.
  return {k: np.array(v, np.int64 if v.dtype == np.int64 else np.float32, order="C")
          for k, v in out.items()}


def write_json(path: Path, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)


def installed_version(package: str) -> str | None:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None
