"""Gene rank reconstruction metrics: hand-checked values and independent oracles."""

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from genemamba_jax.evaluate import reconstruction_metrics as rm


def test_swap_of_last_two_tokens():
  ref, hyp = np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 5, 4])
  # Two substitutions (positions 4 and 5); nl_dist = 2/5 (the paper's NLD 1 - 2/5).
  assert rm.levenshtein(ref, hyp) == 2
  assert rm.normalized_levenshtein(ref, hyp) == pytest.approx(0.4)
  # Clipped n-gram precisions, c = r = 5 so BP = 1:
  #   p1 = 5/5 (every token occurs in ref)
  #   p2 = 2/4 ((1,2), (2,3) match; (3,5), (5,4) do not)
  #   p3 = 1/3 ((1,2,3) matches; (2,3,5), (3,5,4) do not)
  #   p4 = 0/2: no 4-gram matches
  # BLEU1 = 1, BLEU2 = (1 * 1/2)^(1/2) = 0.70711,
  # BLEU3 = (1 * 1/2 * 1/3)^(1/3) = (1/6)^(1/3) = 0.55032, BLEU4 = 0 exactly.
  scores = rm.bleu_n(ref, hyp)
  assert scores["bleu1"] == pytest.approx(1.0)
  assert scores["bleu2"] == pytest.approx(math.sqrt(0.5))
  assert scores["bleu2"] == pytest.approx(0.70711, abs=1e-5)
  assert scores["bleu3"] == pytest.approx((1 / 6) ** (1 / 3))
  assert scores["bleu3"] == pytest.approx(0.55032, abs=1e-5)
  # Unsmoothed BLEU is a geometric mean with a zero factor: 0, not nltk's ~7.8e-78
  # (it puts sys.float_info.min in for a zero precision), which reads as a bug.
  assert scores["bleu4"] == 0.0
  assert rm.bleu(ref, hyp) == scores["bleu4"]
  assert rm.bleu(ref, hyp, max_n=3) == pytest.approx(scores["bleu3"])
  # Output ranks [0, 1, 2, 4, 3]; sum d^2 = 2; rho = 1 - 6*2 / (5 * 24) = 0.9.
  assert rm.rank_spearman(ref, hyp) == pytest.approx(0.9)
  assert rm.exact_match(ref, hyp) == 0.0


def test_short_hypothesis_brevity_penalty():
  ref, hyp = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4]
  # Every n-gram of hyp is in ref: p1 = 4/4, p2 = 3/3, p3 = 2/2, p4 = 1/1.
  # c = 4 < r = 6: BP = exp(1 - 6/4) = exp(-0.5) = 0.60653 for every order.
  for value in rm.bleu_n(ref, hyp).values():
    assert value == pytest.approx(math.exp(-0.5))
    assert value == pytest.approx(0.60653, abs=1e-5)
  # Two deletions; nl_dist = 2/6.
  assert rm.levenshtein(ref, hyp) == 2
  assert rm.normalized_levenshtein(ref, hyp) == pytest.approx(1 / 3)
  # Output ranks [0,1,2,3,4,4] (5, 6 missing -> len(hyp) = 4, tied).
  # Average ranks x = 1..6, y = [1,2,3,4,5.5,5.5]; centred:
  # dx = [-2.5,-1.5,-.5,.5,1.5,2.5], dy = [-2.5,-1.5,-.5,.5,2,2];
  # sum dx*dy = 17, sum dx^2 = 17.5, sum dy^2 = 17 -> rho = sqrt(17/17.5).
  assert rm.rank_spearman(ref, hyp) == pytest.approx(math.sqrt(17 / 17.5))
  assert rm.rank_spearman(ref, hyp) == pytest.approx(0.985611, abs=1e-6)


def test_long_hypothesis_has_no_penalty():
  ref, hyp = [1, 2, 3], [1, 2, 3, 4]
  # c = 4 > r = 3: BP = 1; p1 = 3/4, p2 = 2/3, p3 = 1/2;
  # BLEU3 = (3/4 * 2/3 * 1/2)^(1/3) = (1/4)^(1/3) = 0.62996.
  assert rm.bleu(ref, hyp, max_n=3) == pytest.approx(0.25 ** (1 / 3))
  assert rm.bleu(ref, hyp, max_n=1) == pytest.approx(0.75)
  assert rm.levenshtein(ref, hyp) == 1
  assert rm.normalized_levenshtein(ref, hyp) == pytest.approx(0.25)
  assert rm.exact_match(ref, hyp) == 0.0  # a prefix is not a match


