"""evaluate's reconstruction and gene-pairs commands on a model pretrained on real cells."""

import json

import numpy as np
import pandas as pd
import pytest

from genemamba_jax import inference, rundir
from genemamba_jax.evaluate import __main__ as cli
from genemamba_jax.evaluate import reconstruction
from tests.conftest import SHARED_DATA

KANG = SHARED_DATA / "kang_pbmc_ifnb.h5ad"


def test_dataset_order_by_count_then_mean_position():
  cells = [np.array([5, 7, 9]), np.array([7, 5]), np.array([7, 8])]
  # 7: 3 times; 5: twice (mean position 0.5); 9 (position 2) and 8 (position 1) once each.
  np.testing.assert_array_equal(reconstruction.dataset_order(cells), [7, 5, 8, 9])


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_reconstruct_scores_each_protocol_on_gene_positions(kang_pretrained):
  model = rundir.load_pretrained(kang_pretrained)
  from genemamba_jax.data.readers import open_source
  cells, _, _ = inference.tokenize_all(model.tokenizer(), open_source(KANG), desc=None)
  cells = cells[:12]
  vocab = model.vocab
  summary, per_cell, hyps = reconstruction.reconstruct(
      model.model, cells, [vocab.cls_id, vocab.eos_id])
  assert list(summary.index) == ["same_position", "next_gene", "dataset_order"]
  # <cls> is left out: each hypothesis is as long as the cell's genes.
  assert [len(h) for h in hyps["next_gene"]] == [len(c) - 1 for c in cells]
  # The scores are the metric functions applied to these sequences.
  from genemamba_jax.evaluate import reconstruction_metrics as rm
  ref = cells[3][1:]
  row = per_cell[(per_cell.method == "next_gene") & (per_cell.cell == 3)].iloc[0]
  assert row.l_dist == rm.levenshtein(ref, hyps["next_gene"][3])
  assert row.bleu4 == pytest.approx(rm.bleu(ref, hyps["next_gene"][3]))
  # Leak-free predictions come from encode_next_gene: check one position by hand.
  hidden = model.model.encode_next_gene(cells[3][None], None)[0]
  logits = np.asarray(model.model.logits(hidden))[0]
  assert hyps["next_gene"][3][4] == np.argmax(logits[5])
  assert summary.loc["same_position", "cells"] == 12


