"""Co-expression InfoNCE: Gene2Vec pairs -> token ids, the loss against a NumPy oracle, wiring."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genemamba_jax.data import genes
from genemamba_jax.errors import DataError
from genemamba_jax.train.config import DEMO_DATA
from genemamba_jax.data.vocab import import_geneformer
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.train import coexpression, config as config_lib, loop, objectives
from genemamba_jax.train.coexpression import CoexpressionLoss
from genemamba_jax.train.pathway import PathwayLoss
from tests.train.test_train import _config, _metrics, demo_cache  # noqa: F401 (autouse fixture)

jax.config.update("jax_default_matmul_precision", "highest")
# Backend -O0: halves XLA's compile time on CPU, which dominates these tiny runs.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
V = 12
# Gene pairs of the hand-made case (token ids; stored in both orders).
POSITIVE = [(4, 5), (4, 6), (5, 6), (6, 8), (7, 9)]
NEGATIVE = [(4, 7), (5, 8), (6, 9), (4, 8), (8, 10)]


def _both_orders(pairs):
  return np.array(sorted({p for a, b in pairs for p in ((a, b), (b, a))}), np.int32)


def _loss(**kw):
  return CoexpressionLoss.from_pairs(_both_orders(POSITIVE), _both_orders(NEGATIVE), V, **kw)


def _infonce_numpy(hidden, tokens, positions, valid, tau):
  """The module docstring's formula, one anchor at a time."""
  positive = {p for a, b in POSITIVE for p in ((a, b), (b, a))}
  negative = {p for a, b in NEGATIVE for p in ((a, b), (b, a))}
  items = [(hidden[b, positions[b, s]], tokens[b, positions[b, s]])
           for b in range(positions.shape[0]) for s in range(positions.shape[1]) if valid[b, s]]

  def exp_sim(a, b):
    return np.exp(a @ b / np.linalg.norm(a) / np.linalg.norm(b) / tau)

  losses = []
  for i, (h, token) in enumerate(items):
    others = [(g, t) for j, (g, t) in enumerate(items) if j != i and t != token]
    pos = sum(exp_sim(h, g) for g, t in others if (token, t) in positive)
    neg = sum(exp_sim(h, g) for g, t in others if (token, t) in negative)
    if any((token, t) in positive for _, t in others):
      losses.append(-np.log(pos / (pos + neg)))
  return np.mean(losses) if losses else 0.0


def _case():
  """2 cells; 4 is repeated in cell 0; 10 has a negative (8) but no positive; 11 is in no pair.

  Positives cross cells (6 of cell 0 with 8 of cell 1, 7 with 9); <cls> (2) and
  pad (0) are never sampled.
  """
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(2, 8, 6)).astype(np.float32)
  tokens = np.array([[2, 4, 5, 6, 7, 4, 0, 0], [2, 6, 8, 9, 10, 11, 0, 0]], np.int32)
  mask = tokens != 0
  return hidden, tokens, mask


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_loss_equals_numpy_oracle(tau):
  hidden, tokens, mask = _case()
  # Every eligible gene fits in 8 slots: 5 in cell 0, 4 in cell 1, the rest filler.
  loss = _loss(tau=tau, genes_per_cell=8)
  got = _jit(lambda l, h: l(h, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0)))(
      loss, jnp.asarray(hidden))
  positions = np.array([[1, 2, 3, 4, 5, 0, 0, 0], [1, 2, 3, 4, 0, 0, 0, 0]])
  valid = np.arange(8)[None, :] < np.array([[5], [4]])
  expected = _infonce_numpy(hidden, tokens, positions, valid, tau)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # The same on explicit samples, with filler slots that point at real genes.
  infonce = _jit(coexpression.coexpression_infonce, static_argnums=(7,))
  valid[0, 4] = valid[1, 1] = False  # drop the repeated 4 and cell 1's 8
  got = infonce(jnp.asarray(hidden), jnp.asarray(tokens), jnp.asarray(positions),
                jnp.asarray(valid), loss.index, loss.positive, loss.negative, tau)
  np.testing.assert_allclose(got, _infonce_numpy(hidden, tokens, positions, valid, tau),
                             rtol=1e-5)


