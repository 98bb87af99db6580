"""Gene pathway loss: GMT -> membership, gene sampling, InfoNCE against a NumPy oracle."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from genemamba_jax.data import genes
from genemamba_jax.errors import DataError
from genemamba_jax.data.vocab import Vocab, import_geneformer
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.train import objectives, pathway
from genemamba_jax.train.pathway import PathwayLoss

jax.config.update("jax_default_matmul_precision", "highest")
# Backend -O0: halves XLA's compile time on CPU, which dominates these tiny runs.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
_infonce = _jit(pathway.pathway_infonce, static_argnums=5)


def _infonce_numpy(hidden, tokens, positions, valid, membership, tau):
  """The module docstring's formula, one anchor at a time."""
  batch, k = positions.shape
  items = [(b, hidden[b, positions[b, s]], tokens[b, positions[b, s]])
           for b in range(batch) for s in range(k) if valid[b, s]]

  def sim(a, b):
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b) / tau

  losses = []
  for i, (cell, h, token) in enumerate(items):
    others = [j for j in range(len(items)) if j != i]
    positives = [j for j in others if items[j][0] == cell
                 and np.any(membership[token] & membership[items[j][2]])]
    if positives:
      numerator = sum(np.exp(sim(h, items[j][1])) for j in positives)
      denominator = sum(np.exp(sim(h, items[j][1])) for j in others)
      losses.append(-np.log(numerator / denominator))
  return np.mean(losses) if losses else 0.0


def _case():
  """2 cells, 4 sampled slots each (one filler); sets {4, 5, 6}, {6, 7}, {8}; token 9 in none.

  Cell 0 samples 4, 6, 5, 7: several positives per anchor (6 has 4, 5 and 7).
  Cell 1 samples 6, 8, 7: 6 and 7 are positives, 8 has none; 4, 5, 6 of cell
  0 share a set with 6 of cell 1 but another cell's genes are negatives only.
  """
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(2, 6, 5)).astype(np.float32)
  tokens = np.array([[2, 4, 6, 5, 7, 9], [2, 6, 8, 7, 4, 0]], np.int32)
  membership = np.zeros((10, 3), bool)
  membership[[4, 5, 6], 0] = membership[[6, 7], 1] = membership[8, 2] = True
  positions = np.array([[1, 2, 3, 4], [1, 2, 3, 4]], np.int32)
  valid = np.array([[True, True, True, True], [True, True, True, False]])
  return hidden, tokens, positions, valid, membership


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_infonce_equals_numpy(tau):
  hidden, tokens, positions, valid, membership = _case()
  got = _infonce(jnp.asarray(hidden), jnp.asarray(tokens), jnp.asarray(positions),
                                jnp.asarray(valid), jnp.asarray(membership), tau)
  expected = _infonce_numpy(hidden, tokens, positions, valid, membership, tau)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  valid[1, 2] = False  # drop cell 1's 7: its 6 loses its only positive
  got = _infonce(jnp.asarray(hidden), jnp.asarray(tokens), jnp.asarray(positions),
                                jnp.asarray(valid), jnp.asarray(membership), tau)
  np.testing.assert_allclose(got, _infonce_numpy(hidden, tokens, positions, valid, membership,
                                                 tau), rtol=1e-5)


def test_infonce_gradients_are_finite_and_zero_without_positives():
  hidden, tokens, positions, valid, membership = _case()
  hidden[0, 3] = 0.0  # a zero vector has no direction: still finite
  loss = lambda h, m: pathway.pathway_infonce(h, jnp.asarray(tokens), jnp.asarray(positions),
                                              jnp.asarray(valid), m, 0.07)
  grad = _jit(jax.grad(loss))(jnp.asarray(hidden), jnp.asarray(membership))
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  # Unsampled positions get no gradient.
  np.testing.assert_array_equal(grad[0, [0, 5]], 0.0)
  np.testing.assert_array_equal(grad[1, [0, 4, 5]], 0.0)
  none = np.eye(10, 3, dtype=bool)  # tokens 0..2 only: no sampled gene shares a set
  assert float(_jit(loss)(jnp.asarray(hidden), jnp.asarray(none))) == 0.0
  grad = _jit(jax.grad(loss))(jnp.asarray(hidden), jnp.asarray(none))
  assert np.all(np.isfinite(grad))


