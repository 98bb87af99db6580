"""The gene-token vocabulary and the vocabulary directory format.

A vocabulary directory holds:

* `vocab.json`: token -> id, special tokens included.
* `medians.json`: gene id -> non-zero median of its expression, used to
  normalize expression before ranking genes (Geneformer's scheme).
* `vocab_info.json`: how the vocabulary was built, e.g. `{"source":
  "geneformer", "median_space": "normalized"}` ("normalized" = counts / cell
  total * 10,000; "log1p" = log1p of that).
* `digests.json` (optional): written by another module; ignored here.
"""

import collections
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from genemamba_jax.files import atomic_paths
from genemamba_jax.data import genes
from genemamba_jax import files
from genemamba_jax.data import safe_pickle
from genemamba_jax.errors import DataError

PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"
SPECIAL_TOKENS = (PAD, MASK, CLS, EOS)

VOCAB_FILE = "vocab.json"
MEDIANS_FILE = "medians.json"
INFO_FILE = "vocab_info.json"

_log = logging.getLogger(__name__)


def is_special(token: str) -> bool:
  """Any `<...>` token is special, so extra specials never need a median."""
  return token.startswith("<") and token.endswith(">")


def _few(items: Iterable[Any], n: int = 5) -> str:
  items = list(items)
  more = f" and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(repr(x) for x in items[:n]) + more


class Vocab:
  """token -> id. Ids: <pad>=0, <mask>=1 always.

  Ids are contiguous from 0. Vocabularies built here (`from_genes`,
  `from_geneformer`) hold <cls> and <eos> (their ids depend on how the
  vocabulary was built); one converted from the original GeneMamba may lack
  them, and then `cls_id` / `eos_id` are None. Gene tokens are every token
  that is not `<...>`.
  """

  def __init__(self, token_to_id: Mapping[str, int], source: str = "vocab"):
    """Validates and copies `token_to_id`; `source` names it in errors."""
    self.token_to_id: dict[str, int] = {}
    for token, idx in token_to_id.items():
      if not isinstance(token, str) or not token:
        raise DataError(f"{source}: token {token!r} is not a non-empty string")
      if isinstance(idx, (bool, np.bool_)) or not isinstance(
          idx, (int, np.integer)):
        raise DataError(f"{source}: id of token {token!r} is {idx!r}, not an "
                        "integer")
      self.token_to_id[token] = int(idx)
    # Order by id so iteration, JSON files and id_to_token agree.
    self.token_to_id = dict(sorted(self.token_to_id.items(),
                                   key=lambda kv: kv[1]))
    ids = list(self.token_to_id.values())
    dupes = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if dupes:
      shared = [t for t, i in self.token_to_id.items() if i in set(dupes)]
      raise DataError(f"{source}: ids must be unique, but tokens {_few(shared)}"
                      f" share ids {_few(dupes)}")
    if ids and ids[0] < 0:
      raise DataError(f"{source}: ids must be >= 0, found {ids[0]}")
    if ids != list(range(len(ids))):
      missing = sorted(set(range(ids[-1] + 1)) - set(ids))
      raise DataError(f"{source}: ids must be contiguous from 0, but ids "
                      f"{_few(missing)} are missing; renumber the tokens")
    for token, want in ((PAD, 0), (MASK, 1)):
      if self.token_to_id.get(token) != want:
        raise DataError(f"{source}: {token} must have id {want}, found "
                        f"{self.token_to_id.get(token)}")
    self._id_to_token = list(self.token_to_id)
    self._gene_to_id = {t: i for t, i in self.token_to_id.items()
                        if not is_special(t)}

  @property
  def pad_id(self) -> int:
    return self.token_to_id[PAD]

  @property
  def mask_id(self) -> int:
    return self.token_to_id[MASK]

  @property
  def cls_id(self) -> int | None:
    return self.token_to_id.get(CLS)

  @property
  def eos_id(self) -> int | None:
    return self.token_to_id.get(EOS)

  @property
  def special_ids(self) -> list[int]:
    """Ids of every special (`<...>`) token: never genes, never in gene statistics."""
    return [i for t, i in self.token_to_id.items() if is_special(t)]

  @property
  def gene_ids(self) -> list[str]:
    """Gene (non-special) tokens in id order."""
    return list(self._gene_to_id)

  @property
  def id_to_token(self) -> list[str]:
    """Token of each id; `id_to_token[i]` is the token with id i."""
    return list(self._id_to_token)

  def __len__(self) -> int:
    return len(self._id_to_token)

  def __contains__(self, token: object) -> bool:
    return token in self.token_to_id

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Vocab) and self.token_to_id == other.token_to_id

  def __repr__(self) -> str:
    return f"Vocab({len(self)} tokens, {len(self._gene_to_id)} genes)"

  def gene_token_ids(self, gene_ids: Sequence[str]) -> np.ndarray:
    """Token ids of `gene_ids` (int32), -1 where a gene is not in the vocab.

    Special tokens are not genes, so `"<pad>"` in `gene_ids` also maps to -1.
    """
    get = self._gene_to_id.get
    return np.fromiter((get(g, -1) for g in gene_ids), dtype=np.int32,
                       count=len(gene_ids))

  @classmethod
  def from_genes(cls, gene_ids: Iterable[str]) -> "Vocab":
    """Builds a vocabulary from data.

    Ids: <pad>=0, <mask>=1, <cls>=2, <eos>=3, then the distinct genes sorted,
    from 4; sorting makes the ids independent of the order genes were seen.
    """
    genes = set()
    for g in gene_ids:
      if not isinstance(g, str) or not g or is_special(g):
        raise DataError(f"gene id {g!r} is not a usable gene name: gene ids "
                        "must be non-empty strings not of the form <...>")
      genes.add(g)
    if not genes:
      raise DataError("cannot build a vocabulary from an empty list of genes")
    tokens = list(SPECIAL_TOKENS) + sorted(genes)
    return cls({t: i for i, t in enumerate(tokens)}, source="from_genes")

  @classmethod
  def from_geneformer(cls, token_dictionary: Mapping[str, int]) -> "Vocab":
    """Keeps Geneformer's ids and appends <cls>/<eos> when absent.

    Geneformer's 30M dictionary has <pad>=0, <mask>=1 and genes 2..N-1 (N =
    25,426). The released GeneMamba model uses exactly that dictionary (vocab
    size 25,426) and its annotation script adds CLS as id 25,426, so we append
    <cls>=N then <eos>=N+1; gene ids stay unchanged, which keeps pretrained
    embedding rows aligned. Newer Geneformer dictionaries already hold <cls>
    and <eos>; their ids are kept.
    """
    if not isinstance(token_dictionary, Mapping):
      raise DataError("Geneformer token dictionary: expected a dict of token "
                      f"-> id, got {type(token_dictionary).__name__}")
    tokens = dict(token_dictionary)
    next_id = max(tokens.values(), default=-1) + 1
    for token in (CLS, EOS):
      if token not in tokens:
        tokens[token] = next_id
        next_id += 1
    return cls(tokens, source="Geneformer token dictionary")


