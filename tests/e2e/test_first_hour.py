"""A newcomer's first hour: the usual mistakes get one-line errors that say what to do, and
nothing is left half-written. One test (or more) per item of the issue that listed them."""

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import anndata
import numpy as np
import pytest

from genemamba_jax import errors, prepare, signals
from genemamba_jax.errors import DataError
from tests import oracles
from tests.conftest import require_parity

ROOT = Path(__file__).resolve().parents[2]
# A tiny demo run: a few seconds of training once the demo data is cached.
TINY = ["--config.num_steps=4", "--config.batch_size=8", "--config.data.max_len=64",
        "--config.model.d_model=32", "--config.model.headdim=16", "--config.model.d_state=8",
        "--config.log_every=1", "--config.eval_every=2", "--config.eval_batches=1",
        "--config.checkpoint_every=2"]


def command(module: str, *args, env=None, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=900, **kwargs)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment with the demo data cached once for the module."""
  return dict(os.environ, GENEMAMBA_CACHE=str(tmp_path_factory.mktemp("cache")))


def one_error_line(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  return lines[0]


def train(workdir, *extra, env):
  return command("genemamba_jax.train", "--config", "configs/demo.py", "--workdir", workdir,
                 *TINY, *extra, env=env)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp("run")
  result = train(workdir, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


# --- wrong results and broken state ------------------------------------------------------------


def test_1_data_path_wins_over_the_demo_config(tmp_path, env):
  # The demo config used to train on its own data whatever data.path said.
  line = one_error_line(train(tmp_path / "run", f"--config.data.path={tmp_path / 'mine'}", env=env))
  assert str(tmp_path / "mine") in line
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # tokenizes Kang and trains 4 steps on it
def test_1_the_given_data_path_is_what_trains(tmp_path, env, shared_data):
  kang, vocab, tokens = shared_data / "kang_pbmc_ifnb.h5ad", tmp_path / "vocab", tmp_path / "tokens"
  assert prepare.main(["medians", "--input", str(kang), "--out", str(vocab)]) == 0
  assert prepare.main(["tokenize", "--input", str(kang), "--vocab", str(vocab), "--out",
                       str(tokens)]) == 0
  result = train(tmp_path / "run", f"--config.data.path={tokens}", env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  # The run holds Kang's vocabulary, not the demo's.
  trained = json.loads((tmp_path / "run" / "vocab" / "vocab.json").read_text())
  assert trained == json.loads((vocab / "vocab.json").read_text())
  assert json.loads((tmp_path / "run" / "model.json").read_text())["vocab_size"] >= len(trained)
  assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["path"] == str(tokens)


@pytest.mark.slow
def test_2_a_changed_model_is_refused_before_anything_is_written(finished_run, env):
  before = {p.name: p.read_bytes() for p in finished_run.glob("*.json")}
  line = one_error_line(train(finished_run, "--config.model.d_model=64", env=env))
  assert "model.d_model 32 -> 64" in line and "new --workdir" in line
  assert {p.name: p.read_bytes() for p in finished_run.glob("*.json")} == before
  # ... and the run is still usable.
  assert command("genemamba_jax.train", "--config", "configs/demo.py", "--workdir",
                 finished_run, *TINY, env=env).returncode == 0


@pytest.mark.slow
def test_3_rerunning_a_finished_run_says_so_and_writes_nothing(finished_run, env):
  events = sorted((finished_run / "tensorboard").iterdir())
  metrics = (finished_run / "metrics.jsonl").read_bytes()
  result = train(finished_run, env=env)
  assert result.returncode == 0
  assert "already finished: step 4" in result.stdout and "nan" not in result.stdout
  assert sorted((finished_run / "tensorboard").iterdir()) == events
  assert (finished_run / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.slow
def test_4_ctrl_c_saves_a_checkpoint_and_each_step_is_logged_once(tmp_path, env):
  workdir = tmp_path / "run"
  args = ["--config.num_steps=400", "--config.checkpoint_every=1000", "--config.eval_every=1000"]
  process = subprocess.Popen(
      [sys.executable, "-m", "genemamba_jax.train", "--config", "configs/demo.py", "--workdir",
       str(workdir), *TINY, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 600
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
    time.sleep(0.2)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=600)
  assert process.returncode == signals.INTERRUPTED, err[-3000:]
  assert "Traceback" not in err and "saved a checkpoint at step" in err
  saved = int(err.split("saved a checkpoint at step ")[1].split()[0])
  assert (workdir / "checkpoints" / str(saved) / "state").is_dir()
  # Stale rows logged after the checkpoint must not survive a resume: cut the log back.
  with open(metrics, "a", encoding="utf-8") as f:
    f.write(json.dumps({"step": saved + 1, "loss": 1.0}) + "\n" + '{"step": 99')
  result = train(workdir, "--config.num_steps=" + str(saved + 3), *args[1:], env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  steps = [row["step"] for row in map(json.loads, metrics.read_text().splitlines())
           if "loss" in row]
  assert steps == sorted(set(steps)) and steps[-1] == saved + 3


@pytest.mark.slow  # over ~10 s on 2 cores
def test_5_failed_runs_leave_no_debris(tmp_path, env):
  one_error_line(train(tmp_path / "train", "--config.model.mixer=mamba3", env=env))
  assert not (tmp_path / "train").exists()
  result = command("genemamba_jax.finetune", "--config", "configs/finetune.py", "--workdir",
                   tmp_path / "finetune", "--config.init_checkpoint=/nonexistent",
                   "--config.data.input=/nonexistent.h5ad", env=env)
  one_error_line(result)
  assert not (tmp_path / "finetune").exists()


def test_5_prepare_tokenize_failure_leaves_no_out_dir(tmp_path, capsys):
  genes = [f"ENSG{i:05d}" for i in range(50)]
  from genemamba_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  vocab_lib.save_vocab_dir(tmp_path / "vocab", vocab_lib.Vocab.from_genes(genes),
                           dict.fromkeys(genes, 1.0), {"median_space": "normalized"})
  x = oracles.random_counts(20, 50, density=0.5, seed=0).astype(np.float32) * 0.5  # not counts
  path = oracles.write_h5ad(tmp_path / "lognorm.h5ad", x, genes)
  assert prepare.main(["tokenize", "--input", str(path), "--vocab", str(tmp_path / "vocab"),
                       "--out", str(tmp_path / "tokens"), "--min-genes", "0"]) == 2
  assert "non-integer" in capsys.readouterr().err
  assert not (tmp_path / "tokens").exists()


# --- errors that say what to do ----------------------------------------------------------------


@pytest.mark.slow  # over ~10 s on 2 cores
def test_6_misspelt_config_path_and_help(tmp_path):
  line = one_error_line(command("genemamba_jax.train", "--config", "configs/dmeo.py",
                                "--workdir", tmp_path))
  assert "no such file" in line and "demo.py" in line
  for module in ("genemamba_jax.train", "genemamba_jax.finetune"):
    result = command(module, "--help")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # over ~10 s on 2 cores
def test_7_a_wrong_nested_key_gets_the_keys_of_its_section(tmp_path):
  line = one_error_line(command("genemamba_jax.train", "--config", "configs/demo.py", "--workdir",
                                tmp_path, "--config.optimizer.learnin_rate=1"))
  assert "optimizer.learnin_rate" in line and "lr" in line and "warmup_steps" in line
  line = one_error_line(command("genemamba_jax.train", "--config", "configs/demo.py", "--workdir",
                                tmp_path, "--config.optimizer.warmup_step=1"))
  assert "did you mean optimizer.warmup_steps" in line


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_8_finetune_missing_input_says_no_such_file(kang_pretrained, tmp_path):
  line = one_error_line(command(
      "genemamba_jax.finetune", "--config", "configs/finetune.py", "--workdir", tmp_path / "w",
      f"--config.init_checkpoint={kang_pretrained}", "--config.data.input=/missing/cells.h5ad"))
  assert "/missing/cells.h5ad: no such file" in line


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_9_raw_counts_hint_names_the_finetune_key_and_plain_cell_names(kang_pretrained, tmp_path,
                                                                        shared_data):
  adata = anndata.read_h5ad(shared_data / "kang_pbmc_ifnb.h5ad")
  adata.layers["counts"] = adata.X.copy()
  adata.X = np.log1p(adata.X)  # what a processed file holds
  path = tmp_path / "lognorm.h5ad"
  adata.write_h5ad(path)
  line = one_error_line(command(
      "genemamba_jax.finetune", "--config", "configs/finetune.py", "--workdir", tmp_path / "w",
      f"--config.init_checkpoint={kang_pretrained}", f"--config.data.input={path}"))
  assert "use --config.data.layer with one that holds raw counts (this file has: counts" in line
  assert "np.str_" not in line and "for cell '" in line
  assert not (tmp_path / "w").exists()


def test_9_the_default_spelling_is_the_flag():
  assert errors.option("gene_column") == "--gene-column"
  with errors.option_names(gene_column="--config.data.gene_column"):
    assert errors.option("gene_column") == "--config.data.gene_column"
  assert errors.option("gene_column") == "--gene-column"


@pytest.mark.parametrize("loader, source", [
    ("load_gene_table", "biomart"), ("load_gene_map", "huggingface.co/ctheodoris/Geneformer"),
    ("read_gmt", "gsea-msigdb.org")])
def test_10_a_missing_external_file_names_its_public_source(loader, source, tmp_path):
  from genemamba_jax.data import genes  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataError, match="file not found") as error:
    getattr(genes, loader)(tmp_path / "missing.tsv")
  assert source in str(error.value)


def test_10_missing_gene2vec_pairs_and_geneformer_dictionaries_name_their_sources(tmp_path,
                                                                                   capsys):
  from genemamba_jax.data import genes  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataError, match="github.com/jingcheng-du/Gene2vec"):
    genes.read_gene_pairs(tmp_path / "train_text.txt", tmp_path / "train_label.txt")
  assert prepare.main(["import-geneformer", "--token-dictionary", str(tmp_path / "t.pkl"),
                       "--median-dictionary", str(tmp_path / "m.pkl"), "--out",
                       str(tmp_path / "v")]) == 2
  assert "huggingface.co/ctheodoris/Geneformer" in capsys.readouterr().err


def test_10_the_command_reference_names_the_sources():
  readme = (ROOT / "docs" / "commands.md").read_text()
  for source in ("https://www.ensembl.org/biomart", "https://huggingface.co/ctheodoris/Geneformer",
                 "https://github.com/jingcheng-du/Gene2vec", "https://www.gsea-msigdb.org"):
    assert source in readme


def test_10_examples_use_no_path_a_user_does_not_have():
  # ../shared/data is the project's test data; users have the files under their public names.
  for doc in (ROOT / "README.md", ROOT / "docs" / "commands.md"):
    for block in doc.read_text().split("```")[1::2]:
      assert "shared/data" not in block, (doc.name, block[:200])


@pytest.mark.slow
def test_12_train_says_how_to_get_tensorboard(finished_run, env):
  result = train(finished_run, "--config.num_steps=6", env=env)
  assert result.returncode == 0
  assert "pip install tensorboard" in result.stdout


@pytest.mark.slow  # over ~5 s on 2 cores
def test_13_help_lists_every_config_key():
  from genemamba_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  text = command("genemamba_jax.train", "--help").stdout
  def leaves(tree, prefix=""):
    for key, value in tree.items():
      yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]

  keys = list(leaves(config_lib.default_config().to_dict()))
  assert {"data.path", "model.d_model", "optimizer.lr", "mesh.fsdp", "init_checkpoint"} <= set(keys)
  assert [key for key in keys if f"\n  {key} = " not in text] == []
  text = command("genemamba_jax.finetune", "--help").stdout
  assert "  data.input = " in text and "  label_column = 'cell_type'" in text


def _actions(parser):
  import argparse  # pylint: disable=g-import-not-at-top
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      for name, sub in action.choices.items():
        yield from ((f"{name} {a}", h) for a, h in _actions(sub))
    elif action.option_strings and action.dest != "help":
      yield action.option_strings[-1], action


def test_13_every_option_of_every_command_has_help_and_its_default():
  # bench/train_step.py's options: tests/e2e/test_bench.py, from its --help in a subprocess.
  import argparse  # pylint: disable=g-import-not-at-top
  from genemamba_jax import embed, label_transfer, perturb, predict  # pylint: disable=all
  from genemamba_jax.convert import __main__ as convert_main  # pylint: disable=g-import-not-at-top
  from genemamba_jax.evaluate import __main__ as evaluate_main  # pylint: disable=g-import-not-at-top
  parsers = {"prepare": prepare.build_parser(), "embed": embed.build_parser(),
             "predict": predict.build_parser(), "label_transfer": label_transfer.build_parser(),
             "perturb": perturb.build_parser(), "evaluate": evaluate_main.build_parser(),
             "convert": convert_main.build_parser()}
  actions = [(f"{name} {flag}", action) for name, parser in parsers.items()
             for flag, action in _actions(parser)]
  assert [flag for flag, action in actions if not action.help] == []
  # An option that has a value when it is not given says which.
  assert [flag for flag, action in actions
          if action.default not in (None, False, argparse.SUPPRESS)
          and "default" not in action.help] == []


def test_13_prepare_subcommands_have_a_description():
  parser = prepare.build_parser()
  import argparse  # pylint: disable=g-import-not-at-top
  subparsers = next(a for a in parser._actions  # pylint: disable=protected-access
                    if isinstance(a, argparse._SubParsersAction))  # pylint: disable=protected-access
  assert all(sub.description for sub in subparsers.choices.values())


# --- install -----------------------------------------------------------------------------------


def test_14_license_is_an_spdx_string_and_setuptools_supports_it():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert project["project"]["license"] == "Apache-2.0"
  assert project["build-system"]["requires"] == ["setuptools>=77"]


def test_15_torch_is_not_in_the_test_extra_and_parity_tests_say_how_to_get_it(monkeypatch):
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  assert not any(dep.startswith("torch") for dep in extras["test"])
  assert any(dep.startswith("torch") for dep in extras["parity"])
  monkeypatch.delenv("CI", raising=False)
  with pytest.raises(pytest.skip.Exception, match="download.pytorch.org/whl/cpu"):
    require_parity("no_such_package_here")
  monkeypatch.setenv("CI", "true")
  with pytest.raises(pytest.fail.Exception, match="no_such_package_here"):
    require_parity("no_such_package_here")


def test_20_what_to_expect_from_the_demo_is_beside_the_commands_and_its_figures_exist():
  commands = (ROOT / "docs" / "commands.md").read_text()
  expect = commands.index("**What to expect from the demo model, and why.**")
  assert expect < commands.index("### `finetune`") < commands.index("### `evaluate`")
  paragraph = commands[expect:commands.index("### `finetune`")]
  for command_name, baseline in [("finetune", "logistic regression"), ("integration", "PCA"),
                                 ("reconstruction", "dataset_order"), ("gene-pairs", "random")]:
    assert command_name in paragraph and baseline in paragraph, command_name
  # Its figures live in RESULTS, in the section the paragraph links to, one row per command.
  assert "../bench/RESULTS.md#the-demo-model-on-the-worked-examples" in paragraph
  results = (ROOT / "bench" / "RESULTS.md").read_text()
  section = results.split("## The demo model on the worked examples\n")[1].split("\n## ")[0]
  rows = [line for line in section.splitlines() if line.startswith("| `")]
  assert [row.split("`")[1] for row in rows] == [
      "finetune", "embed", "evaluate integration", "evaluate reconstruction",
      "evaluate gene-pairs"]
  assert ('"What to expect" in [docs/commands.md](docs/commands.md#after-pretraining-finetune-embed'
          in (ROOT / "README.md").read_text())


# --- small things ------------------------------------------------------------------------------


@pytest.mark.slow  # a 1-step demo training run
def test_21_train_says_where_the_demo_data_is_cached(tmp_path):
  cache = tmp_path / "cache"
  env = dict(os.environ, GENEMAMBA_CACHE=str(cache))
  # (Its line when reused: tests/e2e/test_demo.py, through `prepare demo`.)
  result = train(tmp_path / "run", "--config.num_steps=1", env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stderr.splitlines() if l.startswith("demo data: ")][0]
  assert "preparing" in line and str(cache.resolve() / "demo_data") in line, line


def test_21_load_classifier_gives_the_classifier_back():
  from genemamba_jax.finetune import Classifier, load_classifier, predict  # pylint: disable=all
  assert load_classifier is predict.load_classifier and Classifier is predict.Classifier
  assert "Classifier" in str(predict.load_classifier.__annotations__["return"])
  assert {"model", "classes", "run"} <= {f.name for f in
                                         __import__("dataclasses").fields(predict.Classifier)}
  assert callable(predict.Classifier.predict)
