"""Gene rank reconstruction metrics (paper section 4.3, appendix B.3).

Pure functions on token sequences: the input sentence S_in (gene token ids
ranked by expression, the reference) and the model's output S_out (the
hypothesis). No model code lives here; the model-side driver produces S_out
and calls `sequence_metrics` / `summarize`.

Sequences are 1-D arrays (or lists) of hashable tokens, normally integer ids.
Padding should be stripped by the caller: a pad token would count as a gene.
"""

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats
from nltk.translate.bleu_score import modified_precision, sentence_bleu
from rapidfuzz.distance import Levenshtein

# BLEU orders reported per cell, as in the original (1- to 4-gram).
_BLEU_ORDERS = (1, 2, 3, 4)
COLUMNS = ("l_dist", "nl_dist", *(f"bleu{n}" for n in _BLEU_ORDERS), "spearman",
           "exact_match", "length")


def _tokens(seq, name: str, allow_empty: bool = True) -> list:
  """Returns `seq` as a list of Python scalars.

  Python scalars (not numpy ones) because rapidfuzz and nltk hash elements,
  and a list keeps a str from being split into characters by rapidfuzz.
  """
  arr = np.asarray(seq)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be a 1-D token sequence, got shape {arr.shape}")
  if not allow_empty and arr.size == 0:
    raise ValueError(f"{name} is empty; a reference needs at least one token")
  return arr.tolist()


def levenshtein(reference, hypothesis) -> int:
  """Token-level edit distance (insertions, deletions, substitutions; cost 1).

  Args:
    reference: (L_in,) tokens of S_in; must not be empty.
    hypothesis: (L_out,) tokens of S_out.

  Returns:
    LD(S_in, S_out), an int in [0, max(L_in, L_out)].
  """
  ref = _tokens(reference, "reference", allow_empty=False)
  hyp = _tokens(hypothesis, "hypothesis")
  # rapidfuzz compares lists element-wise by hash: tokens, not characters.
  return int(Levenshtein.distance(ref, hyp))


def normalized_levenshtein(reference, hypothesis) -> float:
  """Normalized edit distance LD / max(L_in, L_out): 0 if identical, 1 if nothing matches.

  A distance, as its name (`nl_dist`) says: lower is better. The paper's "NLD" column
  is the similarity 1 - nl_dist (higher is better).

  Args:
    reference: (L_in,) tokens; must not be empty (so the max is > 0).
    hypothesis: (L_out,) tokens.
  """
  ld = levenshtein(reference, hypothesis)
  return ld / max(len(reference), len(hypothesis))


def _bleu_many(reference, hypothesis, orders: Sequence[int]) -> list[float]:
  """Cumulative BLEU-n for each n in `orders`, from one nltk call; exactly 0 without a match.

  Unsmoothed BLEU is a geometric mean of the n-gram precisions, so it is 0 when one of
  them is 0. nltk instead puts sys.float_info.min in place of a zero precision and
  returns values like 1e-104, which read as a bug; those are set to 0 here.
  """
  ref = _tokens(reference, "reference", allow_empty=False)
  hyp = _tokens(hypothesis, "hypothesis")
  weights = [(1.0 / n,) * n for n in orders]
  with warnings.catch_warnings():
    # Unsmoothed nltk warns on every zero n-gram precision: noise per cell.
    warnings.simplefilter("ignore", UserWarning)
    scores = sentence_bleu([ref], hyp, weights=weights)
  # The first order k with no clipped k-gram match: every BLEU-n with n >= k is 0.
  no_match = next((k for k in range(1, max(orders) + 1)
                   if modified_precision([ref], hyp, k).numerator == 0), None)
  # nltk returns a bare float (not a list) when given a single weight tuple.
  return [0.0 if no_match is not None and n >= no_match else float(score)
          for n, score in zip(orders, np.atleast_1d(scores))]


def bleu(reference, hypothesis, max_n: int = 4) -> float:
  """Sentence BLEU of S_out against S_in, as the original computes it.

  nltk `sentence_bleu` with uniform weights 1/max_n over 1..max_n-grams,
  clipped n-gram precisions p_n, brevity penalty BP = exp(1 - L_in / L_out)
  when L_out < L_in (else 1), and NO smoothing (as the paper and the
  original). A hypothesis with no matching n-gram of some order k <= max_n
  therefore scores exactly 0 (nltk alone would give ~1e-77 or less there, as
  it replaces a zero p_k by sys.float_info.min); so does an empty hypothesis.

  Args:
    reference: (L_in,) tokens (ints or strings); must not be empty.
    hypothesis: (L_out,) tokens.
    max_n: highest n-gram order.

  Returns:
    BLEU in [0, 1].
  """
  if max_n < 1:
    raise ValueError(f"max_n must be >= 1, got {max_n}")
  return _bleu_many(reference, hypothesis, [max_n])[0]


