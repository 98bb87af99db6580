"""`finetune` and `evaluate integration` on a SOMA experiment (tests/soma_experiment.py's Kang
subset) give what they give on the .h5ad of the same cells."""

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from genemamba_jax import inference, rundir
from genemamba_jax.data import soma_reader
from genemamba_jax.evaluate import __main__ as evaluate_cli
from genemamba_jax.evaluate import integration
from genemamba_jax.finetune import __main__ as finetune_cli
from genemamba_jax.finetune import config as config_lib
from genemamba_jax.finetune import run
from tests import soma_experiment

STIM = "condition == 'stim'"


@pytest.fixture(scope="module")
def kang(tmp_path_factory, tiledbsoma):
  """(.h5ad path, SOMA experiment path, the AnnData, .h5ad of its stim cells in order)."""
  out = tmp_path_factory.mktemp("kang_soma")
  h5ad, soma, adata = soma_experiment.write_kang(out)
  adata[adata.obs["condition"] == "stim"].copy().write_h5ad(out / "stim.h5ad")
  return h5ad, soma, adata, str(out / "stim.h5ad")


def test_to_anndata_holds_the_selected_cells_of_the_h5ad(kang):
  _, soma, adata, _ = kang
  source = soma_reader.SomaSource(soma, gene_column="feature_id",
                                  options=soma_reader.SomaOptions(obs_filter=STIM))
  got = source.to_anndata(["cell_type", "condition"], obsm=[soma_experiment.EMBEDDING])
  want = adata[adata.obs["condition"] == "stim"]
  assert got.obs_names.tolist() == want.obs_names.tolist()
  assert sp.issparse(got.X) and got.X.dtype == np.float32 and (got.X != want.X).nnz == 0
  pd.testing.assert_frame_equal(got.obs, want.obs[["cell_type", "condition"]],
                                check_names=False)
  assert got.var_names.tolist() == want.var["feature_id"].tolist()
  assert got.var["feature_id"].tolist() == want.var["feature_id"].tolist()
  np.testing.assert_array_equal(got.obsm[soma_experiment.EMBEDDING],
                                want.obsm[soma_experiment.EMBEDDING])
  with pytest.raises(Exception, match=r"has no obsm 'X_umap' \(--embedding\); obsm matrices "
                                      r"there are: X_pca10"):
    source.to_anndata(obsm=["X_umap"])


def _config(checkpoint, data, **data_keys):
  c = config_lib.default_config()
  c.init_checkpoint, c.data.input, c.data.max_len = str(checkpoint), str(data), 64
  c.num_steps, c.batch_size, c.log_every, c.val_fraction, c.test_fraction = 2, 16, 1, 0.2, 0.2
  for key, value in data_keys.items():
    c.data[key] = value
  return c


@pytest.mark.slow
def test_finetune_on_the_experiment_equals_finetune_on_the_h5ad(kang, kang_pretrained, tmp_path):
  _, soma, _, stim = kang
  configs = {"h5ad": _config(kang_pretrained, stim),
             "soma": _config(kang_pretrained, soma, obs_filter=STIM, measurement="RNA",
                             tiledb_config="vfs.s3.aws_secret_access_key=SECRET123")}
  # The cells, labels and tokens fine-tuning reads.
  tokenizer = rundir.load_pretrained(kang_pretrained).tokenizer(max_len=64, cls=True)
  read = {}
  for name, c in configs.items():
    adata, source, _ = run._read(c, ["cell_type"])  # pylint: disable=protected-access
    sentences, obs_names, obs = inference.tokenize_all(tokenizer, source, ["cell_type"],
                                                       desc=None)
    read[name] = adata, sentences, obs_names, obs["cell_type"].astype(str).tolist()
  (a, s, n, labels), (b, t, m, labels_soma) = read["h5ad"], read["soma"]
  assert n.tolist() == m.tolist() and labels == labels_soma and len(n) == 162
  assert (a.X != b.X).nnz == 0 and all(np.array_equal(x, y) for x, y in zip(s, t))
  # Training on them: the same splits, predictions and scores.
  metrics = {name: run.finetune(c, tmp_path / name) for name, c in configs.items()}
  assert metrics["soma"] == metrics["h5ad"]
  assert ((tmp_path / "soma" / "metrics.json").read_text()
          == (tmp_path / "h5ad" / "metrics.json").read_text())
  pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "soma" / "predictions.csv"),
                                pd.read_csv(tmp_path / "h5ad" / "predictions.csv"))
  # predictions.h5ad: the selected cells with the predictions; task.json: how to read them.
  written = anndata.read_h5ad(tmp_path / "soma" / "predictions.h5ad")
  assert written.obs_names.tolist() == n.tolist() and (written.X != a.X).nnz == 0
  assert {"cell_type", "condition", "genemamba_prediction"} <= set(written.obs.columns)
  assert written.obsm["X_genemamba"].shape[0] == 162
  data = json.loads((tmp_path / "soma" / "task.json").read_text())["data"]
  assert (data["measurement"], data["x_layer"], data["obs_filter"]) == ("RNA", "raw", STIM)
  assert "measurement" not in json.loads((tmp_path / "h5ad" / "task.json").read_text())["data"]
  # config.json keeps the TileDB settings' keys, never their values (they may be secrets).
  saved = (tmp_path / "soma" / "config.json").read_text()
  assert "vfs.s3.aws_secret_access_key" in saved and "SECRET123" not in saved