def test_repeated_token_is_neither_positive_nor_negative():
  """Two 4s and one 5 (a positive pair): each 4's denominator holds the 5 only."""
  hidden = np.random.default_rng(1).normal(size=(1, 3, 4)).astype(np.float32)
  tokens = np.array([[4, 4, 5]], np.int32)
  value = _jit(lambda l, h: l(h, jnp.asarray(tokens), jnp.ones((1, 3), bool),
                              jax.random.key(0)))(_loss(genes_per_cell=3), jnp.asarray(hidden))
  np.testing.assert_allclose(value, 0.0, atol=1e-6)  # -log(p / p) for every anchor


def test_padding_does_not_change_the_loss():
  hidden, tokens, mask = _case()
  loss = _loss(genes_per_cell=3)  # fewer slots than genes: the sampling matters
  run = _jit(lambda l, h, t, m: l(h, t, m, jax.random.key(4)))
  narrow = run(loss, jnp.asarray(hidden[:, :6]), jnp.asarray(tokens[:, :6]),
               jnp.asarray(mask[:, :6]))
  rng = np.random.default_rng(2)  # garbage states and genes in the padding
  wide_hidden = np.concatenate([hidden, rng.normal(size=(2, 10, 6)).astype(np.float32)], 1)
  wide_tokens = np.concatenate([tokens, rng.integers(4, 11, (2, 10)).astype(np.int32)], 1)
  wide = run(loss, jnp.asarray(wide_hidden), jnp.asarray(wide_tokens),
             jnp.asarray(np.pad(mask, ((0, 0), (0, 10)))))
  np.testing.assert_allclose(narrow, wide, rtol=1e-6)
  assert float(narrow) > 0


def test_gradients_are_finite():
  hidden, tokens, mask = _case()
  hidden[0, 2] = 0.0  # a zero vector has no direction: still finite
  call = lambda h, l: l(h, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0))
  grad = _jit(jax.grad(call))(jnp.asarray(hidden), _loss(genes_per_cell=8))
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  np.testing.assert_array_equal(grad[:, [0, 6, 7]], 0.0)  # <cls> and pad: never sampled
  np.testing.assert_array_equal(grad[1, 5], 0.0)  # 11 is in no pair
  # No positive pair among the sampled genes: 0, with finite (zero) gradients.
  only_negative = CoexpressionLoss.from_pairs(np.zeros((0, 2), np.int32),
                                              _both_orders(NEGATIVE), V, genes_per_cell=8)
  value, grad = _jit(jax.value_and_grad(call))(jnp.asarray(hidden), only_negative)
  assert float(value) == 0.0 and np.all(grad == 0)


