"""The converter between the original PyTorch GeneMamba's checkpoints and our run directories.

Checked against tests/convert/torch_genemamba.py, an independent PyTorch model of the
original `MambaModel` and its checkpoint format, on real Kang PBMCs tokenized by
our own pipeline with the converted run's vocabulary and medians:

* parity: every combination mode x identity / residual layers x (a right-padded
  batch with a mask, full rows without one), hidden states after norm_f and logits;
* round trips: original -> run -> export is bit-exact (tensors, config.json,
  gene_tokenizer.json) and loads strictly in the oracle; our own runs export too;
* fine-tuned checkpoints: the [CLS] row and the `Classifier` head, both ways; a
  converted pretrained checkpoint fine-tunes with `finetune` and exports;
* going on: `embed`, `evaluate reconstruction`, `train` with init_checkpoint;
* bad input: one-line errors naming the tensor or key, nothing left on disk;
* the paper's shapes (slow).

Needs torch, transformers and safetensors (the `parity` extra); skips without.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the oracle needs torch (pip install -e .[parity])")
pytest.importorskip("transformers", reason="the oracle needs transformers (Mamba2Mixer)")
pytest.importorskip("safetensors", reason="the oracle's checkpoints need safetensors")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import load_file, save_file

from genemamba_jax import convert, inference, rundir
from genemamba_jax.convert import __main__ as convert_cli
from genemamba_jax.convert.original_files import ORIGINAL_TOKENIZE
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.errors import DataError
from genemamba_jax.data.readers import open_source
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.model.convert import flatten
from tests.conftest import _require_shared_data
from tests.convert.torch_genemamba import (
    MODES, OriginalClassifier, OriginalMambaModel, add_cls_row_, geneformer_tokens,
    load_classifier, load_original_checkpoint, randomize_, save_classifier,
    save_original_checkpoint)

D, LAYERS = 64, 2  # 2 Mamba-2 heads of 64
KANG = "kang_pbmc_ifnb.h5ad"
# Tokens per cell of the padded batch (right padding to the first); full rows use the first.
LENGTHS = (200, 181, 150, 128, 97, 64, 33, 9)
ORIGINAL_PAD = 1  # the original pads with [PAD] (id 1); we pad with <pad> (id 0) and a mask


# --- helpers -------------------------------------------------------------------------------


def _medians_path() -> str:
  return str(_require_shared_data() / "geneformer_30m" / "gene_median_dictionary.pkl")


def _original(tokens, mode="mean", identity=False, *, seed=0, d_model=D, n_layers=LAYERS):
  model = OriginalMambaModel(len(tokens), d_model, n_layers, mode=mode, identity_layers=identity)
  return randomize_(model, seed)


def _batch(cells, lengths):
  """Our right-padded batch: ids [B, L] int32 (pad 0) and mask [B, L] (True at valid tokens)."""
  ids = np.zeros((len(cells), max(lengths)), np.int32)
  for i, (cell, n) in enumerate(zip(cells, lengths)):
    assert len(cell) >= n
    ids[i, :n] = cell[:n]
  return ids, np.arange(ids.shape[1])[None, :] < np.asarray(lengths)[:, None]


@torch.no_grad()
def _oracle_forward(model, ids, mask):
  """(logits, hidden) of the oracle as numpy; mask None runs it without a padding mask."""
  if mask is None:
    logits, hidden = model(torch.from_numpy(ids).long())
  else:  # the original's convention: [PAD] at padding, padding_mask True there
    ids = np.where(mask, ids, ORIGINAL_PAD)
    logits, hidden = model(torch.from_numpy(ids).long(), torch.from_numpy(~mask))
  return logits.numpy(), hidden.numpy()


def _assert_close(ours, theirs, what):
  """Within 1e-4 relative to the largest value of `theirs`."""
  ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  assert ours.shape == theirs.shape, what
  atol = 1e-4 * np.abs(theirs).max()
  if not np.all(np.abs(ours - theirs) <= atol + 1e-4 * np.abs(theirs)):  # (assert_allclose is
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=atol, err_msg=what)  # slow on 40M)


def _tensors_equal(a: dict, b: dict, what: str, skip=()):
  assert sorted(a) == sorted(b), what
  for key in a:
    if key in skip:
      continue
    assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), (what, key)
    assert np.array_equal(a[key], b[key]), (what, key)


def _json(path):
  return json.loads(Path(path).read_text(encoding="utf-8"))


def _cli(capsys, *argv):
  """Runs `python -m genemamba_jax.convert` in process: (exit status, stdout, stderr)."""
  status = convert_cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out, err


class Conversion:
  """An oracle model, its original checkpoint directory and the run converted from it."""

  def __init__(self, oracle, original: Path, run: Path):
    self.oracle, self.original, self.run = oracle, original, run
    self.loaded = rundir.load_pretrained(run)


def _convert(tmp: Path, oracle, tokens, mode, identity) -> Conversion:
  original = save_original_checkpoint(oracle, tmp / "original", tokens)
  converted = convert.load_pytorch(original, median_dictionary=_medians_path(),
                                   combine=None if mode == "mean" else mode,
                                   identity_layers=identity)
  return Conversion(oracle, original, convert.write_run(converted, tmp / "run"))


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens():
  """The original's vocabulary: [UNK], [PAD], then Geneformer's 25,424 genes (ids kept)."""
  return geneformer_tokens()


@pytest.fixture(scope="module")
def conversions(tmp_path_factory, tokens):
  """conversions(mode, identity) -> Conversion, made once per module (parametrizations share)."""
  made = {}

  def get(mode, identity) -> Conversion:
    if (mode, identity) not in made:
      tmp = tmp_path_factory.mktemp(f"{mode}_{'identity' if identity else 'residual'}")
      seed = 10 * MODES.index(mode) + identity
      made[mode, identity] = _convert(tmp, _original(tokens, mode, identity, seed=seed), tokens,
                                      mode, identity)
    return made[mode, identity]

  return get


@pytest.fixture(scope="module")
def kang_cells(conversions):
  """Every Kang cell tokenized by OUR pipeline with a converted run's vocabulary and medians."""
  loaded = conversions("mean", False).loaded
  source = open_source(_require_shared_data() / KANG, None, "ensembl_id")
  cells, _, _ = inference.tokenize_all(loaded.tokenizer(), source, desc=None)
  return cells


