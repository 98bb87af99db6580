"""Checks of the PyTorch oracle of the original GeneMamba (tests/convert/torch_genemamba.py).

The oracle is only as good as these checks: flip_sc, padding invariance, the
no-mask flip, the identity-layer arithmetic, Mamba-2 against a sequential
recurrence, the checkpoint round trip, the tokenizer file and the fine-tuning
[CLS] row. Tiny models (d_model 64 -> 2 heads of 64, 2 layers) keep it fast.
Needs torch, transformers and safetensors (the `parity` extra); skips without.
"""

import json
import math

import numpy as np
import pytest
from tests.conftest import require_parity

torch = require_parity("torch")
require_parity("transformers")

from tests.convert.torch_genemamba import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    CLS_TOKEN, MODES, OriginalClassifier, OriginalMambaModel, add_cls_row_, flip_sc, randomize_)
from tests.convert.torch_genemamba_files import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    geneformer_tokens, load_classifier, load_original_checkpoint, save_classifier,
    save_original_checkpoint, tokenizer_json)

D, LAYERS, LENGTH = 64, 2, 24
# The torch scan pads L up to a whole chunk: 16 keeps it cheap, and as it does
# not divide LENGTH, both the multi-chunk and the padded-chunk paths run.
CHUNK = 16
TOKENS = ["[UNK]", "[PAD]"] + [f"ENSG{i:011d}" for i in range(30)]
V = len(TOKENS)
PAD = 1


def _model(mode="mean", identity_layers=False, seed=0, n_layers=LAYERS, chunk_size=CHUNK,
           vocab=V):
  model = OriginalMambaModel(vocab, D, n_layers, mode=mode, identity_layers=identity_layers,
                             chunk_size=chunk_size)
  return randomize_(model, seed)


def _batch(lengths=(LENGTH, 17, 9), seed=0):
  """Right-padded ids [B, LENGTH] and padding mask [B, LENGTH] (True at padding)."""
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(2, V, (len(lengths), LENGTH), generator=g)
  mask = torch.arange(LENGTH)[None, :] >= torch.tensor(lengths)[:, None]
  return ids.masked_fill(mask, PAD), mask


def _run(model, ids, mask=None):
  with torch.no_grad():
    return model(ids, mask)


def test_state_dict_keys_and_shapes_at_d512():
  layer = {"in_proj.weight": (2192, 512), "conv1d.weight": (1152, 1, 4), "conv1d.bias": (1152,),
           "dt_bias": (16,), "A_log": (16,), "D": (16,), "norm.weight": (1024,),
           "out_proj.weight": (512, 1024)}
  for mode in MODES:
    with torch.device("meta"):  # shapes only: skip allocating and initialising
      model = OriginalMambaModel(40, 512, 2, mode=mode)
    want = {"embeddings.weight": (40, 512), "norm_f.weight": (512,),
            "lm_head.weight": (40, 512), "lm_head.bias": (40,)}
    for i in range(2):
      want.update({f"mamba_mixer.layers.{i}.mamba.{k}": s for k, s in layer.items()})
    if mode in ("concat", "gate"):
      want.update({"mamba_mixer.aggr.weight": (512, 1024), "mamba_mixer.aggr.bias": (512,)})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want, mode


def test_randomize_changes_every_tensor_and_is_seeded():
  for mode in ("gate", "mean"):
    fresh = OriginalMambaModel(V, D, LAYERS, mode=mode)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    after = randomize_(fresh, 1).state_dict()
    for key, value in after.items():
      assert not torch.equal(value, before[key]), key
      assert torch.isfinite(value).all(), key
    again = _model(mode, seed=1).state_dict()
    for key, value in after.items():
      assert torch.equal(value, again[key]), key
  sd = _model("mean").state_dict()
  assert (sd["mamba_mixer.layers.0.mamba.dt_bias"] != 0).all()
  assert sd["mamba_mixer.layers.0.mamba.A_log"].std() > 0.3  # spread, not log(1..H)
  assert (sd["mamba_mixer.layers.0.mamba.norm.weight"] - 1).abs().mean() > 0.2


def test_flip_sc_reverses_only_valid_tokens_and_is_its_own_inverse():
  lengths = [5, 3, 0, 6]
  x = torch.arange(4 * 6 * 2, dtype=torch.float32).reshape(4, 6, 2)
  mask = torch.arange(6)[None, :] >= torch.tensor(lengths)[:, None]
  out = flip_sc(x, mask)
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(out[b, :n], x[b, :n].flip(0))
    np.testing.assert_array_equal(out[b, n:], x[b, n:])
  np.testing.assert_array_equal(flip_sc(out, mask), x)
  # No padding at all: the whole row is reversed, as X.flip([1]).
  np.testing.assert_array_equal(flip_sc(x, torch.zeros(4, 6, dtype=torch.bool)), x.flip(1))


