"""perturb: sentence edits by hand, shifts on a tiny model, the command on real Kang cells."""

import logging
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from genemamba_jax import perturb as pt
from genemamba_jax import rundir
from genemamba_jax.errors import DataError
from genemamba_jax.data.vocab import Vocab
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from tests.conftest import SHARED_DATA

CLS, EOS = 2, 3  # Vocab.from_genes: <pad> 0, <mask> 1, <cls> 2, <eos> 3, genes from 4


def test_delete_removes_the_token_and_nothing_else():
  sentence = np.array([CLS, 5, 6, 7, 8], np.int32)
  np.testing.assert_array_equal(pt.delete_gene(sentence, 7), [CLS, 5, 6, 8])
  absent = pt.delete_gene(sentence, 9)
  np.testing.assert_array_equal(absent, sentence)
  assert absent.dtype == sentence.dtype


def test_overexpress_moves_or_inserts_the_gene_first_and_cuts_to_max_len():
  sentence = np.array([CLS, 5, 6, 7, 8], np.int32)
  np.testing.assert_array_equal(pt.overexpress_gene(sentence, 7, 5, CLS), [CLS, 7, 5, 6, 8])
  # Absent: inserted after <cls>; the last gene drops out at max_len 5, not at 6.
  np.testing.assert_array_equal(pt.overexpress_gene(sentence, 9, 5, CLS), [CLS, 9, 5, 6, 7])
  np.testing.assert_array_equal(pt.overexpress_gene(sentence, 9, 6, CLS), [CLS, 9, 5, 6, 7, 8])
  # Already first: unchanged. Without <cls> the gene goes to position 0.
  np.testing.assert_array_equal(pt.overexpress_gene(sentence, 5, 5, CLS), sentence)
  np.testing.assert_array_equal(pt.overexpress_gene(np.array([5, 6, 7]), 7, 3), [7, 5, 6])
  np.testing.assert_array_equal(pt.overexpress_gene(np.array([5, 6, 7]), 9, 3), [9, 5, 6])
  # <eos> stays last, also when the cut removes a gene.
  np.testing.assert_array_equal(
      pt.overexpress_gene(np.array([CLS, 5, 6, EOS]), 9, 4, CLS, EOS), [CLS, 9, 5, EOS])
  # A cell with no gene: just the gene.
  np.testing.assert_array_equal(pt.overexpress_gene(np.array([CLS]), 9, 4, CLS), [CLS, 9])


def test_gene_names_unknown_genes_and_skip_unknown(caplog):
  vocab = Vocab.from_genes(["ACTB", "IFI6", "ISG15"])
  assert pt.gene_tokens(["ISG15", "ACTB", "ISG15"], vocab) == {"ISG15": 6, "ACTB": 4}
  with pytest.raises(DataError, match=r"genes FOO, BAR are not in the model's vocabulary "
                                      r"\(1 of 3 found\); .*--gene-map.*--skip-unknown"):
    pt.gene_tokens(["FOO", "ISG15", "BAR"], vocab)
  with pytest.raises(DataError, match=r"gene FOO is not .* \(0 of 1 found\)"):
    pt.gene_tokens(["FOO"], vocab, skip_unknown=True)  # nothing left to perturb
  with caplog.at_level(logging.WARNING):
    assert pt.gene_tokens(["FOO", "ISG15"], vocab, skip_unknown=True) == {"ISG15": 6}
  assert "skipping gene FOO: not in the model's vocabulary (1 of 2 found)" in caplog.text
  # Symbols through a gene map onto an Ensembl vocabulary; Ensembl ids pass as they are.
  ensembl = Vocab.from_genes(["ENSG01", "ENSG02"])
  tokens = pt.gene_tokens(["ISG15", "ENSG02"], ensembl, gene_map={"ISG15": "ENSG01"})
  assert tokens == {"ISG15": 4, "ENSG02": 5}
  with pytest.raises(DataError, match="no gene given"):
    pt.gene_tokens([" ", ""], vocab)


# --- shifts on a tiny random model -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  """A random 1-layer GeneMamba over 30 genes, sentences of <cls> + up to 11 genes."""
  vocab = Vocab.from_genes([f"G{i:02d}" for i in range(30)])
  config = GeneMambaConfig(vocab_size=len(vocab), d_model=16, n_layers=1, mixer="mamba2",
                           headdim=8, d_state=8)
  model = GeneMamba(config, rngs=nnx.Rngs(0))
  return rundir.Pretrained(model, config, vocab, {}, {"max_len": 12, "cls": True}, None)


