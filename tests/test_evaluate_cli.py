"""evaluate's reconstruction and gene-pairs commands on a model pretrained on real cells."""

import json

import numpy as np
import pandas as pd
import pytest

from genemamba_jax import inference, pretrained
from genemamba_jax.evaluate import __main__ as cli
from genemamba_jax.evaluate import reconstruction
from tests.conftest import SHARED_DATA

KANG = SHARED_DATA / "kang_pbmc_ifnb.h5ad"


def test_dataset_order_by_count_then_mean_position():
  cells = [np.array([5, 7, 9]), np.array([7, 5]), np.array([7, 8])]
  # 7: 3 times; 5: twice (mean position 0.5); 9 (position 2) and 8 (position 1) once each.
  np.testing.assert_array_equal(reconstruction.dataset_order(cells), [7, 5, 8, 9])


def test_reconstruct_scores_each_protocol_on_gene_positions(kang_pretrained):
  model = pretrained.load_pretrained(kang_pretrained)
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
  # Leak-free predictions come from next_gene_hidden: check one position by hand.
  hidden = model.model.next_gene_hidden(cells[3][None], None)
  logits = np.asarray(model.model.logits(hidden))[0]
  assert hyps["next_gene"][3][4] == np.argmax(logits[5])
  assert summary.loc["same_position", "cells"] == 12


def test_reconstruction_and_gene_pair_commands(kang_pretrained, tmp_path, capsys):
  out = tmp_path / "rec"
  assert cli.main(["reconstruction", "--checkpoint", str(kang_pretrained), "--input", str(KANG),
                   "--out", str(out), "--cells", "16"]) == 0
  table = pd.read_csv(out / "reconstruction.csv", index_col="method")
  assert {"l_dist", "bleu1", "bleu4", "spearman", "note"} <= set(table.columns)
  assert json.loads((out / "reconstruction.json").read_text())["next_gene"]["cells"] == 16
  assert (out / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"

  out = tmp_path / "pairs"
  assert cli.main(["gene-pairs", "--checkpoint", str(kang_pretrained), "--pairs",
                   str(SHARED_DATA / "gene2vec_pairs"), "--out", str(out)]) == 0
  pairs = pd.read_csv(out / "gene_pairs.csv", index_col="method")
  assert list(pairs.index) == ["embedding", "random"]
  assert pairs.loc["embedding", "pairs_used"] == 334  # test pairs with both genes in Kang
  assert abs(pairs.loc["random", "auc"] - 0.5) < 0.1
  assert "written:" in capsys.readouterr().out


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
