"""The ORIGINAL GeneMamba's checkpoint format, for the oracle of tests/convert/torch_genemamba.py.

The checkpoint directory is what the original's `MambaModel.from_pretrained`
reads: `config.json`, `model.safetensors` (loaded with a strict
`load_state_dict`) and the tokenizer file `gene_tokenizer.json`; a fine-tuned
classifier head is its state dict as safetensors. The vocabulary is
Geneformer's 30M token dictionary behind [UNK] and [PAD].
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from tests.convert.torch_genemamba import (CLS_TOKEN, OriginalClassifier, OriginalMambaModel,
                                           add_cls_row_)


# --- checkpoint format --------------------------------------------------------------


def tokenizer_json(tokens: Sequence[str], *, finetuned_cls: bool = False) -> str:
  """Text of the original's gene_tokenizer.json for `tokens` (in id order).

  A WordLevel tokenizer, 2-space indented, with no trailing newline (as the
  original's file). With finetuned_cls, [CLS] is an added special token with id
  len(tokens), as HuggingFace saves a token added by add_special_tokens.
  """
  tokens = list(tokens)
  if len(set(tokens)) != len(tokens):
    raise ValueError("tokens has duplicates")
  if tokens[:2] != ["[UNK]", "[PAD]"]:
    raise ValueError(f"tokens must start with [UNK], [PAD]; got {tokens[:2]}")
  added = []
  if finetuned_cls:
    if CLS_TOKEN in tokens:
      raise ValueError("[CLS] is already in tokens")
    added.append({"id": len(tokens), "content": CLS_TOKEN, "single_word": False,
                  "lstrip": False, "rstrip": False, "normalized": False, "special": True})
  doc = {
      "version": "1.0",
      "truncation": None,
      "padding": None,
      "added_tokens": added,
      "normalizer": None,
      "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": None,
      "decoder": None,
      "model": {"type": "WordLevel", "unk_token": "[UNK]", "pad_token": "[PAD]",
                "vocab": {t: i for i, t in enumerate(tokens)}},
  }
  return json.dumps(doc, indent=2, ensure_ascii=False)


def save_original_checkpoint(model: OriginalMambaModel, directory: str | Path,
                             tokens: Sequence[str], *, finetuned_cls: bool = False) -> Path:
  """Writes config.json, model.safetensors and gene_tokenizer.json into `directory`.

  Args:
    model: V = len(tokens) embedding rows, or V + 1 with finetuned_cls
      (after add_cls_row_).
    tokens: the vocabulary in id order: "[UNK]", "[PAD]", genes...
    finetuned_cls: a fine-tuned checkpoint: [CLS] (id V) in the tokenizer's
      added_tokens. config.json still says vocab_size V, as the original's does:
      its resize never updates the config.

  Returns:
    The directory.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  tokens = list(tokens)
  rows = model.embeddings.weight.shape[0]
  want = len(tokens) + (1 if finetuned_cls else 0)
  if rows != want or model.lm_head.weight.shape[0] != want:
    raise ValueError(f"model has {rows} embedding rows and {model.lm_head.weight.shape[0]} "
                     f"lm_head rows; {len(tokens)} tokens"
                     f"{' + [CLS]' if finetuned_cls else ''} need {want}")
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  config = {"architectures": ["MambaModel"], "d_model": model.d_model,
            "mamba_layer": model.n_layers, "vocab_size": len(tokens),
            "torch_dtype": "float32", "transformers_version": transformers.__version__}
  # As PretrainedConfig.to_json_string writes it.
  (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  state = {k: v.detach().to(torch.float32).contiguous()
           for k, v in model.state_dict().items()}
  save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
  (directory / "gene_tokenizer.json").write_text(
      tokenizer_json(tokens, finetuned_cls=finetuned_cls), encoding="utf-8")
  return directory


def load_original_checkpoint(directory: str | Path, mode: str = "mean",
                             identity_layers: bool = False,
                             chunk_size: int = 256) -> OriginalMambaModel:
  """Builds the model from config.json and strictly loads model.safetensors.

  As the original's `MambaModel.from_pretrained(dir, config=config)`: the mode
  is not in the checkpoint, so the caller gives it. When gene_tokenizer.json
  lists [CLS] in added_tokens (a fine-tuned checkpoint, whose config.json keeps
  the base vocab_size), the model is resized by one row first, as the
  original's fine-tuning code does before it trains and saves, and the strict
  load then needs exactly vocab_size + 1 rows.
  """
  directory = Path(directory)
  config = json.loads((directory / "config.json").read_text())
  model = OriginalMambaModel(config["vocab_size"], config["d_model"], config["mamba_layer"],
                             mode=mode, identity_layers=identity_layers, chunk_size=chunk_size)
  tok_path = directory / "gene_tokenizer.json"
  if tok_path.exists():
    added = json.loads(tok_path.read_text(encoding="utf-8")).get("added_tokens") or []
    if any(t.get("content") == CLS_TOKEN for t in added):
      add_cls_row_(model, seed=0)  # every row is overwritten by the load below
  state = load_file(str(directory / "model.safetensors"))
  model.load_state_dict(state, strict=True)
  return model


def save_classifier(classifier: OriginalClassifier, path: str | Path) -> Path:
  """Writes the classifier's state dict (BatchNorm buffers included) as safetensors."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  save_file({k: v.detach().contiguous() for k, v in classifier.state_dict().items()},
            str(path), metadata={"format": "pt"})
  return path


def load_classifier(path: str | Path, input_features: int, output_features: int,
                    hidden_features: int, num_layers: int = 3) -> OriginalClassifier:
  """A classifier of the given shape with the safetensors state dict strictly loaded."""
  classifier = OriginalClassifier(input_features, output_features, hidden_features, num_layers)
  classifier.load_state_dict(load_file(str(path)), strict=True)
  return classifier


# --- vocabulary -----------------------------------------------------------------------


@lru_cache(maxsize=None)
def _geneformer_tokens(token_dictionary: str) -> tuple[str, ...]:
  from genemamba_jax.data.safe_pickle import load_pickle  # pylint: disable=g-import-not-at-top
  vocab = load_pickle(token_dictionary)
  by_id = {int(i): t for t, i in vocab.items()}
  n = max(by_id) + 1
  if sorted(by_id) != list(range(n)) or len(by_id) != len(vocab):
    raise ValueError(f"{token_dictionary}: ids are not 0..{n - 1}, each once")
  genes = [by_id[i] for i in range(2, n)]
  if not all(g.startswith("ENSG") for g in genes):
    raise ValueError(f"{token_dictionary}: ids >= 2 are not all Ensembl gene ids")
  return ("[UNK]", "[PAD]", *genes)


def geneformer_tokens(shared_data: str | Path | None = None) -> list[str]:
  """The original GeneMamba vocabulary in id order (25,426 tokens).

  "[UNK]" (0), "[PAD]" (1), then the Ensembl ids with Geneformer's 30M token
  dictionary ids 2..25425 (its own 0 and 1 are <pad> and <mask>).

  Args:
    shared_data: the shared data folder; by default tests/conftest.py's helper,
      which skips the calling test when the data is missing.
  """
  if shared_data is None:
    from tests.conftest import _require_shared_data  # pylint: disable=g-import-not-at-top
    shared_data = _require_shared_data()
  path = Path(shared_data) / "geneformer_30m" / "token_dictionary.pkl"
  return list(_geneformer_tokens(str(path)))