def _check_medians(vocab: Vocab, medians: Mapping[str, Any],
                   source: str) -> dict[str, float]:
  """Returns the medians of the vocab's genes, in vocab order, as floats."""
  genes = vocab.gene_ids
  missing = [g for g in genes if g not in medians]
  if missing:
    raise DataError(f"{source}: {len(missing)} of {len(genes)} gene tokens "
                    f"have no median, e.g. {_few(missing)}; every gene token "
                    "needs one")
  out = {}
  for g in genes:
    m = medians[g]
    ok = isinstance(m, (int, float, np.number)) and not isinstance(m, bool)
    if not ok or not np.isfinite(m) or m <= 0:
      raise DataError(f"{source}: median of {g} is {m!r}; medians must be "
                      "finite numbers > 0")
    out[g] = float(m)
  return out


def save_vocab_dir(out_dir: str | Path, vocab: Vocab,
                   medians: Mapping[str, float],
                   extra_info: Mapping[str, Any] | None = None,
                   extra_files: Mapping[str, Callable[[Path], None]] | None = None) -> None:
  """Writes `vocab`, the medians of its genes and `extra_info` to `out_dir`.

  Medians of genes not in `vocab` are not written. The files are replaced
  together (atomic.atomic_paths): a failed, interrupted or out-of-space write
  leaves the directory's old files, never a new vocab.json beside old medians
  (and a missing `out_dir` is created, or not left behind). `extra_files`
  ({file name: writer(path)}, e.g. the digests of `prepare medians`) are
  written in the same group.

  Raises:
    DataError: a gene token has no median, or a median is not finite and > 0.
  """
  out_dir = Path(out_dir)
  checked = _check_medians(vocab, medians, f"medians for {out_dir}")
  writers = {VOCAB_FILE: lambda path: files.write_json(path, vocab.token_to_id),
             MEDIANS_FILE: lambda path: files.write_json(path, checked),
             INFO_FILE: lambda path: files.write_json(path, dict(extra_info or {})),
             **(extra_files or {})}
  with atomic_paths([out_dir / name for name in writers], fsync=True) as temps:
    for write, tmp in zip(writers.values(), temps):
      write(tmp)