@pytest.fixture(scope="module")
def eight_cells(kang_cells):
  """8 cells with >= 200 genes, spread over the file (different cell types)."""
  long = [c for c in kang_cells if len(c) >= LENGTHS[0]]
  return [long[i] for i in np.linspace(0, len(long) - 1, 8).astype(int)]


# --- 1. parity with the original ----------------------------------------------------------


def test_converted_run_keeps_the_original_ids_and_tokenizes_as_it_did(conversions, tokens,
                                                                      kang_cells):
  loaded = conversions("mean", False).loaded
  assert len(loaded.vocab) == len(tokens) == loaded.config.vocab_size == 25_426
  # Ids kept; [UNK] / [PAD] are our <pad> / <mask> (Geneformer's own names for ids 0 and 1).
  assert loaded.vocab.token_to_id == {"<pad>": 0, "<mask>": 1,
                                      **{g: i for i, g in enumerate(tokens) if i >= 2}}
  assert loaded.vocab.cls_id is None and loaded.vocab.eos_id is None
  assert loaded.tokenize == ORIGINAL_TOKENIZE  # Geneformer's rank encoding, top 2,048 genes
  assert len(kang_cells) == 1556 and all(len(c) for c in kang_cells)
  assert all(c.min() >= 2 for c in kang_cells)  # genes only, no special token
  c = loaded.config
  assert (c.combine, c.residual, c.streams, c.mixer, c.n_layers, c.d_model) == (
      "mean", "inside", "mixed", "mamba2", LAYERS, D)


@pytest.mark.parametrize("padded", [True, False], ids=["padded_with_mask", "full_rows_no_mask"])
@pytest.mark.parametrize("identity", [False, True], ids=["residual", "identity"])
@pytest.mark.parametrize("mode", MODES)
def test_hidden_states_and_logits_match_the_original(conversions, eight_cells, mode, identity,
                                                     padded):
  conversion = conversions(mode, identity)
  assert conversion.loaded.config.combine == mode
  assert conversion.loaded.config.residual == ("identity" if identity else "inside")
  lengths = LENGTHS if padded else (LENGTHS[0],) * len(eight_cells)
  ids, valid = _batch(eight_cells, lengths)
  their_logits, their_hidden = _oracle_forward(conversion.oracle, ids, valid if padded else None)
  if padded:
    ours = conversion.loaded.model(jnp.asarray(ids), jnp.asarray(valid))
  else:  # no mask: ours takes every token != <pad> as valid, the oracle flips whole rows
    assert valid.all()
    ours = conversion.loaded.model(jnp.asarray(ids))
  _assert_close(np.asarray(ours.hidden)[valid], their_hidden[valid], "hidden after norm_f")
  _assert_close(np.asarray(ours.logits)[valid], their_logits[valid], "logits")