@pytest.mark.parametrize("mode", MODES)
def test_padding_invariance(mode):
  """With a mask and right padding, valid positions never see the padding."""
  model = _model(mode)
  ids, mask = _batch()
  logits, hidden = _run(model, ids, mask)
  g = torch.Generator().manual_seed(5)
  other = torch.where(mask, torch.randint(0, V, ids.shape, generator=g), ids)
  assert not torch.equal(other, ids)
  logits2, hidden2 = _run(model, other, mask)
  valid = ~mask
  # The padding enters only through terms with weight exactly 0: bitwise equal.
  np.testing.assert_array_equal(hidden2[valid], hidden[valid])
  np.testing.assert_array_equal(logits2[valid], logits[valid])
  assert not torch.equal(hidden2[mask], hidden[mask])  # padding positions do change
  # Each row alone, unpadded and without a mask, gives its valid outputs.
  for b, n in enumerate(valid.sum(1).tolist()):
    alone_logits, alone_hidden = _run(model, ids[b:b + 1, :n])
    np.testing.assert_allclose(hidden[b, :n], alone_hidden[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[b, :n], alone_logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "gate"])
def test_no_mask_flips_the_whole_row(mode):
  model = _model(mode)
  ids, mask = _batch()
  no_mask = _run(model, ids)
  all_valid = _run(model, ids, torch.zeros_like(mask))
  for a, b in zip(no_mask, all_valid):
    np.testing.assert_array_equal(a, b)
  # Without a mask the backward pass of a padded row starts in its padding,
  # so its valid outputs differ from the masked run (the original's behaviour).
  masked = _run(model, ids, mask)
  n = int((~mask[2]).sum())
  assert not torch.allclose(no_mask[1][2, :n], masked[1][2, :n], atol=1e-3)
  np.testing.assert_array_equal(no_mask[1][0], masked[1][0])  # the unpadded row


def test_identity_layers_arithmetic():
  ids, mask = _batch()
  for mode in ("mean", "gate"):
    model = _model(mode, identity_layers=True)
    for m in (mask, None):
      _, hidden = _run(model, ids, m)
      with torch.no_grad():
        want = model.norm_f(model.embeddings(ids))
      if mode == "mean":
        np.testing.assert_array_equal(hidden, want)  # (x + x) / 2 == x exactly
      else:  # z * x + (1 - z) * x is x up to rounding
        np.testing.assert_allclose(hidden, want, rtol=1e-6, atol=1e-6)
    # norm_f as mamba_ssm's RMSNorm, computed independently in float64.
    x = model.embeddings.weight.detach().double().numpy()[ids.numpy()]
    w = model.norm_f.weight.detach().double().numpy()
    ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(hidden, ref, rtol=1e-5, atol=1e-5)

  model = _model("sum", identity_layers=True, n_layers=3)
  with torch.no_grad():
    x = model.embeddings(ids)
    np.testing.assert_array_equal(model.mamba_mixer(x, mask), 8 * x)
    np.testing.assert_array_equal(model(ids, mask)[1], model.norm_f(8 * x))

  model = _model("concat", identity_layers=True)
  with torch.no_grad():
    x = want = model.embeddings(ids)
    for _ in range(LAYERS):
      want = model.mamba_mixer.aggr(torch.cat([want, want], dim=-1))
    np.testing.assert_array_equal(model.mamba_mixer(x, mask), want)


def _sequential_mamba2(mixer, x):
  """mamba_ssm's Mamba2 forward as its recurrence, in float64 numpy: x [L, d] -> [L, d]."""
  p = {k: v.detach().double().numpy() for k, v in mixer.state_dict().items()}
  silu = lambda t: t / (1 + np.exp(-t))
  nheads, headdim, n = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size
  d_inner = nheads * headdim
  zxbcdt = x.astype(np.float64) @ p["in_proj.weight"].T
  z, xbc, dt = np.split(zxbcdt, [d_inner, zxbcdt.shape[1] - nheads], axis=1)
  w = p["conv1d.weight"][:, 0]  # [C, K]; tap K - 1 multiplies the current position
  k = w.shape[1]
  padded = np.concatenate([np.zeros((k - 1, xbc.shape[1])), xbc])
  xbc = silu(sum(padded[j:j + len(x)] * w[:, j] for j in range(k)) + p["conv1d.bias"])
  xs, b, c = np.split(xbc, [d_inner, d_inner + n], axis=1)
  dt = np.logaddexp(0, dt + p["dt_bias"])  # softplus
  a = -np.exp(p["A_log"])
  h = np.zeros((nheads, headdim, n))
  ys = []
  for t in range(len(x)):
    xt = xs[t].reshape(nheads, headdim)
    h = np.exp(dt[t] * a)[:, None, None] * h + (dt[t][:, None] * xt)[:, :, None] * b[t]
    ys.append((h @ c[t] + p["D"][:, None] * xt).reshape(-1))
  y = np.stack(ys) * silu(z)  # gate, then norm (norm_before_gate=False), one group
  y = y / np.sqrt((y * y).mean(-1, keepdims=True) + 1e-5) * p["norm.weight"]
  return y @ p["out_proj.weight"].T