def test_sampling_without_replacement_and_padding_invariant():
  rng = np.random.default_rng(1)
  lengths = np.array([20, 9, 3, 0])
  eligible_ids = jnp.asarray(rng.random(30) < 0.5)
  tokens = rng.integers(0, 30, (4, 40))
  sample = _jit(lambda tokens, mask, key: pathway.sample_gene_positions(
      tokens, mask, eligible_ids, 6, key))
  results = []
  for width in (20, 40):
    mask = np.arange(width)[None, :] < lengths[:, None]
    positions, valid = map(np.asarray, sample(tokens[:, :width], mask, jax.random.key(2)))
    assert positions.shape == (4, 6)
    for b in range(4):
      picked = positions[b][valid[b]]
      can = np.flatnonzero(mask[b] & np.asarray(eligible_ids)[tokens[b, :width]])
      assert len(set(picked)) == len(picked) == min(6, len(can))
      assert set(picked) <= set(can)
    results.append({b: sorted(positions[b][valid[b]]) for b in range(4)})
  assert results[0] == results[1]
  # Fewer positions than genes_per_cell: K slots, the extra ones invalid.
  positions, valid = pathway.sample_gene_positions(
      jnp.full((1, 3), 5), jnp.ones((1, 3), bool), jnp.ones(30, bool), 6, jax.random.key(0))
  assert sorted(np.asarray(positions)[np.asarray(valid)]) == [0, 1, 2] and valid.sum() == 3


def test_pathway_loss_is_a_pytree_and_jits():
  hidden, tokens, _, _, membership = _case()
  loss = PathwayLoss(jnp.asarray(membership), genes_per_cell=3)  # pad (0) masked out
  assert jax.tree.leaves(loss)[0].shape == (10, 3)
  mask = jnp.asarray(tokens != 0)
  call = lambda p, h: p(h, jnp.asarray(tokens), mask, jax.random.key(0))
  value, grad = _jit(jax.value_and_grad(call, argnums=1))(loss, jnp.asarray(hidden))
  assert np.isfinite(value) and value > 0
  # Never sampled: <cls> (2) and token 9 (in no set); cell 0 has 4 candidates for 3 slots.
  np.testing.assert_array_equal(grad[:, 0], 0.0)
  np.testing.assert_array_equal(grad[0, 5], 0.0)
  assert np.count_nonzero(np.abs(grad[0]).sum(-1)) == 3


def test_load_gene_sets_small(tmp_path, caplog):
  (tmp_path / "a.gmt").write_text("S1\td\tA\tB\tC\nS2\td\tA\tZ\nS3\td\tB\tBB\n")
  (tmp_path / "b.gmt").write_text("S1\td\tC\tENSG3\n")
  vocab = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "ENSG1": 3, "ENSG2": 4, "ENSG3": 5, "C": 6}
  gene_map = {"A": "ENSG1", "B": "ENSG2", "BB": "ENSG2", "Z": "ENSG_NOT_IN_VOCAB"}
  with caplog.at_level(logging.INFO, logger="genemamba_jax.train.pathway"):
    membership, names = pathway.load_gene_sets(
        [tmp_path / "a.gmt", tmp_path / "b.gmt"], vocab, gene_map)
  # S2 keeps only A; S3's two symbols are one gene; b.gmt's S1 is renamed.
  assert names == ["S1", "b.gmt:S1"]
  assert membership.shape == (7, 2) and membership.dtype == bool
  assert np.flatnonzero(membership[:, 0]).tolist() == [3, 4, 6]  # C is a symbol token
  assert np.flatnonzero(membership[:, 1]).tolist() == [5, 6]  # an Ensembl id passes through
  assert "5 of 6 genes mapped" in caplog.text and "2 sets kept" in caplog.text
  membership, names = pathway.load_gene_sets(tmp_path / "a.gmt", vocab, gene_map, min_size=1)
  assert names == ["S1", "S2", "S3"]
  with pytest.raises(DataError, match="no gene set has 2 genes"):
    pathway.load_gene_sets(tmp_path / "a.gmt", {"<pad>": 0, "X": 1})