def bleu_n(reference, hypothesis) -> dict[str, float]:
  """Cumulative BLEU-1..4 (weights 1/n over orders 1..n), keys bleu1..bleu4."""
  scores = _bleu_many(reference, hypothesis, _BLEU_ORDERS)
  return {f"bleu{n}": s for n, s in zip(_BLEU_ORDERS, scores)}


def rank_spearman(reference, hypothesis) -> float:
  """Spearman correlation between input and output ranks of the input genes.

  For each position i of the reference (gene g = reference[i]) the input rank
  is i; the output rank is the position of the FIRST occurrence of g in the
  hypothesis. Reference genes absent from the hypothesis all get rank
  L_out = len(hypothesis) (tied, after every present gene): the paper's
  "missing tokens filled", so every input gene has a rank. The result is
  scipy.stats.spearmanr of the two rank vectors (average ranks for ties).

  Args:
    reference: (L_in,) tokens; must not be empty.
    hypothesis: (L_out,) tokens.

  Returns:
    rho in [-1, 1], or nan when it is undefined: a one-token reference, or
    all output ranks equal (e.g. no reference gene in the hypothesis).
  """
  ref = _tokens(reference, "reference", allow_empty=False)
  hyp = _tokens(hypothesis, "hypothesis")
  first: dict = {}
  for pos, token in enumerate(hyp):
    first.setdefault(token, pos)
  out_rank = np.array([first.get(token, len(hyp)) for token in ref])
  # Checked here rather than left to scipy, which warns and returns nan.
  if len(ref) < 2 or np.all(out_rank == out_rank[0]):
    return math.nan
  return float(scipy.stats.spearmanr(np.arange(len(ref)), out_rank).statistic)


def exact_match(reference, hypothesis) -> float:
  """EM: 1.0 if S_out equals S_in token for token (same length), else 0.0."""
  ref = _tokens(reference, "reference", allow_empty=False)
  return float(ref == _tokens(hypothesis, "hypothesis"))


def sequence_metrics(references: Sequence[np.ndarray],
                     hypotheses: Sequence[np.ndarray]) -> pd.DataFrame:
  """All metrics for each cell.

  Args:
    references: N sequences, each (L_in_i,) tokens of a cell's S_in.
    hypotheses: N sequences, each (L_out_i,) tokens of the matching S_out.

  Returns:
    DataFrame with N rows and columns l_dist (int), nl_dist (l_dist / max(L_in,
    L_out), a distance in [0, 1]: lower is better), bleu1..bleu4, spearman (may be
    nan, see `rank_spearman`), exact_match, length (L_in_i).

  Raises:
    ValueError: the lists differ in length, or a reference is empty (the
      message gives the cell index).
  """
  if len(references) != len(hypotheses):
    raise ValueError(f"{len(references)} references but {len(hypotheses)} "
                     "hypotheses; pass one hypothesis per reference")
  rows = []
  for i, (ref, hyp) in enumerate(zip(references, hypotheses)):
    try:
      ld = levenshtein(ref, hyp)
      rows.append({
          "l_dist": ld,
          "nl_dist": ld / max(len(ref), len(hyp)),
          **bleu_n(ref, hyp),
          "spearman": rank_spearman(ref, hyp),
          "exact_match": exact_match(ref, hyp),
          "length": len(ref),
      })
    except ValueError as e:
      raise ValueError(f"cell {i}: {e}") from None
  return pd.DataFrame(rows, columns=list(COLUMNS))


def summarize(per_cell: pd.DataFrame) -> dict[str, float]:
  """Averages over cells.

  Args:
    per_cell: output of `sequence_metrics` (N >= 1 rows).

  Returns:
    {"cells": N, "<column>": mean for every column, "l_dist_median": median
    of l_dist, "spearman_undefined": number of nan spearman cells}. The
    spearman mean skips nan cells (nan if all are nan).
  """
  if len(per_cell) == 0:
    raise ValueError("per_cell has no rows; nothing to summarize")
  missing = [c for c in COLUMNS if c not in per_cell.columns]
  if missing:
    raise ValueError(f"per_cell lacks columns {missing}; pass sequence_metrics output")
  out = {"cells": float(len(per_cell))}
  for col in COLUMNS:
    values = per_cell[col].astype(float)
    out[col] = float(values.mean()) if values.notna().any() else math.nan
  out["l_dist_median"] = float(per_cell["l_dist"].median())
  out["spearman_undefined"] = float(per_cell["spearman"].isna().sum())
  return out
