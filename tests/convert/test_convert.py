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
* the paper's shapes (slow).

Going on from a converted run (embed, evaluate, train): test_convert_runs.py; bad input:
test_convert_bad_input.py; the shared oracle runs and cells: conversions.py.

Needs torch, transformers and safetensors (the `parity` extra); skips without.
"""

from __future__ import annotations

import json
import pickle
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
from safetensors.numpy import load_file

from genemamba_jax import convert, inference, rundir
from genemamba_jax.convert.original_files import ORIGINAL_TOKENIZE
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.data.readers import open_source
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.model.convert import flatten
from tests.conftest import _require_shared_data, fast_first
from tests.convert.torch_genemamba import MODES, OriginalClassifier, add_cls_row_, randomize_
from tests.convert.torch_genemamba_files import (
    load_classifier, load_original_checkpoint, save_classifier, save_original_checkpoint)
from tests.convert.conversions import (  # noqa: F401 (fixtures: the tests' arguments)
    D, KANG, LAYERS, LENGTHS, _assert_close, _batch, _cli, _convert, _medians_path, _json,
    _oracle_forward, _original, _tensors_equal, conversions, eight_cells, kang_cells, tokens)


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


@fast_first("padded", [True, False], ids=["padded_with_mask", "full_rows_no_mask"])
@fast_first("identity", [False, True], ids=["residual", "identity"])
@fast_first("mode", MODES)
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
@fast_first("mode", MODES)
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


@pytest.mark.slow  # over ~10 s on 2 cores
@pytest.mark.parametrize("combine,residual", [("sum", "identity"), ("mean", "around"),
                                              ("gate", "inside")])
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


@pytest.mark.slow  # over ~10 s on 2 cores
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


@pytest.mark.slow  # over ~5 s on 2 cores
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


@pytest.mark.slow  # over ~10 s on 2 cores
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