# --- 2. round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("identity", [False, True], ids=["residual", "identity"])
@pytest.mark.parametrize("mode", MODES)
def test_original_to_run_to_original_is_bit_exact(conversions, eight_cells, tmp_path, mode,
                                                  identity):
  conversion = conversions(mode, identity)
  out = convert.export_pytorch(conversion.run, tmp_path / "exported")
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "gene_tokenizer.json",
                                                   "model.safetensors"]
  _tensors_equal(load_file(out / "model.safetensors"),
                 load_file(conversion.original / "model.safetensors"), "model.safetensors")
  assert _json(out / "config.json") == _json(conversion.original / "config.json")
  assert _json(out / "gene_tokenizer.json") == _json(conversion.original / "gene_tokenizer.json")
  reloaded = load_original_checkpoint(out, mode=mode, identity_layers=identity)  # strict
  ids, valid = _batch(eight_cells[:2], (64, 40))
  for a, b in zip(_oracle_forward(reloaded, ids, valid), _oracle_forward(conversion.oracle, ids,
                                                                           valid)):
    assert np.array_equal(a, b)


def _our_run(tmp: Path, combine: str, residual: str, seed: int) -> Path:
  """A run as `train` writes it for an exportable model: Geneformer's vocabulary with <cls>
  and <eos> appended (`prepare import-geneformer`), pretrained with <cls> first."""
  shared = _require_shared_data() / "geneformer_30m"
  vocab = vocab_lib.Vocab.from_geneformer(pickle.loads((shared / "token_dictionary.pkl")
                                                       .read_bytes()))
  medians = pickle.loads((shared / "gene_median_dictionary.pkl").read_bytes())
  config = GeneMambaConfig(vocab_size=len(vocab), d_model=D, n_layers=LAYERS, combine=combine,
                           shared_combine=combine in ("concat", "gate"), residual=residual)
  model = GeneMamba(config, rngs=nnx.Rngs(seed))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  rng = np.random.default_rng(seed)
  # Every 1-D parameter off its init (zero biases, unit scales), so a mix-up shows.
  params = jax.tree.map(lambda p: p + rng.normal(0, 0.2, p.shape).astype(np.float32)
                        if p.ndim == 1 else p, params)
  converted = convert.Converted(
      config, vocab, {g: float(medians[g]) for g in vocab.gene_ids},
      {"max_len": 256, "cls": True, "eos": False, "log1p": False}, params, {"source": "test"})
  return convert.write_run(converted, tmp / "run")


@pytest.mark.parametrize("combine,residual", [("mean", "around"), ("gate", "inside"),
                                              ("sum", "identity")])
def test_our_run_exports_and_the_original_computes_the_same(tmp_path, kang_cells, combine,
                                                            residual):
  run = _our_run(tmp_path, combine, residual, seed=3)
  loaded = rundir.load_pretrained(run)
  out = convert.export_pytorch(run, tmp_path / "exported")
  config = _json(out / "config.json")
  assert {k: config[k] for k in ("architectures", "d_model", "mamba_layer", "vocab_size")} == {
      "architectures": ["MambaModel"], "d_model": D, "mamba_layer": LAYERS, "vocab_size": 25_426}
  # <cls> (id 25,426) is the original's fine-tuning [CLS]; the unused <eos> row is dropped.
  added = _json(out / "gene_tokenizer.json")["added_tokens"]
  assert [(t["id"], t["content"]) for t in added] == [(25_426, "[CLS]")]
  oracle = load_original_checkpoint(out, mode=combine, identity_layers=residual == "identity")
  assert oracle.embeddings.weight.shape == (25_427, D)
  # Real cells as the run tokenizes them: <cls> first.
  cells = inference.tokenize_all(loaded.tokenizer(max_len=100), open_source(
      _require_shared_data() / KANG, None, "ensembl_id"), desc=None)[0][:4]
  assert all(c[0] == 25_426 for c in cells)
  ids, valid = _batch(cells, (100, 77, 50, 20))
  their_logits, their_hidden = _oracle_forward(oracle, ids, valid)
  ours = loaded.model(jnp.asarray(ids), jnp.asarray(valid))
  _assert_close(np.asarray(ours.hidden)[valid], their_hidden[valid], "hidden")
  _assert_close(np.asarray(ours.logits)[..., :25_427][valid], their_logits[valid], "logits")
  # And back: the export converts to the run's parameters, bit for bit (less the <eos> row).
  back = convert.load_pytorch(out, median_dictionary=_medians_path(),
                              combine=None if combine == "mean" else combine,
                              identity_layers=residual == "identity")
  ours = flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))))
  theirs = flatten(back.params)
  assert sorted(ours) == sorted(theirs)
  for key, value in ours.items():
    if key.split("/")[0] in ("embeddings", "lm_head"):
      value = value[:25_427] if value.shape[0] == 25_428 else value[..., :25_427]
    assert np.array_equal(value, theirs[key]), key
  assert back.vocab.token_to_id == {t: i for t, i in loaded.vocab.token_to_id.items()
                                    if t != "<eos>"}