def _written(stdout: str) -> list[str]:
  return [line.removeprefix("written: ") for line in stdout.splitlines()
          if line.startswith("written: ")]


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_reconstruction_and_gene_pair_commands(kang_pretrained, tmp_path, capsys):
  out = tmp_path / "rec"
  assert cli.main(["reconstruction", "--checkpoint", str(kang_pretrained), "--input", str(KANG),
                   "--out", str(out), "--cells", "16"]) == 0
  table = pd.read_csv(out / "reconstruction.csv", index_col="method")
  assert {"l_dist", "nl_dist", "bleu1", "bleu4", "spearman", "note"} <= set(table.columns)
  assert ((table["nl_dist"].dropna() >= 0) & (table["nl_dist"].dropna() <= 1)).all()
  # nl_dist is the distance l_dist / max length, cell by cell (lower is better).
  cells = pd.read_csv(out / "reconstruction_cells.csv")
  assert cells["nl_dist"].to_numpy() == pytest.approx(
      cells["l_dist"].to_numpy() / cells["length"].to_numpy())  # hypotheses are cell-long
  assert json.loads((out / "reconstruction.json").read_text())["next_gene"]["cells"] == 16
  assert (out / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"
  captured = capsys.readouterr()
  # The first line says what runs before JAX loads; then the steps and a bar per protocol.
  first = captured.err.split("\n")[0]
  assert first.startswith("reconstruction: ") and str(KANG) in first
  assert "same_position" in captured.err and "next_gene" in captured.err
  # Every file written is named, and only those.
  assert sorted(_written(captured.out)) == sorted(str(p) for p in out.iterdir())
  assert len(_written(captured.out)) == 4

  out = tmp_path / "pairs"
  assert cli.main(["gene-pairs", "--checkpoint", str(kang_pretrained), "--pairs",
                   str(SHARED_DATA / "gene2vec_pairs"), "--out", str(out)]) == 0
  pairs = pd.read_csv(out / "gene_pairs.csv", index_col="method")
  assert list(pairs.index) == ["embedding", "random"]
  assert pairs.loc["embedding", "pairs_used"] == 334  # test pairs with both genes in Kang
  assert abs(pairs.loc["random", "auc"] - 0.5) < 0.1
  captured = capsys.readouterr()
  assert captured.err.startswith("gene-pairs: ") and str(kang_pretrained) in captured.err
  assert sorted(_written(captured.out)) == sorted(str(p) for p in out.iterdir())
  assert {p.rsplit("/", 1)[-1] for p in _written(captured.out)} == {
      "gene_pairs.csv", "gene_pairs.json", "similarity.png"}


def test_rank_figure_panels_titles_and_colour_bar():
  rng = np.random.default_rng(0)
  refs = [rng.permutation(500)[:100] for _ in range(20)]
  hyps = {"dataset_order": [rng.permutation(500)[:100] for _ in refs],
          "same_position": [r.copy() for r in refs],
          "next_gene": [np.where(rng.random(100) < 0.5, r, -1) for r in refs]}
  summary = pd.DataFrame({"spearman": [1.0, 0.5, 0.01]},
                         index=["same_position", "next_gene", "dataset_order"])
  fig = reconstruction.rank_figure(refs, hyps, summary)
  *panels, colorbar = fig.axes
  assert len(panels) == 6  # per method: the rank histogram above, the missing share below
  titles = [ax.get_title() for ax in panels[:3]]
  # The table's order, in plain words, with each method's Spearman.
  assert "original protocol" in titles[0] and "Spearman 1.00" in titles[0]
  assert "leak-free" in titles[1] and "Spearman 0.50" in titles[1]
  assert "no model" in titles[2]
  assert "genes" in colorbar.get_ylabel()
  # Missing genes sit in a row of their own, not in the colour scale: 0% when the
  # prediction is the input, ~50% when half the positions hold a gene of no cell.
  missing = [np.array([bar.get_height() for bar in ax.patches]) for ax in panels[3:]]
  assert missing[0].max() == 0
  assert 35 < missing[1].mean() < 65
  image = panels[0].collections[0]
  assert image.norm.vmax == pytest.approx(20 * 3)  # 3 ranks a bin, 20 cells on the diagonal


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_an_error_after_a_bar_started_is_on_a_line_of_its_own(kang_pretrained, tmp_path,
                                                             capsys):
  # Cells past the first chunk (1,024) hold fractional values: tokenizing stops half-way,
  # while its bar is drawn.
  import anndata  # pylint: disable=g-import-not-at-top
  adata = anndata.read_h5ad(KANG)
  adata.X = adata.X.tocsr().astype(np.float32)
  adata.X[1500, adata.X[1500].indices[0]] = 0.5
  bad = tmp_path / "kang_bad.h5ad"
  adata.write_h5ad(bad)
  assert cli.main(["reconstruction", "--checkpoint", str(kang_pretrained), "--input", str(bad),
                   "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "tokenizing" in err and "non-integer" in err
  assert "\nerror: " in err  # not glued onto the bar's unfinished line
  line = next(line for line in err.split("\n") if "error: " in line)
  assert line.startswith("error: ") and "\r" not in line


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_gene_pairs_needs_matching_gene_names(kang_pretrained, tmp_path, capsys):
  # Gene embeddings keyed by Ensembl ids cannot be matched to the pair files' symbols.
  genes = tmp_path / "genes.npz"
  np.savez(genes, gene_ids=np.array(["ENSG1", "ENSG2"]), input=np.zeros((2, 4)))
  assert cli.main(["gene-pairs", "--genes", str(genes), "--pairs",
                   str(SHARED_DATA / "gene2vec_pairs"), "--out", str(tmp_path / "o")]) == 2
  assert "pair-file genes matched" in capsys.readouterr().err
  assert cli.main(["gene-pairs", "--genes", str(genes), "--which", "context", "--pairs",
                   str(SHARED_DATA / "gene2vec_pairs"), "--out", str(tmp_path / "o")]) == 2
  assert "embed --genes-output" in capsys.readouterr().err