def test_missing_and_repeated_genes():
  ref, hyp = [10, 20, 30, 40], [10, 20, 20, 40]
  # 30 missing -> rank len(hyp) = 4: ranks [0,1,4,3] vs [0,1,2,3]; their
  # ranks [1,2,4,3] vs [1,2,3,4]: sum d^2 = 2, rho = 1 - 12/60 = 0.8.
  assert rm.rank_spearman(ref, hyp) == pytest.approx(0.8)
  # Unigram 20 is clipped to its one occurrence in ref: p1 = 3/4;
  # bigrams (10,20) match, (20,20), (20,40) do not: p2 = 1/3;
  # BLEU2 = (3/4 * 1/3)^(1/2) = 0.5.
  assert rm.bleu(ref, hyp, max_n=1) == pytest.approx(0.75)
  assert rm.bleu(ref, hyp, max_n=2) == pytest.approx(0.5)
  assert rm.levenshtein(ref, hyp) == 1
  # Two of five missing: y = [0,1,5,5,5] -> ranks [1,2,4,4,4]; dx = [-2..2],
  # dy = [-2,-1,1,1,1]; sum dx*dy = 8, dx^2 = 10, dy^2 = 8 -> 8/sqrt(80).
  assert rm.rank_spearman([1, 2, 3, 4, 5], [1, 2, 7, 7, 7]) == pytest.approx(2 / math.sqrt(5))
  # Clipping: [1,1,1] vs [1,2,3]: p1 = 1/3 (1 counted once); 2 substitutions;
  # ranks y = [0,3,3] -> [1,2.5,2.5], dy = [-1,.5,.5], dx = [-1,0,1]:
  # sum dx*dy = 1.5, dx^2 = 2, dy^2 = 1.5 -> 1.5 / sqrt(3) = 0.86603.
  assert rm.bleu([1, 2, 3], [1, 1, 1], max_n=1) == pytest.approx(1 / 3)
  assert rm.levenshtein([1, 2, 3], [1, 1, 1]) == 2
  assert rm.rank_spearman([1, 2, 3], [1, 1, 1]) == pytest.approx(1.5 / math.sqrt(3))


def test_identical_and_reversed():
  seq = np.arange(100, 108)
  assert rm.levenshtein(seq, seq) == 0
  assert rm.normalized_levenshtein(seq, seq) == 0.0  # a distance: 0 when identical
  assert rm.bleu_n(seq, seq) == {"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0}
  assert rm.rank_spearman(seq, seq) == pytest.approx(1.0)
  assert rm.exact_match(seq, seq) == 1.0
  rev = seq[::-1]
  assert rm.rank_spearman(seq, rev) == pytest.approx(-1.0)
  assert rm.exact_match(seq, rev) == 0.0
  assert rm.levenshtein(seq, rev) == 8  # no position keeps its token (even length)


def test_undefined_and_degenerate_cases():
  assert math.isnan(rm.rank_spearman([7], [7]))  # one gene: no correlation
  assert math.isnan(rm.rank_spearman([1, 2, 3], [8, 9]))  # all missing: constant
  assert math.isnan(rm.rank_spearman([1, 2, 3], []))
  assert rm.bleu_n([1, 2, 3], []) == {f"bleu{n}": 0.0 for n in range(1, 5)}
  assert rm.bleu([1, 2, 3], [8, 9]) == 0.0  # no unigram match: exactly 0
  assert rm.levenshtein([1, 2, 3], []) == 3
  assert rm.normalized_levenshtein([1, 2, 3], []) == 1.0  # nothing matches: the largest


def test_string_tokens_match_int_tokens():
  ints, hyp = [3, 1, 4, 1, 5, 9, 2, 6], [3, 1, 4, 5, 9, 2, 6, 6]
  names = {i: f"GENE{i}" for i in range(10)}
  s_ref, s_hyp = np.array([names[i] for i in ints]), np.array([names[i] for i in hyp])
  assert rm.levenshtein(s_ref, s_hyp) == rm.levenshtein(ints, hyp)
  assert rm.bleu_n(s_ref, s_hyp) == rm.bleu_n(ints, hyp)
  assert rm.rank_spearman(s_ref, s_hyp) == rm.rank_spearman(ints, hyp)


def test_errors():
  with pytest.raises(ValueError, match="reference is empty"):
    rm.levenshtein([], [1])
  for fn in (rm.bleu, rm.rank_spearman, rm.exact_match, rm.normalized_levenshtein):
    with pytest.raises(ValueError, match="reference"):
      fn(np.array([], dtype=int), [1, 2])
  with pytest.raises(ValueError, match="1-D"):
    rm.bleu(np.ones((2, 3), int), [1])
  with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
    rm.sequence_metrics([[1], [2]], [[1]])
  with pytest.raises(ValueError, match="cell 1: reference is empty"):
    rm.sequence_metrics([[1], []], [[1], [1]])
  with pytest.raises(ValueError, match="no rows"):
    rm.summarize(rm.sequence_metrics([], []))


def _dp_levenshtein(a, b) -> int:
  """Textbook O(len(a) * len(b)) dynamic programme, the paper's recurrence."""
  prev = list(range(len(b) + 1))
  for i, x in enumerate(a, start=1):
    cur = [i]
    for j, y in enumerate(b, start=1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
    prev = cur
  return prev[-1]


def _direct_bleu(ref, hyp, max_n) -> float:
  """BLEU from the formula: exp(sum_n log(p_n) / N) * BP, 0 if a p_n is 0."""
  if not hyp:
    return 0.0
  log_sum = 0.0
  for n in range(1, max_n + 1):
    h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
    r = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    matched = sum(min(c, r[g]) for g, c in h.items())
    if matched == 0:
      return 0.0
    log_sum += math.log(matched / sum(h.values())) / max_n
  bp = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
  return bp * math.exp(log_sum)


def test_levenshtein_and_bleu_against_oracles():
  rng = np.random.default_rng(0)
  nonzero = 0
  for _ in range(300):
    # Large ids (like a 60k vocabulary) from a small alphabet, so n-grams repeat.
    ref = (50_000 + rng.integers(0, 4, rng.integers(1, 14))).tolist()
    hyp = (50_000 + rng.integers(0, 4, rng.integers(0, 14))).tolist()
    assert rm.levenshtein(np.array(ref), np.array(hyp)) == _dp_levenshtein(ref, hyp)
    for n, got in zip(range(1, 5), rm.bleu_n(ref, hyp).values()):
      want = _direct_bleu(ref, hyp, n)
      assert got == pytest.approx(want, rel=1e-9)
      assert (got == 0.0) == (want == 0.0)  # a missing n-gram order gives exactly 0
      nonzero += want > 0
  assert nonzero > 300  # the comparison is not only zeros


def test_sequence_metrics_and_summarize():
  refs = [np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 4, 5]), np.array([9])]
  hyps = [np.array([1, 2, 3, 5, 4]), np.array([5, 4, 3, 2, 1]), np.array([9])]
  table = rm.sequence_metrics(refs, hyps)
  assert list(table.columns) == list(rm.COLUMNS)
  assert table["l_dist"].tolist() == [2, 4, 0]
  assert table["length"].tolist() == [5, 5, 1]
  assert table["exact_match"].tolist() == [0.0, 0.0, 1.0]
  for i, (ref, hyp) in enumerate(zip(refs, hyps)):
    for key, value in rm.bleu_n(ref, hyp).items():
      assert table.loc[i, key] == value
  assert table["spearman"].iloc[:2].tolist() == pytest.approx([0.9, -1.0])
  assert math.isnan(table.loc[2, "spearman"])  # one-gene cell
  summary = rm.summarize(table)
  assert summary["cells"] == 3
  assert summary["l_dist"] == pytest.approx(2.0)  # (2 + 4 + 0) / 3
  assert summary["l_dist_median"] == 2.0
  # nl_dist = l_dist / max length: 2/5, 4/5, 0/1 -> (0.4 + 0.8 + 0) / 3 = 0.4.
  assert summary["nl_dist"] == pytest.approx(0.4)
  assert summary["spearman"] == pytest.approx(-0.05)  # nan cell skipped
  assert summary["spearman_undefined"] == 1
  assert summary["exact_match"] == pytest.approx(1 / 3)
  assert summary["bleu1"] == pytest.approx(1.0)
  assert set(rm.COLUMNS) <= set(summary)
  assert all(isinstance(v, float) for v in summary.values())