@pytest.mark.parametrize("chunk_size", [256, CHUNK, 5])
def test_residual_layer_matches_sequential_recurrence(chunk_size):
  model = _model("mean", chunk_size=chunk_size)
  layer = model.mamba_mixer.layers[1]
  x = torch.randn(1, LENGTH, D, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    out = layer(x)
  want = _sequential_mamba2(layer.mamba, x[0].numpy()) + x[0].numpy()
  np.testing.assert_allclose(out[0], want, rtol=1e-4, atol=1e-4)
  assert np.abs(want - x[0].numpy()).mean() > 0.1  # the mixer is not negligible


@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip(tmp_path, mode):
  model = _model(mode, seed=3)
  directory = save_original_checkpoint(model, tmp_path / "ckpt", TOKENS)
  config = json.loads((directory / "config.json").read_text())
  import transformers  # pylint: disable=g-import-not-at-top
  assert config == {"architectures": ["MambaModel"], "d_model": D, "mamba_layer": LAYERS,
                    "vocab_size": V, "torch_dtype": "float32",
                    "transformers_version": transformers.__version__}
  loaded = load_original_checkpoint(directory, mode=mode, chunk_size=CHUNK)
  want = model.state_dict()
  got = loaded.state_dict()
  assert list(got) == list(want)
  for key, value in want.items():
    assert got[key].dtype == torch.float32, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  ids, mask = _batch()
  for a, b in zip(_run(model, ids, mask), _run(loaded, ids, mask)):
    np.testing.assert_array_equal(a, b)


def test_strict_load_rejects_a_wrong_mode(tmp_path):
  directory = save_original_checkpoint(_model("gate"), tmp_path, TOKENS)
  with pytest.raises(RuntimeError, match="Unexpected key.*aggr"):
    load_original_checkpoint(directory, mode="mean")
  directory = save_original_checkpoint(_model("mean"), tmp_path, TOKENS)
  with pytest.raises(RuntimeError, match="Missing key.*aggr"):
    load_original_checkpoint(directory, mode="concat")


def test_save_checks_the_vocabulary_size(tmp_path):
  with pytest.raises(ValueError, match="embedding rows"):
    save_original_checkpoint(_model(), tmp_path, TOKENS[:-1])
  with pytest.raises(ValueError, match=r"\[CLS\]"):
    save_original_checkpoint(_model(), tmp_path, TOKENS, finetuned_cls=True)


def test_tokenizer_file(tmp_path):
  directory = save_original_checkpoint(_model(), tmp_path, TOKENS)
  text = (directory / "gene_tokenizer.json").read_text()
  assert text.startswith('{\n  "version": "1.0",\n  "truncation": null,\n  "padding": null,\n'
                         '  "added_tokens": [],\n  "normalizer": null,\n  "pre_tokenizer": {\n'
                         '    "type": "Whitespace"\n  },\n  "post_processor": null,\n'
                         '  "decoder": null,\n  "model": {\n    "type": "WordLevel",\n'
                         '    "unk_token": "[UNK]",\n    "pad_token": "[PAD]",\n    "vocab": {\n'
                         '      "[UNK]": 0,\n      "[PAD]": 1,\n      "ENSG00000000000": 2,\n')
  assert json.loads(text)["model"]["vocab"] == {t: i for i, t in enumerate(TOKENS)}
  tokenizers = pytest.importorskip("tokenizers", reason="loading the file needs `tokenizers`")
  tok = tokenizers.Tokenizer.from_file(str(directory / "gene_tokenizer.json"))
  assert tok.get_vocab_size() == V
  genes = TOKENS[2:]
  assert tok.encode(" ".join(genes + ["ENSG_NOT_A_GENE"])).ids == list(range(2, V)) + [0]
  assert tok.token_to_id("[PAD]") == PAD and tok.token_to_id(CLS_TOKEN) is None

  fine = tmp_path / "fine"
  save_original_checkpoint(add_cls_row_(_model(), seed=1), fine, TOKENS, finetuned_cls=True)
  added = json.loads((fine / "gene_tokenizer.json").read_text())["added_tokens"]
  assert added == [{"id": V, "content": "[CLS]", "single_word": False, "lstrip": False,
                    "rstrip": False, "normalized": False, "special": True}]
  tok = tokenizers.Tokenizer.from_file(str(fine / "gene_tokenizer.json"))
  assert tok.token_to_id(CLS_TOKEN) == V
  assert tok.encode(f"{CLS_TOKEN} {genes[3]}").ids == [V, 5]


def test_finetuned_cls_row(tmp_path):
  model = _model("gate")
  old = {k: v.clone() for k, v in model.state_dict().items()}
  add_cls_row_(model, seed=7)
  sd = model.state_dict()
  assert sd["embeddings.weight"].shape == (V + 1, D) and sd["lm_head.bias"].shape == (V + 1,)
  np.testing.assert_array_equal(sd["embeddings.weight"][:V], old["embeddings.weight"])
  np.testing.assert_allclose(sd["embeddings.weight"][V], old["embeddings.weight"].mean(0),
                             rtol=0, atol=0)
  np.testing.assert_array_equal(sd["lm_head.weight"][:V], old["lm_head.weight"])
  np.testing.assert_array_equal(sd["lm_head.weight"][V], old["lm_head.weight"].mean(0))
  # The whole bias is a fresh nn.Linear's: U(-1/sqrt(d), 1/sqrt(d)), none of the old entries.
  bias = sd["lm_head.bias"]
  assert bias.abs().max() <= 1 / math.sqrt(D)
  assert not torch.isin(old["lm_head.bias"], bias).any()
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(7)
    torch.nn.Embedding(V + 1, D)
    np.testing.assert_array_equal(bias, torch.nn.Linear(D, V + 1).bias.detach())
  for key in old:
    if not key.startswith(("embeddings", "lm_head")):
      np.testing.assert_array_equal(sd[key], old[key], err_msg=key)

  directory = save_original_checkpoint(model, tmp_path, TOKENS, finetuned_cls=True)
  assert json.loads((directory / "config.json").read_text())["vocab_size"] == V
  loaded = load_original_checkpoint(directory, mode="gate", chunk_size=CHUNK)
  for key, value in sd.items():
    np.testing.assert_array_equal(loaded.state_dict()[key], value, err_msg=key)
  ids, mask = _batch()
  ids[:, 0] = V  # [CLS] first, as the annotation script prepends it
  for a, b in zip(_run(model, ids, mask), _run(loaded, ids, mask)):
    np.testing.assert_array_equal(a, b)


def test_classifier_layout_and_round_trip(tmp_path):
  classifier = OriginalClassifier(512, 7, 512, num_layers=4)
  keys = set(classifier.state_dict())
  want = set()
  for i in (0, 4, 8):
    want |= {f"layers.{i}.weight", f"layers.{i}.bias"}
    want |= {f"layers.{i + 1}.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                              "num_batches_tracked")}
  want |= {"layers.12.weight", "layers.12.bias"}
  assert keys == want
  kinds = [type(m).__name__ for m in classifier.layers]
  assert kinds == ["Linear", "BatchNorm1d", "Dropout", "LeakyReLU"] * 3 + ["Linear"]
  assert classifier.layers[3].negative_slope == 0.1 and classifier.layers[2].p == 0.5

  small = randomize_(OriginalClassifier(D, 5, 32, num_layers=4), 4)
  path = save_classifier(small, tmp_path / "classifier.safetensors")
  loaded = load_classifier(path, D, 5, 32, num_layers=4)
  for key, value in small.state_dict().items():
    np.testing.assert_array_equal(loaded.state_dict()[key], value, err_msg=key)
  x = torch.randn(6, D, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    out = small(x)
    np.testing.assert_array_equal(loaded(x), out)
    # eval mode: BatchNorm with its running statistics, so the rows are independent
    # (up to the matmul's batch-size-dependent rounding).
    np.testing.assert_allclose(small(x[:2]), out[:2], rtol=1e-5, atol=1e-6)
  assert out.shape == (6, 5)


def test_geneformer_tokens(shared_data):
  from genemamba_jax.data.safe_pickle import load_pickle  # pylint: disable=g-import-not-at-top
  tokens = geneformer_tokens(shared_data)
  assert len(tokens) == 25426 and len(set(tokens)) == 25426
  assert tokens[:3] == ["[UNK]", "[PAD]", "ENSG00000000003"]
  assert tokens[-1] == "ENSGR0000265658"  # the original gene_tokenizer.json's last entry
  vocab = load_pickle(shared_data / "geneformer_30m" / "token_dictionary.pkl")
  assert all(vocab[t] == i for i, t in enumerate(tokens) if i >= 2)
  assert geneformer_tokens() == tokens  # the default goes through conftest's helper
  doc = json.loads(tokenizer_json(tokens))
  assert doc["model"]["vocab"]["ENSG00000000419"] == 4
  assert doc["model"]["vocab"]["ENSGR0000265658"] == 25425