# --- 3. fine-tuned checkpoints ---------------------------------------------------------------


@pytest.fixture(scope="module")
def kang_classes():
  import anndata  # pylint: disable=g-import-not-at-top
  obs = anndata.read_h5ad(_require_shared_data() / KANG, backed="r").obs
  return sorted(obs["cell_type"].astype(str).unique())


def _kang_cells_of(loaded, **tokenizer_args):
  source = open_source(_require_shared_data() / KANG, None, "ensembl_id")
  return inference.tokenize_all(loaded.tokenizer(**tokenizer_args), source, desc=None)[0]


def test_fine_tuned_classifier_matches_the_original_and_exports_back(tmp_path, tokens, capsys,
                                                                     kang_classes):
  from genemamba_jax.finetune import predict  # pylint: disable=g-import-not-at-top
  oracle = add_cls_row_(_original(tokens, "concat", seed=5), seed=6)
  original = save_original_checkpoint(oracle, tmp_path / "original", tokens, finetuned_cls=True)
  classifier = randomize_(OriginalClassifier(D, len(kang_classes), D, num_layers=4), seed=7)
  head_file = save_classifier(classifier, tmp_path / "classifier.safetensors")
  status, out, err = _cli(capsys, "from-pytorch", "--input", original, "--out", tmp_path / "run",
                          "--combine", "concat", "--median-dictionary", _medians_path(),
                          "--classifier", head_file, "--classes", ",".join(kang_classes))
  assert status == 0, err
  assert out.startswith("fine-tuned classifier: 2 Mamba-2 layers, d_model 64, vocabulary 25427, "
                        "combine concat, residual layers")

  ours_classifier = predict.load_classifier(tmp_path / "run")
  model, loaded = ours_classifier.model, ours_classifier.run
  assert loaded.task["classes"] == kang_classes and loaded.task["head_hidden"] == [D] * 3
  assert loaded.vocab.cls_id == 25_426 and loaded.tokenize["cls"]
  cells = _kang_cells_of(loaded)  # as the run tokenizes them: [CLS] first, then 2,048 genes
  assert all(c[0] == 25_426 for c in cells)
  long = [c for c in cells if len(c) > LENGTHS[0]]
  ids, valid = _batch([long[i] for i in np.linspace(0, len(long) - 1, 8).astype(int)], LENGTHS)
  ours = np.asarray(jax.nn.softmax(model(jnp.asarray(ids), jnp.asarray(valid)), axis=-1))
  _, hidden = _oracle_forward(oracle, ids, valid)
  with torch.no_grad():  # the original's annotation: Classifier(hidden[:, 0]) in eval mode
    theirs = torch.softmax(classifier(torch.from_numpy(hidden[:, 0])), dim=-1).numpy()
  assert theirs.max(axis=1).min() < 0.99  # some cells not near-certain: small errors would show
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)

  out = convert.export_pytorch(tmp_path / "run", tmp_path / "exported")
  assert sorted(p.name for p in out.iterdir()) == ["classifier.safetensors", "config.json",
                                                   "gene_tokenizer.json", "model.safetensors"]
  _tensors_equal(load_file(out / "model.safetensors"), load_file(original / "model.safetensors"),
                 "model.safetensors")
  assert _json(out / "config.json") == _json(original / "config.json")  # vocab_size 25,426
  assert _json(out / "gene_tokenizer.json") == _json(original / "gene_tokenizer.json")
  # Every weight and running statistic is the original's. num_batches_tracked is not kept: the
  # export writes the run's fine-tuning step count (0 for a converted head); eval-mode
  # BatchNorm never reads it.
  exported, given = load_file(out / "classifier.safetensors"), load_file(head_file)
  counters = [k for k in given if k.endswith("num_batches_tracked")]
  assert len(counters) == 3
  _tensors_equal(exported, given, "classifier.safetensors", skip=counters)
  for key in counters:
    assert exported[key].dtype == given[key].dtype == np.int64 and exported[key].shape == ()
    assert exported[key] == 0 != given[key]
  reloaded = load_original_checkpoint(out, mode="concat")  # strict, with the [CLS] row
  head = load_classifier(out / "classifier.safetensors", D, len(kang_classes), D, num_layers=4)
  _, again = _oracle_forward(reloaded, ids, valid)
  with torch.no_grad():
    assert np.array_equal(torch.softmax(head(torch.from_numpy(again[:, 0])), -1).numpy(), theirs)