def _sentences(n: int, seed: int = 0) -> list[np.ndarray]:
  """Cells of 3..11 distinct genes (tokens 4..33), <cls> first."""
  rng = np.random.default_rng(seed)
  return [np.concatenate([[CLS], rng.choice(np.arange(4, 34), rng.integers(3, 12), replace=False)]
                         ).astype(np.int32) for _ in range(n)]


def test_shift_is_exactly_zero_where_the_sentence_stays(tiny):
  sentences = _sentences(40)
  tokens = [7, 20]
  _, shift, toward = pt.perturb_sentences(tiny, sentences, tokens, "delete", pooling="cls",
                                          max_len=12, target_cells=np.arange(40) < 10)
  has = np.array([[t in s for t in tokens] for s in sentences])
  assert has.any() and not has.all()
  assert np.all(shift[~has] == 0.0) and np.all(toward[~has] == 0.0)
  assert np.all(shift[has] > 0)


@pytest.mark.parametrize("mode", ["delete", "overexpress"])
def test_results_do_not_depend_on_the_batch_size(tiny, mode):
  sentences = _sentences(50, seed=1)
  runs = [pt.perturb_sentences(tiny, sentences, [4, 9, 30], mode, pooling="cls", max_len=12,
                               target_cells=np.arange(50) % 3 == 0, batch_size=size)
          for size in (1, 64, 7)]
  for before, shift, toward in runs[1:]:
    np.testing.assert_allclose(before, runs[0][0], atol=1e-5)
    np.testing.assert_allclose(shift, runs[0][1], atol=1e-5)
    np.testing.assert_allclose(toward, runs[0][2], atol=1e-5)
  again = pt.perturb_sentences(tiny, sentences, [4, 9, 30], mode, pooling="cls", max_len=12,
                               target_cells=np.arange(50) % 3 == 0, batch_size=64)
  for a, b in zip(again, runs[1]):
    np.testing.assert_array_equal(a, b)  # deterministic


def test_toward_target_is_positive_toward_the_perturbed_cells(tiny):
  # The target group is the base cells with gene 9 overexpressed: overexpressing 9 in a base cell
  # turns it into a member of that group, deleting 9 from a target cell takes it away. (Per cell
  # the sign can differ: a cell's own perturbed version is one member of the group's mean.)
  base = _sentences(30, seed=2)
  targets = [pt.overexpress_gene(s, 9, 12, CLS) for s in base]
  sentences = base + targets
  group = np.arange(60) >= 30
  _, shift, toward = pt.perturb_sentences(tiny, sentences, [9], "overexpress", pooling="cls",
                                          max_len=12, target_cells=group)
  changed = ~np.array([np.array_equal(b, t) for b, t in zip(base, targets)])
  assert changed.sum() >= 25
  toward = toward[:, 0]
  assert np.mean(toward[:30][changed] > 0) >= 0.8 and np.mean(toward[:30]) > 0
  assert np.all(toward[30:] == 0.0)  # already there: the sentence stays
  _, _, away = pt.perturb_sentences(tiny, sentences, [9], "delete", pooling="cls", max_len=12,
                                    target_cells=group)
  assert np.mean(away[30:] < 0) >= 0.8 and np.mean(away[30:]) < 0
  # One target cell: the perturbed cell is the target itself, so toward = 1 - cos(before, T) =
  # its shift.
  one = np.zeros(60, bool)
  one[30] = True
  _, shift, toward = pt.perturb_sentences(tiny, sentences, [9], "overexpress", pooling="cls",
                                          max_len=12, target_cells=one)
  assert changed[0]
  np.testing.assert_allclose(toward[0, 0], shift[0, 0], atol=1e-6)
  assert toward[0, 0] > 0


# --- the command on real Kang cells ------------------------------------------------------------


@pytest.fixture(scope="module")
def kang_cells(tmp_path_factory):
  """60 Kang cells, control and stimulated, in a shuffled order."""
  adata = anndata.read_h5ad(SHARED_DATA / "kang_pbmc_ifnb.h5ad")
  path = tmp_path_factory.mktemp("perturb") / "kang60.h5ad"
  adata[np.random.default_rng(0).permutation(adata.n_obs)[:60]].copy().write_h5ad(path)
  return path