def test_summarize_all_spearman_undefined():
  table = rm.sequence_metrics([[1], [2]], [[1], [3]])
  summary = rm.summarize(table)
  assert math.isnan(summary["spearman"]) and summary["spearman_undefined"] == 2
  assert summary["exact_match"] == 0.5


def test_summarize_needs_the_metric_columns():
  with pytest.raises(ValueError, match="lacks columns"):
    rm.summarize(pd.DataFrame({"l_dist": [1]}))


def test_bleu_without_a_matching_4gram_is_exactly_zero():
  # Every token and bigram matches, no trigram or 4-gram does: BLEU-3 and BLEU-4 are
  # 0, and exactly so (a printed 1.3e-104 looks like a bug to a reader).
  ref, hyp = [1, 2, 3, 4, 5, 6], [1, 2, 5, 6, 3, 4]
  scores = rm.bleu_n(ref, hyp)
  assert scores["bleu1"] == pytest.approx(1.0)
  assert scores["bleu2"] == pytest.approx((1 * 3 / 5) ** 0.5)
  assert scores["bleu3"] == 0.0 and scores["bleu4"] == 0.0
  assert rm.bleu(ref, hyp) == 0.0
  table = rm.sequence_metrics([np.array(ref)], [np.array(hyp)])
  assert table.loc[0, "bleu4"] == 0.0
  assert f"{rm.summarize(table)['bleu4']:.4g}" == "0"


def test_nl_dist_is_a_distance_lower_is_better():
  ref = np.arange(10)
  close, far = ref.copy(), ref[::-1].copy()
  close[-1] = 99
  table = rm.sequence_metrics([ref, ref, ref], [ref, close, far])
  assert table["nl_dist"].tolist() == pytest.approx([0.0, 0.1, 1.0])
  assert (table["nl_dist"] == table["l_dist"] / 10).all()
