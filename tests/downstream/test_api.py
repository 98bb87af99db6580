"""The Python API (`import genemamba_jax as gm`): the same numbers as the commands, bad input
raises DataError, a plain script needs no main guard, progress bars can be switched off."""

import subprocess
import sys
import textwrap

import anndata
import numpy as np
import pandas as pd
import pytest

import genemamba_jax as gm
from genemamba_jax import embed, label_transfer, perturb, predict


@pytest.fixture(autouse=True)
def quiet():
  gm.settings.progress = False
  yield
  gm.settings.progress = True


@pytest.fixture(scope="module")
def demo_model(demo_run):
  return gm.load(demo_run)


@pytest.fixture(scope="module")
def finetuned_model(demo_finetuned):
  return gm.load(demo_finetuned)


def _csv(path) -> pd.DataFrame:
  return pd.read_csv(path, float_precision="round_trip")


def test_import_is_cheap_and_lazy():
  code = ("import sys, genemamba_jax as gm; assert gm.settings.progress; "
          "print(sorted(m for m in ('jax', 'flax', 'anndata', 'scanpy') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_embed_and_gene_embeddings_equal_the_embed_command(demo_model, demo_run, demo_counts,
                                                           tmp_path):
  out, genes = tmp_path / "cells.h5ad", tmp_path / "genes.npz"
  assert embed.main(["--checkpoint", str(demo_run), "--input", str(demo_counts), "--output",
                     str(out), "--genes-output", str(genes)]) == 0
  written, saved = anndata.read_h5ad(out), np.load(genes)
  adata = anndata.read_h5ad(demo_counts)
  matrix = demo_model.embed(adata)
  assert matrix.dtype == np.float32 and matrix.shape == (300, 32)
  np.testing.assert_array_equal(matrix, written.obsm["X_genemamba"])
  assert adata.obsm["X_genemamba"] is matrix
  np.testing.assert_array_equal(demo_model.embed(demo_counts, key_added=None), matrix)  # a path
  table = demo_model.gene_embeddings()
  assert list(table.index) == list(saved["gene_ids"])
  np.testing.assert_array_equal(table.to_numpy(), saved["input"])
  context = demo_model.gene_embeddings(adata)
  assert list(context.index) == list(saved["context_gene_ids"])
  np.testing.assert_array_equal(context.to_numpy(), saved["context"])


@pytest.mark.slow  # the demo run, fine-tuned (demo_finetuned)
def test_predict_equals_the_predict_command(finetuned_model, demo_finetuned, demo_counts,
                                            tmp_path):
  out = tmp_path / "labels.csv"
  assert predict.main(["--checkpoint", str(demo_finetuned), "--input", str(demo_counts),
                       "--output", str(out)]) == 0
  written = _csv(out)
  adata = anndata.read_h5ad(demo_counts)
  frame = finetuned_model.predict(adata)
  assert list(frame.columns) == ["prediction", "confidence"]
  assert list(frame.index) == list(written["obs_name"]) == list(adata.obs_names)
  assert list(frame["prediction"]) == list(written["prediction"])
  np.testing.assert_array_equal(frame["confidence"].to_numpy(),
                                written["confidence"].to_numpy(np.float32))
  assert list(adata.obs["genemamba_prediction"]) == list(frame["prediction"])
  np.testing.assert_array_equal(adata.obs["genemamba_confidence"], frame["confidence"])
  assert adata.obsm["X_genemamba"].shape == (300, 32)
  assert finetuned_model.classes == sorted(set(adata.obs["bulk_labels"]))


@pytest.mark.slow
def test_label_transfer_and_perturb_equal_their_commands(demo_model, demo_run, demo_counts,
                                                         tmp_path):
  adata = anndata.read_h5ad(demo_counts)
  reference, query = adata[:200].copy(), adata[200:].copy()
  reference.write_h5ad(tmp_path / "reference.h5ad")
  query.write_h5ad(tmp_path / "query.h5ad")
  assert label_transfer.main([
      "--checkpoint", str(demo_run), "--reference", str(tmp_path / "reference.h5ad"),
      "--label-column", "bulk_labels", "--query", str(tmp_path / "query.h5ad"), "--output",
      str(tmp_path / "lt.csv"), "--k", "5", "--unknown-threshold", "0.5"]) == 0
  frame = demo_model.label_transfer(reference, query, label_column="bulk_labels", k=5,
                                    unknown_threshold=0.5)
  pd.testing.assert_frame_equal(frame.reset_index(), _csv(tmp_path / "lt.csv"))
  assert perturb.main(["--checkpoint", str(demo_run), "--input", str(demo_counts), "--genes",
                       "LYZ,NKG7", "--mode", "overexpress", "--target-column", "bulk_labels",
                       "--target", "CD56+ NK", "--output", str(tmp_path / "p.csv")]) == 0
  shifts = demo_model.perturb(adata, ["LYZ", "NKG7"], mode="overexpress",
                              target_column="bulk_labels", target="CD56+ NK")
  pd.testing.assert_frame_equal(shifts, _csv(tmp_path / "p.csv"))
  assert len(shifts) == 600 and (shifts["shift"] >= 0).all() and (shifts["shift"] > 0).any()


@pytest.mark.slow  # the demo run (demo_model)
def test_bad_input_raises_data_error(demo_model, tmp_path):
  with pytest.raises(gm.DataError, match="checkpoint not found"):
    gm.load(tmp_path / "no_run")
  with pytest.raises(gm.DataError, match="missing.h5ad: no such file"):
    demo_model.embed(tmp_path / "missing.h5ad")
  with pytest.raises(gm.DataError, match="expected an AnnData object or the path"):
    demo_model.embed(np.zeros((3, 4)))
  with pytest.raises(gm.DataError, match="batch_size=0 must be >= 1"):
    demo_model.embed(tmp_path / "missing.h5ad", batch_size=0)
  with pytest.raises(gm.DataError, match="not in the model's vocabulary"):
    demo_model.perturb(tmp_path / "missing.h5ad", "NOT_A_GENE")


@pytest.mark.slow  # the demo run (demo_model)
def test_predict_on_a_pretrained_run_says_it_needs_a_fine_tuned_one(demo_model, demo_counts):
  assert demo_model.classifier is None and demo_model.classes is None
  with pytest.raises(gm.DataError, match="predict needs a fine-tuned run"):
    demo_model.predict(demo_counts)


@pytest.mark.slow
def test_a_plain_script_without_main_guard_and_progress_off(demo_run, demo_counts, tmp_path):
  script = tmp_path / "script.py"
  script.write_text(textwrap.dedent(f"""
      import sys
      import anndata
      import genemamba_jax as gm

      adata = anndata.read_h5ad({str(demo_counts)!r})
      model = gm.load({str(demo_run)!r})
      gm.settings.progress = False
      quiet = model.embed(adata)
      print("--- progress on ---", file=sys.stderr, flush=True)
      gm.settings.progress = True
      loud = model.embed(adata, key_added="again")
      print(quiet.shape, bool((quiet == loud).all()))
      """), encoding="utf-8")
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "(300, 32) True"
  off, on = result.stderr.split("--- progress on ---")
  assert "cells" not in off and "%|" not in off, off
  assert "tokenizing" in on and "embedding" in on and "300/300 cells" in on
