"""SOMA experiments as input (genemamba_jax.data.soma_reader): a subset of the Kang PBMCs written
by `tiledbsoma.io.from_anndata` reads, tokenizes and embeds exactly like the .h5ad it came from."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from genemamba_jax import embed, label_transfer, perturb, prepare, rundir
from genemamba_jax.data import read_tokenized, readers, soma_reader
from genemamba_jax.data.tokenizer import CellTokenizer, TokenizeConfig
from tests import soma_experiment

MIN_GENES = "100"


@pytest.fixture(scope="module")
def kang(tmp_path_factory, tiledbsoma):
  """(.h5ad path, SOMA experiment path, the AnnData): tests/soma_experiment.py's Kang subset."""
  return soma_experiment.write_kang(tmp_path_factory.mktemp("kang_soma"))


def run(capsys, main, *argv):
  status = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out, err


@pytest.fixture(scope="module")
def vocab(kang, tmp_path_factory):
  out = tmp_path_factory.mktemp("vocab") / "vocab"
  assert prepare.main(["medians", "--input", kang[0], "--gene-column", "feature_id",
                       "--min-genes", MIN_GENES, "--out", str(out)]) == 0
  return str(out)


def _tokenize(capsys, input_path, vocab, out, *extra):
  status, _, err = run(capsys, prepare.main, "tokenize", "--input", input_path, "--vocab", vocab,
                       "--out", out, "--gene-column", "feature_id", "--min-genes", MIN_GENES,
                       "--cls", "--max-len", 96, "--label-column", "cell_type", *extra)
  assert status == 0, err
  return list(read_tokenized(out))


