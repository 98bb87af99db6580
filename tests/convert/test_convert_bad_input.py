"""The converter refuses bad input in one line naming the file, tensor or key, and leaves nothing
on disk: malformed originals, an existing --out, missing medians or tokenizer, what the original
format cannot express."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the oracle needs torch (pip install -e .[parity])")
pytest.importorskip("transformers", reason="the oracle needs transformers (Mamba2Mixer)")
pytest.importorskip("safetensors", reason="the oracle's checkpoints need safetensors")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from flax import nnx
from safetensors.numpy import load_file, save_file

from genemamba_jax import convert, rundir
from genemamba_jax.convert.original_files import ORIGINAL_TOKENIZE
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.errors import DataError
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from tests.conftest import fast_first
from tests.convert.torch_genemamba import OriginalClassifier, add_cls_row_
from tests.convert.torch_genemamba_files import (
    load_original_checkpoint, save_classifier, save_original_checkpoint)
from tests.convert.conversions import D, _cli, _json, _original


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


@fast_first("setting,message", [
    (dict(d_state=16), "model setting d_state=16"),
    (dict(mixer="mamba1"), "model setting mixer='mamba1': the original's layers are mamba_ssm "
                           "Mamba2 with mixer='mamba2'; it cannot be exported"),
    (dict(combine="gate", shared_combine=False), r"per-layer gate weights \(shared_combine=False"),
    (dict(combine="concat", shared_combine=False), r"per-layer concat weights"),
    (dict(prenorm=True), "model setting prenorm=True: the original GeneMamba cannot express it"),
    (dict(tie_embeddings=True), "model setting tie_embeddings=True"),
    (dict(streams="separate"), "model setting streams='separate'"),
    (dict(combine="gate", shared_combine=True, residual="around"),
     r"residual='around' with combine=gate \(the original computes combine\(x \+ f, x \+ b\)\)"),
], ids=["d_state", "mamba1", "per_layer_gate", "per_layer_concat", "prenorm", "tie_embeddings",
        "separate_streams", "residual_around_gate"])
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