def test_bit_packed_lookup_equals_a_set_lookup():
  """Random pairs; G is not a multiple of 32, and some queried tokens are in no pair."""
  rng = np.random.default_rng(3)
  vocab_size = 300
  in_pairs = rng.choice(np.arange(1, vocab_size), 77, replace=False)  # token 0: in no pair
  pairs = rng.choice(in_pairs, (600, 2))
  pairs = pairs[pairs[:, 0] != pairs[:, 1]]
  # One label per ordered pair ((a, b) and (b, a) may differ); duplicate rows are kept.
  label = {p: i % 3 == 0 for i, p in enumerate(sorted({tuple(p) for p in pairs.tolist()}))}
  positive = np.array([p for p in pairs.tolist() if label[tuple(p)]], np.int32)
  negative = np.array([p for p in pairs.tolist() if not label[tuple(p)]], np.int32)
  loss = CoexpressionLoss.from_pairs(positive, negative, vocab_size)
  genes_ = np.unique(np.concatenate([positive, negative]))
  assert loss.positive.shape == loss.negative.shape == (len(genes_), -(-len(genes_) // 32))
  assert len(genes_) % 32 and loss.positive.dtype == np.uint32
  np.testing.assert_array_equal(np.asarray(loss.index) >= 0, np.isin(np.arange(vocab_size), genes_))
  query = np.concatenate([rng.choice(in_pairs, 150), rng.integers(0, vocab_size, 50), [0]])
  got = _jit(coexpression.pair_relations)(loss.index, loss.positive, loss.negative,
                                          jnp.asarray(query, jnp.int32))
  pos_set, neg_set = set(map(tuple, positive.tolist())), set(map(tuple, negative.tolist()))
  for got_, expected in zip(got, (pos_set, neg_set)):
    want = np.array([[(a, b) in expected for b in query.tolist()] for a in query.tolist()])
    np.testing.assert_array_equal(np.asarray(got_), want)
  assert np.asarray(got[0]).any() and np.asarray(got[1]).any()


def test_from_pairs_errors():
  pairs = np.array([[4, 5]])
  # No int32 pair keys: any vocabulary size works.
  assert CoexpressionLoss.from_pairs(pairs, pairs[:, ::-1], 100_000).index.shape == (100_000,)
  with pytest.raises(DataError, match="outside the vocabulary of 5 tokens"):
    CoexpressionLoss.from_pairs(pairs, np.zeros((0, 2), np.int32), 5)
  with pytest.raises(DataError, match="both positive and negative"):
    CoexpressionLoss.from_pairs(pairs, pairs, V)


def _write(folder, split, text, labels):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{split}_text.txt").write_text("".join(f"{x}\n" for x in text))
  (folder / f"{split}_label.txt").write_text("".join(f"{x}\n" for x in labels))
  return folder


def test_load_gene_pairs_small(tmp_path, caplog):
  vocab = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "ENSG1": 3, "ENSG2": 4, "ENSG3": 5, "D": 6}
  gene_map = {"A": "ENSG1", "B": "ENSG2", "BB": "ENSG2", "C": "ENSG3"}
  text = ["A B", "B C", "C A", "D A", "A Z", "B BB", "C D", "D C", "A D"]
  labels = [1, 1, 0, 0, 1, 1, 1, 0, 0]
  # D A and A D: one negative pair; C D and D C: conflicting labels, dropped; A Z: Z unmapped;
  # B BB: one token twice.
  folder = _write(tmp_path / "pairs", "train", text, labels)
  with caplog.at_level(logging.INFO, logger="genemamba_jax.train.coexpression"):
    positive, negative = coexpression.load_gene_pairs(folder, vocab, gene_map)
  assert positive.dtype == negative.dtype == np.int32
  assert positive.tolist() == [[3, 4], [4, 3], [4, 5], [5, 4]]
  assert negative.tolist() == [[3, 5], [3, 6], [5, 3], [6, 3]]
  assert ("5 of 6 genes mapped" in caplog.text and "of 9 pairs, 8 have both genes" in caplog.text
          and "1 conflicting pairs dropped" in caplog.text
          and "kept 2 positive and 2 negative pairs" in caplog.text)
  # A *_text.txt file finds its *_label.txt; explicit label files, and lists of files, work too.
  same = coexpression.load_gene_pairs(folder / "train_text.txt", vocab, gene_map)
  assert all(np.array_equal(x, y) for x, y in zip(same, (positive, negative)))
  (tmp_path / "other.txt").write_text("".join(f"{x}\n" for x in labels))
  same = coexpression.load_gene_pairs([folder / "train_text.txt"], vocab, gene_map,
                                      labels=[tmp_path / "other.txt"])
  assert all(np.array_equal(x, y) for x, y in zip(same, (positive, negative)))
  # Another split of the folder.
  _write(folder, "valid", ["A C", "A B"], [1, 0])
  positive, negative = coexpression.load_gene_pairs(folder, vocab, gene_map, split="valid")
  assert positive.tolist() == [[3, 5], [5, 3]] and negative.tolist() == [[3, 4], [4, 3]]


def test_load_gene_pairs_errors(tmp_path):
  vocab = {"<pad>": 0, "A": 1, "B": 2, "C": 3}
  with pytest.raises(DataError, match=r"train_text.txt: cannot read it .*jingcheng-du/Gene2vec"):
    coexpression.load_gene_pairs(tmp_path, vocab)
  _write(tmp_path / "a", "train", ["A B", "B C"], [1])
  with pytest.raises(DataError, match=r"a/train_text.txt has 2 lines but .*train_label.txt has 1"):
    coexpression.load_gene_pairs(tmp_path / "a", vocab)
  _write(tmp_path / "b", "train", ["A B", "B C"], [1, 2])
  with pytest.raises(DataError, match=r"b/train_label.txt, line 2: label must be 0 or 1"):
    coexpression.load_gene_pairs(tmp_path / "b", vocab)
  _write(tmp_path / "c", "train", ["X Y", "A Z"], [1, 0])
  with pytest.raises(DataError, match=r"0 positive and 0 negative pairs .* \(1 of 4 genes mapped"):
    coexpression.load_gene_pairs(tmp_path / "c", vocab)
  _write(tmp_path / "d", "train", ["A B", "B C"], [1, 1])  # no negative pair
  with pytest.raises(DataError, match="2 positive and 0 negative pairs"):
    coexpression.load_gene_pairs(tmp_path / "d", vocab)
  (tmp_path / "pairs.tsv").write_text("A B\n")
  with pytest.raises(DataError, match=r"pairs.tsv: neither a folder .* nor a \*_text.txt file"):
    coexpression.load_gene_pairs(tmp_path / "pairs.tsv", vocab)
  with pytest.raises(DataError, match="2 gene-pair files but 1 label files"):
    coexpression.load_gene_pairs([tmp_path / "a", tmp_path / "b"], vocab, labels=["x"])


@pytest.mark.slow  # over ~10 s on 2 cores
def test_load_gene_pairs_real_geneformer(shared_data, tmp_path, caplog):
  folder = shared_data / "geneformer_30m"
  vocab, _ = import_geneformer(folder / "token_dictionary.pkl",
                               folder / "gene_median_dictionary.pkl", tmp_path / "vocab")
  gene_map = genes.load_gene_map(folder / "gene_name_id_dict.pkl")
  pairs = shared_data / "gene2vec_pairs"
  with caplog.at_level(logging.INFO, logger="genemamba_jax.train.coexpression"):
    positive, negative = coexpression.load_gene_pairs(pairs, vocab.token_to_id, gene_map)
  # 8,438 of the 8,832 train-split genes map (96%); 359 pairs are listed with both labels.
  assert "8438 of 8832 genes mapped" in caplog.text
  assert "359 conflicting pairs dropped" in caplog.text
  assert positive.shape == (2 * 126_415, 2) and negative.shape == (2 * 120_353, 2)
  for pairs_ in (positive, negative):
    as_set = set(map(tuple, pairs_.tolist()))
    assert len(as_set) == len(pairs_) and as_set == {(b, a) for a, b in as_set}
    assert not np.isin(pairs_, [vocab.pad_id, vocab.mask_id, vocab.cls_id, vocab.eos_id]).any()
  assert not set(map(tuple, positive.tolist())) & set(map(tuple, negative.tolist()))
  # The first line of each label, through the gene map.
  table = genes.read_gene_pairs(pairs / "train_text.txt", pairs / "train_label.txt")
  for label, kept in ((1, positive), (0, negative)):
    a, b = table[table["label"] == label].iloc[0][["gene_a", "gene_b"]]
    ids = [vocab.token_to_id[gene_map[a]], vocab.token_to_id[gene_map[b]]]
    assert (kept == ids).all(1).any(), (a, b)
  loss = CoexpressionLoss.from_pairs(positive, negative, len(vocab))
  genes_ = np.unique(np.concatenate([positive, negative]))
  assert loss.positive.shape == loss.negative.shape == (len(genes_), -(-len(genes_) // 32))
  np.testing.assert_array_equal(np.asarray(loss.index)[genes_], np.arange(len(genes_)))
  assert np.sum(np.asarray(loss.index) >= 0) == len(genes_)
  for table, kept in ((loss.positive, positive), (loss.negative, negative)):  # one bit per pair
    assert np.unpackbits(np.asarray(table).view(np.uint8)).sum() == len(kept)


@pytest.mark.slow  # over ~10 s on 2 cores
def test_loss_fn_adds_both_auxiliary_losses():
  config = GeneMambaConfig(vocab_size=V, d_model=16, n_layers=1, d_state=8, mixer="mamba1",
                           scan_backend="sequential", streams="separate")
  graphdef, params = nnx.split(GeneMamba(config, rngs=nnx.Rngs(0)))
  membership = np.zeros((V, 2), bool)
  membership[[4, 5, 6], 0] = membership[[7, 8, 9], 1] = True
  aux = (PathwayLoss(jnp.asarray(membership), genes_per_cell=4), _loss(genes_per_cell=4))
  _, tokens, mask = _case()
  batch = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
  objective = objectives.ObjectiveConfig(special_ids=(2, 3))

  def total(params, aux):
    return objectives.loss_fn(nnx.merge(graphdef, params), batch, jax.random.key(1), objective,
                              aux)

  (value, metrics), grads = _jit(jax.value_and_grad(total, has_aux=True))(params, aux)
  assert {"loss/pathway", "loss/coexpression"} <= set(metrics)
  np.testing.assert_allclose(value, metrics["loss/next_gene"] + 0.1 * metrics["loss/pathway"]
                             + 0.1 * metrics["loss/coexpression"], rtol=1e-6)
  assert float(metrics["loss/coexpression"]) > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # The pathway loss draws what it drew alone: the first auxiliary loss keeps its key.
  _, alone = _jit(total)(params, aux[0])
  np.testing.assert_allclose(alone["loss/pathway"], metrics["loss/pathway"], rtol=1e-6)
  with pytest.raises(ValueError, match="each name once"):
    total(params, (aux[1], aux[1]))


def test_config_checks():
  c = config_lib.default_config()
  assert (c.coexpression.pairs, c.coexpression.gamma, c.coexpression.tau) == ("", 0.1, 0.1)
  c.data.path = DEMO_DATA
  c.coexpression.tau = 0.0
  config_lib.check(c)  # off: not checked
  c.coexpression.pairs = "pairs/"
  with pytest.raises(ValueError, match="coexpression.tau=0.0 must be > 0"):
    config_lib.check(c)
  c.coexpression.tau, c.coexpression.genes_per_cell = 0.1, 0
  with pytest.raises(ValueError, match="coexpression.genes_per_cell=0 must be >= 1"):
    config_lib.check(c)


@pytest.mark.slow
def test_coexpression_loss_in_training(tmp_path, shared_data):
  """The demo vocabulary is gene symbols, so the Gene2Vec pairs map onto it directly."""
  workdir = str(tmp_path / "run")
  last = loop.train_and_evaluate(
      _config(num_steps=2, eval_every=2, checkpoint_every=2,
              **{"coexpression.pairs": str(shared_data / "gene2vec_pairs")}), workdir)
  losses = [r for r in _metrics(workdir) if "loss/coexpression" in r]
  assert len(losses) == 2 and all(np.isfinite(r["loss/coexpression"]) for r in losses)
  assert all(abs(r["loss"] - r["loss/next_gene"] - 0.1 * r["loss/coexpression"]) < 1e-4
             for r in losses)
  assert np.isfinite(last["eval_loss"])