def _args(run, cells, output, *extra):
  return ["--checkpoint", str(run), "--input", str(cells), "--output", str(output),
          *map(str, extra)]


@pytest.mark.slow
def test_cli_rows_columns_and_real_cells(kang_pretrained, kang_cells, tmp_path):
  out = tmp_path / "shift.csv"
  result = subprocess.run(
      [sys.executable, "-m", "genemamba_jax.perturb",
       *_args(kang_pretrained, kang_cells, out, "--genes", "ISG15,ACTB", "--mode", "overexpress",
              "--target-column", "condition", "--target", "stim")],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "ISG15: mean shift" in result.stdout and "toward_target" in result.stdout
  table = pd.read_csv(out)
  cells = anndata.read_h5ad(kang_cells)
  assert list(table.columns) == ["obs_name", "gene", "mode", "shift", "toward_target"]
  assert list(table["obs_name"]) == list(np.repeat(cells.obs_names, 2))
  assert list(table["gene"]) == ["ISG15", "ACTB"] * 60 and set(table["mode"]) == {"overexpress"}
  assert np.all(table["shift"] >= 0) and table["shift"].max() > 0


@pytest.mark.slow
def test_delete_on_real_cells_batch_size_free_and_zero_where_absent(kang_pretrained, kang_cells,
                                                                    caplog):
  run = rundir.load_pretrained(kang_pretrained)
  genes = ["ISG15", "IFI6", "ACTB"]
  big = pt.perturb(run, kang_cells, genes, "delete", batch_size=64, progress=False)
  one = pt.perturb(run, anndata.read_h5ad(kang_cells), genes, "delete", batch_size=1,
                   progress=False)
  assert list(big.columns) == list(pt.COLUMNS)
  np.testing.assert_allclose(one["shift"], big["shift"], atol=1e-5)
  # Exactly zero where the cell's sentence lacks the gene.
  from genemamba_jax import inference  # pylint: disable=g-import-not-at-top
  from genemamba_jax.data.readers import open_source  # pylint: disable=g-import-not-at-top
  sentences, _, _ = inference.tokenize_all(run.tokenizer(cls=True), open_source(kang_cells),
                                           desc=None)
  has = np.array([[run.vocab.token_to_id[g] in s for g in genes] for s in sentences]).reshape(-1)
  assert (~has).any() and has.any()
  assert np.all(big["shift"].to_numpy()[~has] == 0.0)
  assert np.all(big["shift"].to_numpy()[has] > 0.0)
  # A gene in no cell's sentence: all zeros, and a warning says why.
  present = set(np.concatenate(sentences).tolist())
  absent = next(g for g in run.vocab.gene_ids if run.vocab.token_to_id[g] not in present)
  with caplog.at_level(logging.WARNING):
    none = pt.perturb(run, kang_cells, [absent], "delete", progress=False)
  assert np.all(none["shift"] == 0.0)
  assert f"{absent}: in no cell's sentence" in caplog.text


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_bad_input_is_one_line_and_writes_nothing(kang_pretrained, kang_cells, tmp_path, capsys):
  out = tmp_path / "shift.csv"
  args = _args(kang_pretrained, kang_cells, out, "--mode", "delete")
  assert pt.main([*args, "--genes", "FOO,ISG15,BAR"]) == 2
  assert ("genes FOO, BAR are not in the model's vocabulary (1 of 3 found)"
          in _one_error_line(capsys))
  assert pt.main([*args, "--genes", "ISG15", "--target-column", "state", "--target", "x"]) == 2
  assert "obs has no column 'state' (--target-column)" in _one_error_line(capsys)
  assert pt.main([*args, "--genes", "ISG15", "--target-column", "condition", "--target",
                  "stimulated"]) == 2
  line = _one_error_line(capsys)
  assert "no cell has obs['condition'] == 'stimulated' (--target)" in line and "stim" in line
  assert pt.main([*args, "--genes", "ISG15", "--target", "stim"]) == 2
  assert "go together" in _one_error_line(capsys)
  assert pt.main(_args(kang_pretrained, kang_cells, tmp_path / "shift.h5ad", "--mode", "delete",
                       "--genes", "ISG15")) == 2
  assert "name it OUT.csv" in _one_error_line(capsys)
  assert list(tmp_path.iterdir()) == []


def test_every_option_has_help():
  actions = pt.build_parser()._actions  # pylint: disable=protected-access
  assert [a.dest for a in actions if not a.help] == []
