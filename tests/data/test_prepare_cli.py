"""The prepare CLI end to end: outputs, resume, workers, medians, and every bad input."""

import os
import pickle
import re

import numpy as np
import pytest

from genemamba_jax import prepare
from genemamba_jax.data import read_tokenized
from genemamba_jax.data import records
from genemamba_jax.data import vocab as vocab_lib
from tests import oracles

GENES = [f"ENSG{i:05d}" for i in range(300)]


def run(capsys, *argv):
  """Runs the CLI; returns (exit status, stdout, stderr)."""
  status = prepare.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out, err


@pytest.fixture
def vocab_dir(tmp_path):
  medians = dict(zip(GENES, np.linspace(0.5, 5.0, len(GENES))))
  vocab_lib.save_vocab_dir(tmp_path / "vocab", vocab_lib.Vocab.from_genes(GENES), medians,
                           {"median_space": "normalized"})
  return tmp_path / "vocab"


@pytest.fixture
def counts_file(tmp_path):
  X = oracles.random_counts(120, 300, density=0.5, seed=2)
  obs = {"cell_type": np.array(["T", "B", "NK"])[np.arange(120) % 3],
         "donor": np.array(["d1", "d2"])[np.arange(120) % 2]}
  return oracles.write_h5ad(tmp_path / "counts.h5ad", X, GENES, obs=obs)


def tokenize(capsys, counts_file, vocab_dir, out, *extra):
  return run(capsys, "tokenize", "--input", counts_file, "--vocab", vocab_dir, "--out", out,
             "--min-genes", 10, "--label-column", "cell_type", "--batch-column", "donor", *extra)


def test_tokenize_writes_shards_manifest_and_summary(capsys, tmp_path, counts_file, vocab_dir):
  status, out, err = tokenize(capsys, counts_file, vocab_dir, tmp_path / "tok", "--cls", "--eos",
                              "--max-len", 64, "--cells-per-shard", 50)
  assert status == 0, err
  assert "cells read: 120" in out and "cells kept: 120" in out
  assert "genes matched: 300 of 300" in out
  manifest = records.load_manifest(tmp_path / "tok")
  assert manifest["num_cells"] == 120 and [s["num_cells"] for s in manifest["shards"]] == [50, 50, 20]
  assert manifest["labels"] == ["B", "NK", "T"] and manifest["batches"] == ["d1", "d2"]
  assert manifest["vocab"]["<cls>"] == 2 and manifest["special_ids"]["eos"] == 3
  assert manifest["settings"]["max_len"] == 64 and manifest["token_dtype"] == "uint16"
  cells = list(read_tokenized(tmp_path / "tok"))
  assert [c["obs_name"] for c in cells] == [f"cell{i}" for i in range(120)]
  assert all(c["tokens"][0] == 2 and c["tokens"][-1] == 3 and len(c["tokens"]) <= 64 for c in cells)
  assert cells[4]["label"] == "B" and cells[4]["batch"] == "d1"
  assert cells[0]["source"] == os.path.realpath(counts_file)


def test_progress_bars_show_whole_cell_counts_and_end_once(capsys, tmp_path, counts_file,
                                                           vocab_dir):
  status, _, err = tokenize(capsys, counts_file, vocab_dir, tmp_path / "tok",
                            "--cells-per-shard", 50)
  assert status == 0, err
  frames = [f for f in re.split(r"[\r\n]", err) if f.startswith("tokenize")]
  assert "| 0/120 cells" in frames[0]  # tqdm's unit_scale would show "0.00/120"
  assert not [f for f in frames if "0.00/" in f]
  assert "| 120/120 cells" in frames[-1]
  assert sum("100%" in f for f in frames) == 1  # the final state is drawn once
  assert err.endswith("\n")  # and its line is ended


def test_rerun_skips_finished_shards_and_redoes_unfinished(capsys, tmp_path, counts_file, vocab_dir):
  out = tmp_path / "tok"
  assert tokenize(capsys, counts_file, vocab_dir, out, "--cells-per-shard", 40)[0] == 0
  first = [c["tokens"] for c in read_tokenized(out)]
  mtimes = {p: os.stat(out / "shards" / p).st_mtime_ns for p in ("00000.array_record",
                                                                  "00002.array_record")}
  # An interrupted run: shard 1 never got its sidecar, and its temp file is gone.
  os.remove(out / "shards" / "00001.json")
  os.remove(out / "manifest.json")
  assert tokenize(capsys, counts_file, vocab_dir, out, "--cells-per-shard", 40)[0] == 0
  assert {p: os.stat(out / "shards" / p).st_mtime_ns for p in mtimes} == mtimes
  again = [c["tokens"] for c in read_tokenized(out)]
  assert len(again) == len(first) and all(np.array_equal(a, b) for a, b in zip(first, again))
  assert not [p for p in os.listdir(out / "shards") if p.endswith(".tmp")]
  # Other settings into the same directory are refused.
  status, _, err = tokenize(capsys, counts_file, vocab_dir, out, "--cells-per-shard", 40,
                            "--max-len", 100)
  assert status == 2 and "other settings (differing: tokenize)" in err