def load_vocab_dir(
    vocab_dir: str | Path) -> tuple[Vocab, dict[str, float], dict]:
  """Reads a vocabulary directory written by `save_vocab_dir`.

  Returns:
    (vocab, medians of its genes, info); info is {} without vocab_info.json.

  Raises:
    DataError: a file is missing or malformed, or a gene has no median.
  """
  vocab_dir = Path(vocab_dir)
  hint = ("re-create the vocabulary directory (e.g. import Geneformer's "
          "dictionaries with `python -m genemamba_jax.prepare import-geneformer`)")
  if not vocab_dir.is_dir():
    raise DataError(f"{vocab_dir}: vocabulary directory not found; {hint}")

  def read_object(name: str, what: str) -> dict:
    obj = files.read_json(vocab_dir / name, hint)
    if not isinstance(obj, dict):
      raise DataError(f"{vocab_dir / name}: expected a JSON object of {what}; "
                      f"{hint}")
    return obj

  vocab = Vocab(read_object(VOCAB_FILE, "token -> id"),
                source=str(vocab_dir / VOCAB_FILE))
  medians = _check_medians(vocab, read_object(MEDIANS_FILE, "gene -> median"),
                           str(vocab_dir / MEDIANS_FILE))
  info = {}
  if (vocab_dir / INFO_FILE).exists():
    info = read_object(INFO_FILE, "build information")
  return vocab, medians, info


def import_geneformer(token_dictionary_pkl: str | Path,
                      median_dictionary_pkl: str | Path,
                      out_dir: str | Path) -> tuple[Vocab, dict[str, float]]:
  """Converts Geneformer's token and median pickles into a vocab directory.

  Only genes present in both pickles are kept. Tokens without a median would
  leave holes in Geneformer's ids, so the remaining tokens are then renumbered
  in their original order and info records `geneformer_ids_preserved: false`
  (pretrained GeneMamba embeddings no longer line up). The real 30M files
  match exactly: 25,424 genes, nothing dropped, ids preserved.

  Returns:
    (vocab, medians of its genes).
  """
  tokens = safe_pickle.load_pickle(token_dictionary_pkl, genes.GENEFORMER_SOURCE)
  medians = safe_pickle.load_pickle(median_dictionary_pkl, genes.GENEFORMER_SOURCE)
  for path, obj, what in ((token_dictionary_pkl, tokens, "token -> id"),
                          (median_dictionary_pkl, medians, "gene -> median")):
    if not isinstance(obj, dict) or not obj:
      raise DataError(f"{path}: expected a non-empty dict of {what}, got "
                      f"{type(obj).__name__}; is this the right file?")
  no_median = [t for t in tokens
               if isinstance(t, str) and not is_special(t) and t not in medians]
  no_token = [g for g in medians if g not in tokens]
  if no_median:
    _log.warning("%s: dropping %d tokens without a median in %s (e.g. %s); "
                 "ids are renumbered", token_dictionary_pkl, len(no_median),
                 median_dictionary_pkl, _few(no_median))
    dropped = set(no_median)
    kept = [t for t in sorted(tokens, key=lambda t: tokens[t])
            if t not in dropped]
    tokens = {t: i for i, t in enumerate(kept)}
  if no_token:
    _log.info("%s: dropping %d medians of genes not in %s",
              median_dictionary_pkl, len(no_token), token_dictionary_pkl)
  vocab = Vocab.from_geneformer(tokens)
  info = {"source": "geneformer", "median_space": "normalized",
          "token_dictionary": str(token_dictionary_pkl),
          "median_dictionary": str(median_dictionary_pkl),
          "dropped_tokens_without_median": len(no_median),
          "dropped_medians_without_token": len(no_token),
          "geneformer_ids_preserved": not no_median}
  medians = _check_medians(vocab, medians, str(median_dictionary_pkl))
  save_vocab_dir(out_dir, vocab, medians, info)
  _log.info("wrote %s: %d tokens, %d genes", out_dir, len(vocab),
            len(vocab.gene_ids))
  return vocab, medians