def test_add_tokens_appends_rows_at_the_mean_gene_row(conversions, eight_cells):
  loaded = conversions("gate", False).loaded
  grown = rundir.add_tokens(loaded, [vocab_lib.CLS])
  assert grown.vocab.cls_id == 25_426 and grown.config.vocab_size == 25_427
  assert rundir.add_tokens(grown, [vocab_lib.CLS]) is grown  # already there
  genes = slice(2, 25_426)
  old = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(loaded.model))).items()}
  new = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(grown.model))).items()}
  for key, axis in (("embeddings/embedding", 0), ("lm_head/kernel", 1), ("lm_head/bias", 0)):
    rows = np.moveaxis(new[key], axis, 0)
    assert np.array_equal(rows[:25_426], np.moveaxis(old[key], axis, 0)), key
    np.testing.assert_allclose(rows[25_426], np.moveaxis(old[key], axis, 0)[genes].mean(axis=0),
                               rtol=1e-6, atol=1e-7, err_msg=key)
  assert all(np.array_equal(new[k], old[k]) for k in old
             if k.split("/")[0] not in ("embeddings", "lm_head"))
  ids, valid = _batch(eight_cells[:2], (50, 30))
  before = loaded.model(jnp.asarray(ids), jnp.asarray(valid))
  after = grown.model(jnp.asarray(ids), jnp.asarray(valid))
  assert np.array_equal(np.asarray(after.hidden), np.asarray(before.hidden))
  assert np.array_equal(np.asarray(after.logits)[..., :25_426], np.asarray(before.logits))


@pytest.fixture(scope="module")
def kang_subset(tmp_path_factory):
  """96 Kang cells, in a shuffled order."""
  import anndata  # pylint: disable=g-import-not-at-top
  adata = anndata.read_h5ad(_require_shared_data() / KANG)
  order = np.random.default_rng(0).permutation(adata.n_obs)[:96]
  path = tmp_path_factory.mktemp("kang") / "kang_subset.h5ad"
  adata[order].copy().write_h5ad(path)
  return path


