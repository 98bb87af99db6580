"""Going on from a converted run: `embed` gives the original's mean state, `evaluate
reconstruction` runs, and `train` starts from the converted weights and resumes (real Kang cells;
the oracle: tests/convert/torch_genemamba.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the oracle needs torch (pip install -e .[parity])")
pytest.importorskip("transformers", reason="the oracle needs transformers (Mamba2Mixer)")
pytest.importorskip("safetensors", reason="the oracle's checkpoints need safetensors")

# pylint: disable=g-import-not-at-top,wrong-import-position

from genemamba_jax import convert, inference, rundir
from genemamba_jax.errors import DataError
from genemamba_jax.data.readers import open_source
from genemamba_jax.model.convert import flatten
from tests.conftest import _require_shared_data
from tests.convert.torch_genemamba_files import load_original_checkpoint
from tests.convert.conversions import (  # noqa: F401 (fixtures: the tests' arguments, and
    # those fixtures' own: conversions needs tokens)
    D, KANG, ORIGINAL_PAD, _assert_close, _batch, _json, conversions, kang_subset, tokens)


# --- 4. embed, evaluate and train on a converted run -----------------------------------------


@pytest.mark.slow  # over ~10 s on 2 cores
def test_embed_cli_gives_the_original_mean_state(conversions, kang_subset, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  conversion = conversions("mean", False)
  result = subprocess.run(
      [sys.executable, "-m", "genemamba_jax.embed", "--checkpoint", str(conversion.run),
       "--input", str(kang_subset), "--gene-column", "ensembl_id",
       "--output", str(tmp_path / "cells.npy")], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  cells = np.load(tmp_path / "cells.npy")
  assert cells.shape == (96, D)
  # No <cls> in the original's vocabulary: mean pooling over every gene (up to 2,048).
  sentences = inference.tokenize_all(conversion.loaded.tokenizer(),
                                     open_source(kang_subset, None, "ensembl_id"), desc=None)[0]
  sentences, cells = sentences[:12], cells[:12]  # the oracle on all 96 takes ~15 s
  lengths = [len(s) for s in sentences]
  assert max(lengths) > 512  # whole cells, several chunks of the scan
  ids, valid = _batch(sentences, lengths)
  with torch.no_grad():  # the original's hidden states (no [B, L, V] logits)
    o = conversion.oracle
    x = o.embeddings(torch.from_numpy(np.where(valid, ids, ORIGINAL_PAD)).long())
    hidden = o.norm_f(o.mamba_mixer(x, torch.from_numpy(~valid))).numpy()
  theirs = (hidden * valid[..., None]).sum(axis=1) / valid.sum(axis=1, keepdims=True)
  _assert_close(cells, theirs, "mean-pooled cell embeddings")


def test_evaluate_reconstruction_on_a_converted_run(conversions, kang_subset, tmp_path):
  from genemamba_jax.evaluate import __main__ as evaluate  # pylint: disable=g-import-not-at-top
  conversion = conversions("mean", False)
  status = evaluate.main(["reconstruction", "--checkpoint", str(conversion.run), "--input",
                          str(kang_subset), "--gene-column", "ensembl_id", "--cells", "12",
                          "--max-len", "64", "--out", str(tmp_path / "reconstruction")])
  assert status == 0
  summary = _json(tmp_path / "reconstruction" / "reconstruction.json")
  assert 0 <= summary["same_position"]["nl_dist"] <= 1, summary  # the original's protocol
  assert summary["next_gene"]["nl_dist"] is None  # leak-free: needs separate streams


@pytest.fixture(scope="module")
def kang_corpus(conversions, tmp_path_factory):
  """Kang tokenized for pretraining with a converted run's vocabulary (top 64 genes)."""
  from genemamba_jax import prepare  # pylint: disable=g-import-not-at-top
  run = conversions("mean", False).run
  out = tmp_path_factory.mktemp("corpus") / "tokens"
  assert prepare.main(["tokenize", "--input", str(_require_shared_data() / KANG), "--gene-column",
                       "ensembl_id", "--vocab", str(run / "vocab"), "--max-len", "64",
                       "--min-genes", "100", "--out", str(out)]) == 0
  return out


def _train(corpus, init, workdir, objective, **overrides):
  from genemamba_jax.train import loop  # pylint: disable=g-import-not-at-top
  from genemamba_jax.train.config import default_config  # pylint: disable=g-import-not-at-top
  c = default_config()
  c.init_checkpoint = str(init)
  c.data.path, c.data.max_len, c.data.eval_fraction = str(corpus), 64, 0.05
  c.objective = objective
  c.batch_size, c.num_steps, c.log_every = 8, 4, 1
  c.eval_every = c.checkpoint_every = 2
  c.eval_batches = 1
  c.optimizer.update(lr=1e-3, warmup_steps=0)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  loop.train_and_evaluate(c, str(workdir))
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def _params(step_dir):
  return {k: np.asarray(v) for k, v in flatten(rundir.restore_params(step_dir)).items()}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # next_gene_faithful's LeakWarning
@pytest.mark.parametrize("objective", ["next_gene_faithful", "next_gene"])
def test_pretraining_starts_from_the_converted_weights_and_resumes(conversions, kang_corpus,
                                                                   tmp_path, objective):
  conversion = conversions("mean", False)
  converted = _params(conversion.run / "checkpoints" / "0")
  # At learning rate 1e-30 (it must be > 0) every update is far below the float32 resolution
  # of every weight: after 2 steps they are the converted ones, bit for bit, so the run
  # started from them, whatever the objective's streams.
  still = _train(kang_corpus, conversion.run, tmp_path / "still", objective, num_steps=2,
                 **{"optimizer.lr": 1e-30})
  after = _params(tmp_path / "still" / "checkpoints" / "2")
  assert sorted(after) == sorted(converted)
  assert all(np.array_equal(after[k], converted[k]) for k in after)
  # It trains: 4 steps straight, and 2 + 2 with a resume, agree exactly; the first step's loss
  # (taken before any update) is the converted weights' loss on the first batch.
  straight = _train(kang_corpus, conversion.run, tmp_path / "straight", objective)
  _train(kang_corpus, conversion.run, tmp_path / "resumed", objective, steps_per_run=2)
  assert sorted(_params(tmp_path / "resumed" / "checkpoints" / "2")) == sorted(converted)
  resumed = _train(kang_corpus, conversion.run, tmp_path / "resumed", objective, steps_per_run=2)
  assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4]
  assert straight[1]["loss"] == still[1]["loss"] and np.isfinite(straight[4]["loss"])
  for step in straight:
    assert straight[step]["loss"] == resumed[step]["loss"], step
  a, b = _params(tmp_path / "straight" / "checkpoints" / "4"), _params(
      tmp_path / "resumed" / "checkpoints" / "4")
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["embeddings/embedding"], converted["embeddings/embedding"])
  # next_gene_faithful keeps the original's mixed streams, so the run exports; the leak-free
  # next_gene trains separate streams, which the original cannot run.
  if objective == "next_gene_faithful":
    out = convert.export_pytorch(tmp_path / "straight", tmp_path / "exported")
    load_original_checkpoint(out, mode="mean")  # strict
  else:
    with pytest.raises(DataError, match="streams='separate'"):
      convert.export_pytorch(tmp_path / "straight", tmp_path / "exported")