@pytest.mark.slow  # over ~10 s on 2 cores
def test_workers_give_the_same_dataset(capsys, tmp_path, counts_file, vocab_dir):
  assert tokenize(capsys, counts_file, vocab_dir, tmp_path / "a", "--cells-per-shard", 30)[0] == 0
  assert tokenize(capsys, counts_file, vocab_dir, tmp_path / "b", "--cells-per-shard", 30,
                  "--workers", 2)[0] == 0
  a, b = list(read_tokenized(tmp_path / "a")), list(read_tokenized(tmp_path / "b"))
  assert [c["obs_name"] for c in a] == [c["obs_name"] for c in b]
  assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))


@pytest.mark.slow  # over ~5 s on 2 cores
def test_medians_vocab_dir_and_merge(capsys, tmp_path, shared_data):
  kang = shared_data / "kang_pbmc_ifnb.h5ad"
  status, out, err = run(capsys, "medians", "--input", kang, "--out", tmp_path / "v",
                         "--gene-column", "ensembl_id", "--gene-table",
                         shared_data / "genes" / "grch38_ens109_genes.tsv.gz")
  assert status == 0, err
  vocab, medians, info = vocab_lib.load_vocab_dir(tmp_path / "v")
  assert [vocab.token_to_id[t] for t in ("<pad>", "<mask>", "<cls>", "<eos>")] == [0, 1, 2, 3]
  assert vocab.gene_ids == sorted(vocab.gene_ids) and len(vocab) == len(medians) + 4
  assert info["median_space"] == "normalized" and info["summary"]["dropped_min_genes"] > 0
  assert (tmp_path / "v" / "digests.json").exists()
  # Exact non-zero medians over the kept cells, for genes with >= 100 values.
  import anndata
  adata = anndata.read_h5ad(kang)
  from genemamba_jax.data import genes as genes_lib
  allowed = genes_lib.genes_with_biotypes(genes_lib.load_gene_table(
      shared_data / "genes" / "grch38_ens109_genes.tsv.gz"))
  in_table = np.isin(adata.var["ensembl_id"], list(allowed))
  kept = np.asarray((adata.X[:, in_table] > 0).sum(axis=1)).ravel() >= 200
  assert info["summary"]["cells_kept"] == kept.sum()
  X = adata.X[kept]
  norm = X.multiply(1e4 / X.sum(axis=1)).tocsc()
  checked = 0
  for j, gene in enumerate(adata.var["ensembl_id"]):
    values = norm.data[norm.indptr[j]:norm.indptr[j + 1]]
    if gene in medians and len(values) >= 100:
      assert medians[gene] == pytest.approx(np.median(values), rel=0.01), gene
      checked += 1
  assert checked > 300
  # Two halves digested apart and merged give the same medians.
  ids = list(adata.var["ensembl_id"])
  for name, part in (("h1", adata[:700]), ("h2", adata[700:])):
    oracles.write_h5ad(tmp_path / f"{name}.h5ad", part.X, ids)
    assert run(capsys, "medians", "--input", tmp_path / f"{name}.h5ad", "--out", tmp_path / name,
               "--gene-table", shared_data / "genes" / "grch38_ens109_genes.tsv.gz")[0] == 0
  assert run(capsys, "merge-medians", "--input", tmp_path / "h1", tmp_path / "h2",
             "--out", tmp_path / "merged")[0] == 0
  _, merged, _ = vocab_lib.load_vocab_dir(tmp_path / "merged")
  assert merged.keys() == medians.keys()
  for gene, m in medians.items():
    assert merged[gene] == pytest.approx(m, rel=0.01 if m > 0 else 0)


def test_import_geneformer(capsys, tmp_path, shared_data):
  folder = shared_data / "geneformer_30m"
  status, out, _ = run(capsys, "import-geneformer", "--token-dictionary",
                       folder / "token_dictionary.pkl", "--median-dictionary",
                       folder / "gene_median_dictionary.pkl", "--out", tmp_path / "gf")
  assert status == 0 and "25,428 tokens, 25,424 gene medians" in out and "<cls>=25426" in out


# --- Bad input: one-line error naming the file and the fix; nothing left behind. ---

def _expect_error(capsys, tmp_path, argv, *fragments):
  status, out, err = run(capsys, *argv)
  assert status == 2, (out, err)
  # The error is the last line of stderr, on a line of its own: a progress bar may come
  # before it, but is closed (its line ended) first.
  err = err.rstrip("\n").split("\n")[-1]
  assert err.startswith("error: ") and "\r" not in err, err
  for fragment in fragments:
    assert fragment in err, err
  out_dir = tmp_path / "out"
  assert not (out_dir / "manifest.json").exists()
  leftovers = [p for p in (out_dir / "shards").glob("*")] if (out_dir / "shards").exists() else []
  assert not [p for p in leftovers if p.suffix in (".tmp", ".array_record")], leftovers
  return err