@pytest.mark.slow
def test_converted_pretrained_checkpoint_fine_tunes_and_exports(conversions, tmp_path,
                                                                kang_classes):
  from genemamba_jax.finetune import predict, run  # pylint: disable=g-import-not-at-top
  from genemamba_jax.finetune.config import original_config  # pylint: disable=g-import-not-at-top
  conversion = conversions("mean", False)
  c = original_config()
  c.init_checkpoint = str(conversion.run)
  c.data.input = str(_require_shared_data() / KANG)
  c.data.gene_column = "ensembl_id"
  c.data.max_len = 48
  c.head_layers, c.num_steps, c.batch_size, c.log_every = 2, 3, 16, 1
  c.write_h5ad = False
  workdir = tmp_path / "finetuned"
  metrics = run.finetune(c, workdir)  # appends <cls> (the original's [CLS] id) at the mean gene
  assert _json(workdir / "metrics.json") == metrics
  assert [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")] == [1, 2, 3]

  out = convert.export_pytorch(workdir, tmp_path / "exported")
  added = _json(out / "gene_tokenizer.json")["added_tokens"]
  assert [(t["id"], t["content"]) for t in added] == [(25_426, "[CLS]")]
  assert _json(out / "config.json")["vocab_size"] == 25_426
  oracle = load_original_checkpoint(out, mode="mean")  # strict, with the [CLS] row
  head = load_classifier(out / "classifier.safetensors", D, len(kang_classes), D, num_layers=3)
  ours_classifier = predict.load_classifier(workdir)
  model, loaded = ours_classifier.model, ours_classifier.run
  cells = _kang_cells_of(loaded)[:4]
  assert all(cell[0] == 25_426 and len(cell) == 48 for cell in cells)
  ids, valid = _batch(cells, (48, 40, 31, 12))
  _, hidden = _oracle_forward(oracle, ids, valid)
  with torch.no_grad():
    theirs = torch.softmax(head(torch.from_numpy(hidden[:, 0])), dim=-1).numpy()
  ours = np.asarray(jax.nn.softmax(model(jnp.asarray(ids), jnp.asarray(valid)), axis=-1))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


# --- 4. embed, evaluate and train on a converted run -----------------------------------------


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


# --- 5. bad input ------------------------------------------------------------------------------

FAKE_GENES = [f"ENSG{i:011d}" for i in range(30)]
FAKE_TOKENS = ["[UNK]", "[PAD]", *FAKE_GENES]


@pytest.fixture
def fake_medians(tmp_path):
  path = tmp_path / "medians.pkl"
  path.write_bytes(pickle.dumps({g: 1.0 + i for i, g in enumerate(FAKE_GENES)}))
  return path


def _fake_original(directory, mode="mean", *, cls=False):
  """A small original checkpoint (30 genes) that converts cleanly."""
  model = _original(FAKE_TOKENS, mode, seed=1)
  if cls:
    add_cls_row_(model, seed=2)
  return save_original_checkpoint(model, directory, FAKE_TOKENS, finetuned_cls=cls)


def _edit_tensors(original, edit):
  tensors = load_file(original / "model.safetensors")
  edit(tensors)
  save_file(tensors, original / "model.safetensors", metadata={"format": "pt"})


def _edit_json(path, edit):
  data = _json(path)
  edit(data)
  path.write_text(json.dumps(data), encoding="utf-8")


def _drop_genes(n):
  def edit(tokenizer):
    vocab = tokenizer["model"]["vocab"]
    for gene in FAKE_GENES[-n:]:
      del vocab[gene]
  return edit


def _add_gene(tokenizer):
  tokenizer["model"]["vocab"]["ENSG99999999999"] = len(tokenizer["model"]["vocab"])


def _save_pickle(name):
  def edit(original):
    state = {k: torch.from_numpy(v) for k, v in load_file(original / "model.safetensors").items()}
    torch.save(state, original / name)
    (original / "model.safetensors").unlink()
  return edit


BAD_ORIGINALS = {
    # name: (mode, how to break it, extra CLI arguments, what the one-line error says)
    "missing_tensor": ("mean", lambda o: _edit_tensors(
        o, lambda t: t.pop("mamba_mixer.layers.1.mamba.D")), [],
        "model.safetensors: missing tensor 'mamba_mixer.layers.1.mamba.D'"),
    "extra_tensor": ("mean", lambda o: _edit_tensors(
        o, lambda t: t.update({"mamba_mixer.layers.0.mamba.extra": np.ones(3, np.float32)})), [],
        "model.safetensors: unexpected tensor 'mamba_mixer.layers.0.mamba.extra'"),
    "extra_layer": ("mean", lambda o: _edit_tensors(
        o, lambda t: t.update({"mamba_mixer.layers.2.mamba.D": t["mamba_mixer.layers.0.mamba.D"]})),
        [], "unexpected tensor 'mamba_mixer.layers.2.mamba.D'"),
    "shape": ("mean", lambda o: _edit_tensors(
        o, lambda t: t.update({"norm_f.weight": np.ones(32, np.float32)})), [],
        r"tensor 'norm_f.weight' has shape \(32,\), the model needs \(64,\) \(config.json: "
        r"d_model 64, mamba_layer 2, combine mean\)"),
    "config_more_layers": ("mean", lambda o: _edit_json(
        o / "config.json", lambda c: c.update(mamba_layer=3)), [],
        r"missing tensor 'mamba_mixer\.layers\.2\.mamba\.\w+'"),
    "config_d_model": ("mean", lambda o: _edit_json(
        o / "config.json", lambda c: c.update(d_model=128)), [],
        r"'embeddings.weight' has shape \(32, 64\), config.json says d_model 128"),
    "config_unknown_key": ("mean", lambda o: _edit_json(
        o / "config.json", lambda c: c.update(n_heads=4)), [],
        "config.json: unknown key 'n_heads'"),
    "vocab_short": ("mean", lambda o: _edit_json(o / "gene_tokenizer.json", _drop_genes(2)), [],
                    "gene_tokenizer.json: 30 tokens, but the embedding has 32 rows"),
    "vocab_one_short": ("mean", lambda o: _edit_json(o / "gene_tokenizer.json", _drop_genes(1)),
                        [], "gene_tokenizer.json: 31 tokens, but the embedding has 32 rows"),
    "vocab_long": ("mean", lambda o: _edit_json(o / "gene_tokenizer.json", _add_gene), [],
                   "gene_tokenizer.json: 33 tokens, but the embedding has 32 rows"),
    "not_safetensors": ("mean", lambda o: (o / "model.safetensors").write_bytes(b"\x00" * 64), [],
                        "model.safetensors: not a safetensors file"),
    "pytorch_model_bin": ("mean", _save_pickle("pytorch_model.bin"), [],
                          r"pytorch_model.bin: a torch pickle, which is refused \(loading it can "
                          r"run code\); convert it to safetensors first.*st\.save_file"),
    "model_pt": ("mean", _save_pickle("model.pt"), [],
                 "model.pt: a torch pickle, which is refused"),
    "combine_missing": ("gate", lambda o: None, [],
                        "has mamba_mixer.aggr tensors, so the model combined its two directions "
                        "with concat or gate.*pass --combine concat or --combine gate"),
    "combine_concat_without_aggr": ("sum", lambda o: None, ["--combine", "concat"],
                                    "--combine concat: .* has no mamba_mixer.aggr tensors"),
    "classifier_on_pretrained": ("mean", lambda o: save_classifier(
        OriginalClassifier(D, 3, D), o.parent / "head.safetensors"),
                                 ["--classifier", "{tmp}/head.safetensors"],
                                 "--classifier .*head.safetensors: .* is a pretrained checkpoint "
                                 r"\(no \[CLS\] row\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ORIGINALS))
def test_from_pytorch_refuses_bad_input_in_one_line_leaving_nothing(case, tmp_path, capsys,
                                                                    fake_medians):
  mode, breaks, extra, message = BAD_ORIGINALS[case]
  original = _fake_original(tmp_path / "original", mode)
  breaks(original)
  outs = tmp_path / "outs"
  outs.mkdir()
  status, out, err = _cli(capsys, "from-pytorch", "--input", original, "--out", outs / "run",
                          "--median-dictionary", fake_medians,
                          *[a.format(tmp=tmp_path) for a in extra])
  assert status == 2 and not out
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert re.search(message, err), err
  assert not list(outs.iterdir())  # no run directory, no hidden temporary one
  with pytest.raises(DataError, match=message):  # the same from Python
    convert.load_pytorch(original, median_dictionary=str(fake_medians),
                         combine=extra[1] if extra[:1] == ["--combine"] else None,
                         classifier=str(tmp_path / "head.safetensors")
                         if "--classifier" in extra else None)


def test_from_pytorch_refuses_an_existing_out_and_cleans_up_a_failed_write(
    tmp_path, capsys, fake_medians, monkeypatch):
  original = _fake_original(tmp_path / "original")
  taken = tmp_path / "outs" / "run"
  taken.mkdir(parents=True)
  (taken / "keep.txt").write_text("mine")
  status, _, err = _cli(capsys, "from-pytorch", "--input", original, "--out", taken,
                        "--median-dictionary", fake_medians)
  assert status == 2 and err.count("\n") == 1, err
  assert f"{taken}: exists and is not empty; choose a new --out or remove it" in err
  assert sorted(p.name for p in (tmp_path / "outs").iterdir()) == ["run"]
  assert [p.name for p in taken.iterdir()] == ["keep.txt"]
  # An empty directory is fine (replaced); a write that fails midway leaves nothing.
  (tmp_path / "empty").mkdir()
  assert _cli(capsys, "from-pytorch", "--input", original, "--out", tmp_path / "empty",
              "--median-dictionary", fake_medians)[0] == 0
  assert rundir.load_pretrained(tmp_path / "empty").config.vocab_size == 32
  from genemamba_jax.train import checkpoint  # pylint: disable=g-import-not-at-top

  def disk_full(*args, **kwargs):
    raise OSError("No space left on device")

  monkeypatch.setattr(checkpoint.Checkpointer, "save", disk_full)
  converted = convert.load_pytorch(original, median_dictionary=str(fake_medians))
  with pytest.raises(OSError, match="No space left"):
    convert.write_run(converted, tmp_path / "failed" / "run")
  assert not list((tmp_path / "failed").iterdir())


def test_missing_medians_and_tokenizer_name_what_to_pass(tmp_path, capsys, fake_medians):
  original = _fake_original(tmp_path / "original")
  status, _, err = _cli(capsys, "from-pytorch", "--input", original, "--out", tmp_path / "run")
  assert status == 2 and "--median-dictionary is required" in err and err.count("\n") == 1
  (original / "gene_tokenizer.json").unlink()
  status, _, err = _cli(capsys, "from-pytorch", "--input", original, "--out", tmp_path / "run",
                        "--median-dictionary", fake_medians)
  assert status == 2 and "no gene_tokenizer.json; pass --token-dictionary" in err
  dictionary = tmp_path / "token_dictionary.pkl"
  dictionary.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1,
                                       **{g: i + 2 for i, g in enumerate(FAKE_GENES)}}))
  status, _, err = _cli(capsys, "from-pytorch", "--input", original, "--out", tmp_path / "run",
                        "--median-dictionary", fake_medians, "--token-dictionary", dictionary)
  assert status == 0, err
  assert rundir.load_pretrained(tmp_path / "run").vocab.token_to_id == {
      "<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(FAKE_GENES)}}


def test_a_fine_tuned_checkpoint_whose_tokenizer_predates_cls(tmp_path, fake_medians):
  """Its embedding has config.json's vocab_size + 1 rows: the last is [CLS]."""
  original = _fake_original(tmp_path / "original", cls=True)
  _edit_json(original / "gene_tokenizer.json", lambda t: t.update(added_tokens=[]))
  converted = convert.load_pytorch(original, median_dictionary=str(fake_medians))
  assert converted.vocab.cls_id == 32 and len(converted.vocab) == 33
  assert converted.tokenize["cls"] and converted.tokenize["max_len"] == 2049
  # (One token short of a pretrained checkpoint's rows is a wrong file: case vocab_one_short.)


def _tiny_run(tmp, **config):
  """A run directory of a small model with the original's kind of vocabulary."""
  vocab = vocab_lib.Vocab({"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(FAKE_GENES)}})
  config = GeneMambaConfig(vocab_size=len(vocab), d_model=D, n_layers=1, **config)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(
      GeneMamba(config, rngs=nnx.Rngs(0)), nnx.Param)))
  return convert.write_run(convert.Converted(
      config, vocab, {g: 1.0 for g in FAKE_GENES}, dict(ORIGINAL_TOKENIZE), params, {}), tmp)


@pytest.mark.parametrize("setting,message", [
    (dict(mixer="mamba1"), "model setting mixer='mamba1': the original's layers are mamba_ssm "
                           "Mamba2 with mixer='mamba2'; it cannot be exported"),
    (dict(combine="gate", shared_combine=False), r"per-layer gate weights \(shared_combine=False"),
    (dict(combine="concat", shared_combine=False), r"per-layer concat weights"),
    (dict(prenorm=True), "model setting prenorm=True: the original GeneMamba cannot express it"),
    (dict(tie_embeddings=True), "model setting tie_embeddings=True"),
    (dict(streams="separate"), "model setting streams='separate'"),
    (dict(combine="gate", shared_combine=True, residual="around"),
     r"residual='around' with combine=gate \(the original computes combine\(x \+ f, x \+ b\)\)"),
    (dict(d_state=16), "model setting d_state=16"),
], ids=["mamba1", "per_layer_gate", "per_layer_concat", "prenorm", "tie_embeddings",
        "separate_streams", "residual_around_gate", "d_state"])
def test_to_pytorch_refuses_what_the_original_cannot_express(tmp_path, capsys, setting, message):
  run = _tiny_run(tmp_path / "run", **setting)
  outs = tmp_path / "outs"
  status, out, err = _cli(capsys, "to-pytorch", "--checkpoint", run, "--out", outs / "exported")
  assert status == 2 and not out and err.count("\n") == 1, err
  assert re.search(message, err), err
  assert not outs.exists() or not list(outs.iterdir())


def test_to_pytorch_writes_the_original_files_and_refuses_an_existing_out(tmp_path, capsys):
  run = _tiny_run(tmp_path / "run", combine="gate", shared_combine=True, residual="inside")
  status, out, err = _cli(capsys, "to-pytorch", "--checkpoint", run / "checkpoints" / "0",
                          "--out", tmp_path / "exported")
  assert status == 0, err
  assert "config.json, gene_tokenizer.json, model.safetensors" in out
  load_original_checkpoint(tmp_path / "exported", mode="gate")  # strict
  status, _, err = _cli(capsys, "to-pytorch", "--checkpoint", run, "--out", tmp_path / "exported")
  assert status == 2 and "exported: exists and is not empty" in err
  status, _, err = _cli(capsys, "to-pytorch", "--checkpoint", tmp_path / "nowhere", "--out",
                        tmp_path / "other")
  assert status == 2 and "checkpoint not found" in err and not (tmp_path / "other").exists()


# --- 6. the paper's shapes ---------------------------------------------------------------------


@pytest.mark.slow
def test_paper_sized_model_round_trips_bit_exact_with_equal_logits(tmp_path, tokens, kang_cells):
  """d_model 512, 24 residual layers, 25,426 tokens (65.7M parameters), mode mean."""
  oracle = _original(tokens, "mean", seed=24, d_model=512, n_layers=24)
  conversion = _convert(tmp_path, oracle, tokens, "mean", False)
  # Our defaults are the paper's model; the original's arithmetic puts the residual inside.
  assert conversion.loaded.config == GeneMambaConfig(d_state=64, residual="inside")
  out = convert.export_pytorch(conversion.run, tmp_path / "exported")
  _tensors_equal(load_file(out / "model.safetensors"),
                 load_file(conversion.original / "model.safetensors"), "model.safetensors")
  assert _json(out / "config.json") == _json(conversion.original / "config.json")
  assert _json(out / "gene_tokenizer.json") == _json(conversion.original / "gene_tokenizer.json")
  reloaded = load_original_checkpoint(out, mode="mean")  # strict
  ids, valid = _batch([kang_cells[0], kang_cells[700]], (64, 50))
  their_logits, their_hidden = _oracle_forward(oracle, ids, valid)
  again = _oracle_forward(reloaded, ids, valid)
  assert np.array_equal(again[0], their_logits) and np.array_equal(again[1], their_hidden)
  ours = conversion.loaded.model(jnp.asarray(ids), jnp.asarray(valid))
  _assert_close(np.asarray(ours.hidden)[valid], their_hidden[valid], "hidden")
  _assert_close(np.asarray(ours.logits)[valid], their_logits[valid], "logits")
