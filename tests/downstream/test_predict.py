"""predict: a fine-tuned run's cell types for new cells, every cell in input order, CSV or .h5ad."""

import anndata
import numpy as np
import pandas as pd
import pytest

from genemamba_jax import embed, predict


def _args(run, cells, output, *extra):
  return ["--checkpoint", str(run), "--input", str(cells), "--output", str(output),
          *map(str, extra)]


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


@pytest.fixture(scope="module")
def predicted_csv(tmp_path_factory, demo_finetuned, demo_counts):
  out = tmp_path_factory.mktemp("predict") / "new" / "labels.csv"  # a missing folder is made
  assert predict.main(_args(demo_finetuned, demo_counts, out)) == 0
  return out


@pytest.mark.slow  # the demo run, fine-tuned (demo_finetuned)
def test_csv_every_cell_in_input_order_as_finetune_scored_them(predicted_csv, demo_finetuned,
                                                                demo_counts):
  frame = pd.read_csv(predicted_csv, float_precision="round_trip")
  assert list(frame.columns) == ["obs_name", "prediction", "confidence"]
  assert list(frame["obs_name"]) == list(anndata.read_h5ad(demo_counts).obs_names)
  # The cells finetune trained on: its predictions.csv holds the same classifier's answers.
  scored = pd.read_csv(demo_finetuned / "predictions.csv")
  assert list(scored["obs_name"]) == list(frame["obs_name"])
  assert list(scored["pred"]) == list(frame["prediction"])
  np.testing.assert_allclose(frame["confidence"], scored["confidence"], atol=1e-6)
  classes = set(predict.load_classifier(demo_finetuned).classes)
  assert set(frame["prediction"]) <= classes
  assert frame["confidence"].between(1 / len(classes), 1.0).all()


@pytest.mark.slow
def test_h5ad_output_is_the_input_with_obs_and_obsm(predicted_csv, demo_finetuned, demo_counts,
                                                    tmp_path):
  out = tmp_path / "labels.h5ad"
  assert predict.main(_args(demo_finetuned, demo_counts, out, "--batch-size", 7)) == 0
  labelled, source = anndata.read_h5ad(out), anndata.read_h5ad(demo_counts)
  frame = pd.read_csv(predicted_csv, float_precision="round_trip")
  assert list(labelled.obs_names) == list(source.obs_names)
  np.testing.assert_array_equal(labelled.X.toarray(), source.X.toarray())
  assert list(labelled.obs["bulk_labels"]) == list(source.obs["bulk_labels"])
  # batch 7 vs 64: the same labels; probabilities to float rounding
  assert list(labelled.obs[predict.PREDICTION]) == list(frame["prediction"])
  np.testing.assert_allclose(labelled.obs[predict.CONFIDENCE], frame["confidence"], atol=1e-5)
  # obsm holds the fine-tuned run's cell embeddings: what `embed` gives for that run.
  (embedded,) = embed.embed_file(demo_finetuned, demo_counts, progress=False).cells.values()
  assert labelled.obsm[predict.OBSM_KEY].shape == embedded.shape
  np.testing.assert_allclose(labelled.obsm[predict.OBSM_KEY], embedded, atol=1e-5)


@pytest.mark.slow  # the demo run (demo_run)
def test_a_pretrained_only_run_is_refused(demo_run, demo_counts, tmp_path, capsys):
  out = tmp_path / "labels.csv"
  assert predict.main(_args(demo_run, demo_counts, out)) == 2
  line = _one_error_line(capsys)
  assert str(demo_run) in line and "needs a fine-tuned run" in line
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # the demo run, fine-tuned (demo_finetuned)
def test_bad_input_is_one_line_and_writes_nothing(demo_finetuned, demo_counts, tmp_path, capsys):
  out = tmp_path / "labels.csv"
  assert predict.main(_args(demo_finetuned, tmp_path / "missing.h5ad", out)) == 2
  assert "missing.h5ad: no such file" in _one_error_line(capsys)
  assert predict.main(_args(demo_finetuned, demo_counts, tmp_path / "labels.tsv")) == 2
  assert "name it OUT.csv or OUT.h5ad" in _one_error_line(capsys)
  assert predict.main(_args(tmp_path / "no_run", demo_counts, out)) == 2
  assert "checkpoint not found" in _one_error_line(capsys)
  assert predict.main(_args(demo_finetuned, demo_counts, out, "--layer", "counts")) == 2
  assert "has no layer 'counts'" in _one_error_line(capsys)
  assert list(tmp_path.iterdir()) == []


def test_help_exits_0_and_every_option_has_help(capsys):
  actions = predict.build_parser()._actions  # pylint: disable=protected-access
  assert [a.dest for a in actions if not a.help] == []
  with pytest.raises(SystemExit) as exit_:
    predict.main(["--help"])
  assert exit_.value.code == 0
  shown = capsys.readouterr().out
  for flag in ("--checkpoint", "--input", "--output", "--layer", "--gene-column", "--gene-map",
               "--batch-size", "--max-len"):
    assert flag in shown