def _tok_argv(path, vocab_dir, tmp_path, *extra):
  return ["tokenize", "--input", path, "--vocab", vocab_dir, "--out", tmp_path / "out",
          "--min-genes", 1, *extra]


def test_error_log_normalized_counts_name_the_layer(capsys, tmp_path, vocab_dir):
  X = oracles.random_counts(20, 300, seed=4)
  path = oracles.write_h5ad(tmp_path / "lognorm.h5ad", np.log1p(X.toarray()), GENES,
                            layers={"counts": X})
  _expect_error(capsys, tmp_path, _tok_argv(path, vocab_dir, tmp_path), "lognorm.h5ad",
                "non-integer values", "use --layer", "counts")
  assert run(capsys, *_tok_argv(path, vocab_dir, tmp_path, "--layer", "counts"))[0] == 0


@pytest.mark.parametrize("bad, what", [(-1.0, "negative values"), (np.nan, "NaN")])
def test_error_negative_or_nan(capsys, tmp_path, vocab_dir, bad, what):
  X = oracles.random_counts(20, 300, seed=5).toarray()
  X[3, 7] = bad
  path = oracles.write_h5ad(tmp_path / "bad.h5ad", X, GENES)
  _expect_error(capsys, tmp_path, _tok_argv(path, vocab_dir, tmp_path), "bad.h5ad", what,
                "cell 'cell3'", "ENSG00007")


def test_error_missing_gene_column_lists_columns(capsys, tmp_path, counts_file, vocab_dir):
  _expect_error(capsys, tmp_path, _tok_argv(counts_file, vocab_dir, tmp_path, "--gene-column",
                                            "ensembl"),
                "counts.h5ad", "no column 'ensembl'", "columns there are: (none)")


def test_error_missing_label_column(capsys, tmp_path, counts_file, vocab_dir):
  _expect_error(capsys, tmp_path, _tok_argv(counts_file, vocab_dir, tmp_path, "--label-column",
                                            "celltype"),
                "obs has no column 'celltype'", "cell_type, donor")


def test_error_no_gene_matches(capsys, tmp_path, vocab_dir):
  path = oracles.write_h5ad(tmp_path / "symbols.h5ad", oracles.random_counts(5, 3),
                            ["CD3E", "CD19", "MS4A1"])
  _expect_error(capsys, tmp_path, _tok_argv(path, vocab_dir, tmp_path), "symbols.h5ad",
                "none of its 3 gene ids", "--gene-map")


def test_error_zero_cells_after_qc(capsys, tmp_path, counts_file, vocab_dir):
  err = _expect_error(capsys, tmp_path, _tok_argv(counts_file, vocab_dir, tmp_path) +
                      ["--min-genes", 10_000], "counts.h5ad", "no cell is left after QC",
                      "120 with too few expressed")
  assert "--min-genes" in err


def test_error_truncated_h5ad(capsys, tmp_path, counts_file, vocab_dir):
  data = open(counts_file, "rb").read()
  path = tmp_path / "truncated.h5ad"
  path.write_bytes(data[:len(data) // 2])
  _expect_error(capsys, tmp_path, _tok_argv(path, vocab_dir, tmp_path), "truncated.h5ad",
                "truncated or corrupt")
  garbage = tmp_path / "garbage.h5ad"
  garbage.write_bytes(b"not hdf5 at all" * 100)
  _expect_error(capsys, tmp_path, _tok_argv(garbage, vocab_dir, tmp_path), "garbage.h5ad")


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch /tmp/genemamba_pwned",))


def test_error_pickle_with_code(capsys, tmp_path, shared_data):
  evil = tmp_path / "token_dictionary.pkl"
  evil.write_bytes(pickle.dumps({"<pad>": 0, "x": _Evil()}))
  _expect_error(capsys, tmp_path, ["import-geneformer", "--token-dictionary", evil,
                                   "--median-dictionary",
                                   shared_data / "geneformer_30m" / "gene_median_dictionary.pkl",
                                   "--out", tmp_path / "out"],
                "token_dictionary.pkl", "refusing to unpickle")
  assert not os.path.exists("/tmp/genemamba_pwned")
  assert not (tmp_path / "out").exists()


def test_error_not_a_tokenized_dir_or_vocab(capsys, tmp_path, counts_file):
  _expect_error(capsys, tmp_path, ["tokenize", "--input", counts_file, "--vocab",
                                   tmp_path / "nope", "--out", tmp_path / "out"],
                "vocabulary directory not found")
