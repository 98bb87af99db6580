"""The README and docs/: their examples run as written (those that can run here), and they
document what the commands write."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from genemamba_jax.data import demo

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMANDS = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")


def code_block(after_heading: str, language: str = "python", text: str = README) -> str:
  """The first ```language block after the heading line `after_heading` of `text`."""
  start = text.index(after_heading)
  match = re.compile(rf"```{language}\n(.*?)```", re.DOTALL).search(text, start)
  return match.group(1)


@pytest.fixture(scope="module")
def demo_tokens(tmp_path_factory) -> Path:
  return demo.prepare_demo(tmp_path_factory.mktemp("demo"), announce=False)["tokens"]


@pytest.mark.slow
def test_data_pipeline_snippet_runs_as_a_script_with_workers(tmp_path, demo_tokens):
  # Grain's workers re-import the script: the README's snippet must carry the main guard.
  (tmp_path / "tokens").symlink_to(demo_tokens, target_is_directory=True)
  script = tmp_path / "snippet.py"
  snippet = code_block("## Reading tokenized data from Python", text=COMMANDS)
  script.write_text(snippet, encoding="utf-8")
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "(32, 2048)" in result.stdout

def _documented(key: str) -> bool:
  """`key` in backquotes in the command reference, or an instance of a documented `<...>`
  pattern."""
  if f"`{key}`" in COMMANDS:
    return True
  patterns = re.findall(r"`([\w/]*<\w+>[\w/]*)`", COMMANDS)
  return any(re.fullmatch(re.sub(r"<\w+>", r"\\w+", p), key) for p in patterns)


@pytest.mark.slow  # the small model pretrained on Kang (kang_pretrained)
def test_every_metrics_jsonl_key_of_a_training_run_is_documented(kang_pretrained):
  rows = [json.loads(line) for line in (kang_pretrained / "metrics.jsonl").read_text().splitlines()]
  keys = set().union(*rows)
  assert {"batch_checksum", "accuracy", "steps_per_s", "eval_loss"} <= keys  # a real run's rows
  assert [k for k in sorted(keys) if not _documented(k)] == []


@pytest.mark.slow
def test_scaling_out_soma_and_two_corpora_examples_run(tmp_path, tiledbsoma):
  """"CELLxGENE Census input" (the local SOMA example) then "Several corpora as one" (trained for
  one step here), as written, in a scratch folder."""
  (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
  python = f"{sys.executable} "
  soma = code_block("### CELLxGENE Census input", "bash").replace("python ", python)
  train = code_block("### Several corpora as one", "bash").replace("python ", python)
  for script in (soma, train.rstrip() + " --config.num_steps=1\n"):
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
  from genemamba_jax.data import corpora  # pylint: disable=g-import-not-at-top
  manifest = corpora.load_manifest([tmp_path / "runs/demo_data/tokens",
                                     tmp_path / "runs/demo_soma_tokens"])
  assert manifest["num_cells"] == 700 + 129  # the demo's cells and its 129 CD14+ monocytes
  assert (tmp_path / "runs/two_corpora/checkpoints").is_dir()


@pytest.mark.slow
def test_walkthrough_runs_as_written(demo_run, tmp_path):
  # From a folder laid out as the project's: runs/demo (here the tiny demo run), configs/.
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "demo").symlink_to(demo_run, target_is_directory=True)
  (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
  script = tmp_path / "walkthrough.py"
  script.write_text(code_block("## Walkthrough"), encoding="utf-8")
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "agree with bulk_labels" in result.stdout and "label transfer:" in result.stdout
  for name in ("umap", "predicted", "label_transfer", "perturb"):
    assert f"(docs/walkthrough/{name}.png)" in README
    assert (ROOT / "docs" / "walkthrough" / f"{name}.png").is_file()  # the committed figure
    written = tmp_path / "docs" / "walkthrough" / f"{name}.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # the demo run and its fine-tuned run (session fixtures)
def test_from_python_runs_as_written(demo_run, demo_finetuned, tmp_path):
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "demo").symlink_to(demo_run, target_is_directory=True)
  (tmp_path / "runs" / "finetune").symlink_to(demo_finetuned, target_is_directory=True)
  checks = """
import json
d_model = json.load(open("runs/demo/model.json"))["d_model"]
assert X.shape == (700, d_model) and adata.obsm["X_genemamba"].shape == X.shape
assert len(genes) == len(model.run.vocab.gene_ids)
assert list(pred.index) == list(adata.obs_names) and {"prediction", "confidence"} <= set(pred)
assert list(labels.index) == list(query.obs_names)
assert set(shifts["gene"]) == {"LYZ", "CST3"} and len(shifts) == 2 * 700
print("from python: ok")
"""
  script = tmp_path / "from_python.py"
  script.write_text(code_block("## From Python") + checks, encoding="utf-8")
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "from python: ok" in result.stdout