@pytest.mark.parametrize("key, message", [
    ("label_column=cell_types", "obs has no column 'cell_types'; columns there are: cell, "
                                "cell_type"),
    ("data.measurement=ATAC", "has no measurement 'ATAC' (--config.data.measurement); "
                              "measurements there are: RNA"),
    ("data.obs_filter=tissue == 'blood'", "--config.data.obs_filter \"tissue == 'blood'\": "
                                          "Column tissue does not exist"),
    ("data.obs_filter=condition == 'none'", "--config.data.obs_filter \"condition == 'none'\" "
                                            "selects no cells"),
    ("data.layer=counts", "has no X layer 'counts' (--config.data.layer); X layers there are: "
                          "raw"),
])
@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_finetune_bad_soma_settings_are_one_line_errors(kang, kang_pretrained, tmp_path, capsys,
                                                        key, message):
  _, soma, _, _ = kang
  status = finetune_cli.main(["--config", "configs/finetune.py", "--workdir",
                              str(tmp_path / "w"), f"--config.init_checkpoint={kang_pretrained}",
                              f"--config.data.input={soma}", f"--config.{key}"])
  err = capsys.readouterr().err.strip()
  assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert soma in err and message in err, err
  assert not (tmp_path / "w").exists()


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_finetune_obs_filter_on_an_h5ad_is_refused(kang, kang_pretrained, tmp_path):
  h5ad = kang[0]
  with pytest.raises(Exception, match="--config.data.obs_filter applies to SOMA experiments"):
    run.finetune(_config(kang_pretrained, h5ad, obs_filter=STIM), tmp_path / "w")
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_integration_metrics_on_the_experiment_equal_the_h5ad(kang, tmp_path, capsys):
  _, soma, _, stim = kang
  args = ["--embedding", soma_experiment.EMBEDDING, "--batch-column", "patient",
          "--label-column", "cell_type", "--n-pcs", "10", "--no-plots"]
  assert evaluate_cli.main(["integration", "--input", stim, "--out", str(tmp_path / "h5ad"),
                            *args]) == 0
  assert evaluate_cli.main(["integration", "--input", soma, "--out", str(tmp_path / "soma"),
                            "--measurement", "RNA", "--x-layer", "raw", "--obs-filter", STIM,
                            *args]) == 0
  capsys.readouterr()
  want = json.loads((tmp_path / "h5ad" / "metrics.json").read_text())
  assert json.loads((tmp_path / "soma" / "metrics.json").read_text()) == want
  assert set(want) == set(integration.METHODS)


@pytest.mark.parametrize("argv, message", [
    (["--embedding", "X_umap"], "has no obsm 'X_umap' (--embedding); obsm matrices there are: "
                                "X_pca10"),
    (["--batch-column", "donor"], "obs has no column 'donor'; columns there are: cell, "),
    (["--obs-filter", "tissue == 'blood'"], "--obs-filter \"tissue == 'blood'\": Column tissue"),
    (["--measurement", "ATAC"], "has no measurement 'ATAC' (--measurement)"),
])
def test_integration_bad_soma_options_are_one_line_errors(kang, tmp_path, capsys, argv, message):
  _, soma, _, _ = kang
  base = {"--embedding": soma_experiment.EMBEDDING, "--batch-column": "patient"}
  base.update(dict(zip(argv[::2], argv[1::2])))
  status = evaluate_cli.main(["integration", "--input", soma, "--label-column", "cell_type",
                              "--out", str(tmp_path / "o"),
                              *[x for kv in base.items() for x in kv]])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and soma in err[-1] and message in err[-1], err
  assert all(line.startswith("integration: ") for line in err[:-1])  # progress lines, no trace
  assert not (tmp_path / "o").exists()