def test_load_gene_sets_real_geneformer_and_symbols(shared_data, tmp_path):
  sets = shared_data / "genesets"
  gmts = [sets / "h.all.v7.0.symbols.gmt", sets / "ReactomePathways_2024-09-18.gmt"]
  folder = shared_data / "geneformer_30m"
  vocab, _ = import_geneformer(folder / "token_dictionary.pkl",
                               folder / "gene_median_dictionary.pkl", tmp_path / "vocab")
  gene_map = genes.load_gene_map(folder / "gene_name_id_dict.pkl")
  membership, names = pathway.load_gene_sets(gmts, vocab.token_to_id, gene_map)
  assert membership.shape == (len(vocab), len(names)) == (25_428, 2433)
  assert names[:50] == list(genes.read_gmt(gmts[0]))  # every hallmark set kept, in file order
  sizes = membership.sum(0)
  assert sizes.min() >= 2 and sizes[:50].min() >= 32
  # 4,314 of the 4,384 hallmark genes map (98%); PGK1 is a glycolysis gene.
  assert np.count_nonzero(membership[:, :50].any(1)) == 4314
  assert membership[vocab.token_to_id[gene_map["PGK1"]], names.index("HALLMARK_GLYCOLYSIS")]
  special = [vocab.pad_id, vocab.mask_id, vocab.cls_id, vocab.eos_id]
  assert not membership[special].any()
  # A vocabulary of symbols maps directly, without a gene map.
  hallmark = genes.read_gmt(gmts[0])
  symbols = Vocab.from_genes(g for members in hallmark.values() for g in members)
  membership, names = pathway.load_gene_sets(gmts[0], symbols.token_to_id)
  assert names == list(hallmark) and membership.sum() == sum(map(len, hallmark.values()))


@pytest.mark.slow  # over ~10 s on 2 cores
def test_both_losses_decrease_when_overfitting():
  """30 Adam steps of next_gene + pathway on one batch: the pathway gradient reaches the model."""
  config = GeneMambaConfig(vocab_size=40, d_model=16, n_layers=2, d_state=8, mixer="mamba1",
                           scan_backend="sequential", streams="separate")
  graphdef, params = nnx.split(GeneMamba(config, rngs=nnx.Rngs(0)))
  objective = objectives.ObjectiveConfig(special_ids=(2, 3))
  membership = np.random.default_rng(0).random((40, 4)) < 0.4
  loss = PathwayLoss(jnp.asarray(membership), genes_per_cell=6)
  rng = np.random.default_rng(5)
  lengths = np.array([12, 12, 9, 6])
  mask = np.arange(12)[None, :] < lengths[:, None]
  batch = {"tokens": jnp.asarray(np.where(mask, rng.integers(4, 40, (4, 12)), 0), jnp.int32),
           "mask": jnp.asarray(mask)}
  tx = optax.adam(1e-2)

  @_jit
  def step(params, opt_state, key):
    total = lambda p: objectives.loss_fn(nnx.merge(graphdef, p), batch, key, objective, loss)
    (_, metrics), grads = jax.value_and_grad(total, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state, history = tx.init(params), []
  for i in range(30):
    params, opt_state, metrics = step(params, opt_state, jax.random.key(i % 2))
    history.append(metrics)
  first, last = history[0], history[-1]
  assert float(last["loss/next_gene"]) < 0.5 * float(first["loss/next_gene"])
  assert float(last["loss/pathway"]) < 0.8 * float(first["loss/pathway"])