def test_chunks_equal_the_h5ad_rows_whatever_the_chunk_size(kang):
  h5ad, soma, adata = kang
  source = readers.open_source(soma, gene_column="feature_id")
  assert isinstance(source, soma_reader.SomaSource) and source.layer == "raw"
  assert source.n_cells == adata.n_obs
  np.testing.assert_array_equal(source.gene_ids, adata.var["feature_id"].to_numpy())
  whole = list(source.chunks(10_000, columns=["cell_type"]))
  tiny = list(source.chunks(7, columns=["cell_type"]))
  assert len(whole) == 1 and len(tiny) == -(-adata.n_obs // 7)
  for chunks in (whole, tiny):
    counts = sp.vstack([c.counts for c in chunks]).tocsr()
    assert (counts != adata.X).nnz == 0
    assert np.concatenate([c.obs_names for c in chunks]).tolist() == list(adata.obs_names)
    labels = np.concatenate([c.obs["cell_type"].astype(str).to_numpy() for c in chunks])
    np.testing.assert_array_equal(labels, adata.obs["cell_type"].astype(str).to_numpy())
  part = list(source.chunks(5, start=11, stop=23))
  assert [c.start for c in part] == [11, 16, 21]
  assert np.concatenate([c.obs_names for c in part]).tolist() == list(adata.obs_names[11:23])


def test_tiny_tokenizer_chunks_give_the_same_sentences(kang, vocab):
  h5ad, soma, _ = kang
  sentences = []
  for path, chunk in ((h5ad, 1024), (soma, 3)):
    config = TokenizeConfig(max_len=96, cls=True, min_genes=0, primary_only=False,
                            chunk_size=chunk)
    tokenizer = CellTokenizer.from_vocab_dir(vocab, config)
    source = readers.open_source(path, gene_column="feature_id")
    sentences.append([s for cells in tokenizer.tokenize_source(source)
                      for s in cells.sentences()])
  assert len(sentences[0]) == len(sentences[1])
  for a, b in zip(*sentences):
    np.testing.assert_array_equal(a, b)


def test_prepare_tokens_and_medians_equal_the_h5ad(capsys, kang, vocab, tmp_path):
  h5ad, soma, adata = kang
  want = _tokenize(capsys, h5ad, vocab, tmp_path / "from_h5ad")
  got = _tokenize(capsys, soma, vocab, tmp_path / "from_soma", "--measurement", "RNA",
                  "--x-layer", "raw")
  assert len(got) == len(want) > 0
  # Non-primary cells are dropped from both.
  assert not {c["obs_name"] for c in got} & set(adata.obs_names[::7])
  for a, b in zip(got, want):
    assert a["obs_name"] == b["obs_name"] and a["label"] == b["label"]
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  # The medians read from the experiment are the .h5ad's too.
  assert prepare.main(["medians", "--input", soma, "--gene-column", "feature_id",
                       "--min-genes", MIN_GENES, "--out", str(tmp_path / "vocab")]) == 0
  capsys.readouterr()
  for name in ("vocab.json", "medians.json"):
    assert (tmp_path / "vocab" / name).read_text() == (Path(vocab) / name).read_text()


def test_obs_filter_selects_the_cells(capsys, kang, vocab, tmp_path):
  _, soma, adata = kang
  got = _tokenize(capsys, soma, vocab, tmp_path / "stim", "--obs-filter",
                  "is_primary_data == True and condition == 'stim' and cell_type != 'B cells'")
  obs = adata.obs
  chosen = obs[obs["is_primary_data"] & (obs["condition"] == "stim")
               & (obs["cell_type"] != "B cells")].index
  names = [c["obs_name"] for c in got]
  assert len(names) > 10 and set(names) <= set(chosen)
  assert names == [n for n in obs.index if n in set(names)]  # in the experiment's order
  # The cells the filter kept are exactly those QC keeps of the unfiltered experiment.
  everything = {c["obs_name"]
                for c in read_tokenized(_tokenized_all(capsys, soma, vocab, tmp_path))}
  assert set(names) == everything & set(chosen)


def _tokenized_all(capsys, soma, vocab, tmp_path):
  out = tmp_path / "all"
  _tokenize(capsys, soma, vocab, out)
  return out


@pytest.mark.parametrize("argv, message", [
    (["--measurement", "ATAC"], "has no measurement 'ATAC' (--measurement); measurements there "
                                "are: RNA"),
    (["--layer", "counts"], "has no X layer 'counts' (--layer); X layers there are: raw"),
    (["--gene-column", "gene_ids"], "var has no column 'gene_ids' (--gene-column); columns there "
                                    "are: gene, ensembl_id, symbol, feature_id"),
    (["--obs-filter", "tissue == 'blood'"], "--obs-filter \"tissue == 'blood'\": Column tissue "
                                            "does not exist"),
    (["--tiledb-config", "novalue"], "--tiledb-config 'novalue': write it KEY=VALUE"),
])
def test_bad_options_name_the_value_and_the_choices(capsys, kang, vocab, tmp_path, argv, message):
  _, soma, _ = kang
  status, _, err = run(capsys, prepare.main, "tokenize", "--input", soma, "--vocab", vocab,
                       "--out", tmp_path / "out", *argv)
  assert status == 2
  line = err.strip().splitlines()[-1]
  assert message in line and len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert not (tmp_path / "out").exists()


def test_not_an_experiment(capsys, kang, vocab, tmp_path):
  h5ad, soma, _ = kang
  status, _, err = run(capsys, prepare.main, "tokenize", "--input", f"{soma}/ms", "--vocab",
                       vocab, "--out", tmp_path / "out")
  assert status == 2
  assert "ms: not a SOMA experiment (it is a SOMACollection; its members: RNA" in err
  status, _, err = run(capsys, prepare.main, "tokenize", "--input", h5ad, "--vocab", vocab,
                       "--out", tmp_path / "out", "--obs-filter", "is_primary_data == True")
  assert status == 2 and "--obs-filter applies to SOMA experiments" in err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.eval_fraction is 0")
def test_embed_label_transfer_perturb_give_the_h5ad_results(capsys, kang, vocab, tmp_path):
  from genemamba_jax.train import loop  # pylint: disable=g-import-not-at-top
  from genemamba_jax.train.config import default_config  # pylint: disable=g-import-not-at-top
  h5ad, soma, adata = kang
  tokens = tmp_path / "tokens"
  _tokenize(capsys, h5ad, vocab, tokens)
  c = default_config()  # a tiny model, two steps: any weights tell two inputs apart
  c.data.path, c.data.max_len, c.data.eval_fraction = str(tokens), 96, 0.0
  c.batch_size, c.num_steps = 8, 2
  c.model.update(d_model=32, n_layers=1, d_state=16, headdim=16)
  c.log_every = c.checkpoint_every = c.eval_every = 2
  loop.train_and_evaluate(c, str(tmp_path / "run"))
  outputs = []
  for path, extra in ((h5ad, []), (soma, ["--x-layer", "raw", "--obs-filter",
                                          "condition == 'stim'"])):
    out = tmp_path / f"{len(outputs)}.npz"
    status, _, err = run(capsys, embed.main, "--checkpoint", tmp_path / "run", "--input", path,
                         "--output", out, "--gene-column", "feature_id", "--batch-size", 32,
                         *extra)
    assert status == 0, err
    outputs.append(np.load(out))
  stim = np.flatnonzero(adata.obs["condition"].to_numpy() == "stim")
  assert outputs[1]["obs_names"].tolist() == outputs[0]["obs_names"][stim].tolist()
  np.testing.assert_array_equal(outputs[1]["cls"], outputs[0]["cls"][stim])
  # label_transfer and perturb read the experiment through the same reader.
  model = rundir.load_pretrained(tmp_path / "run")
  isg15 = adata.var.loc["ISG15", "feature_id"]
  results = [(label_transfer.label_transfer(model, h5ad, "cell_type", query, k=5,
                                            gene_column="feature_id", progress=False),
              perturb.perturb(model, query, [isg15], "delete", gene_column="feature_id",
                              progress=False))
             for query in (h5ad, soma)]
  for want, got in zip(*results):
    assert len(got) == adata.n_obs
    pd.testing.assert_frame_equal(got, want)


def test_tiledb_config_values_are_not_written(capsys, kang, vocab, tmp_path):
  _, soma, _ = kang
  out = tmp_path / "tok"
  got = _tokenize(capsys, soma, vocab, out, "--tiledb-config",
                  "vfs.s3.aws_secret_access_key=SECRET123", "--tiledb-config", "vfs.s3.region=x")
  assert got
  for name in ("manifest.json", "tokenize_settings.json"):
    text = (out / name).read_text()
    assert "SECRET123" not in text and "vfs.s3.aws_secret_access_key" in text
