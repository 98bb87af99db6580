"""What the converter tests share: the original GeneMamba as an independent PyTorch oracle
(tests/convert/torch_genemamba.py), converted into run directories, and real Kang cells tokenized
by our pipeline with a converted run's vocabulary. Test modules import the fixtures they use.

Needs torch, transformers and safetensors (the `parity` extra); a module importing this skips
without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the oracle needs torch (pip install -e .[parity])")
pytest.importorskip("transformers", reason="the oracle needs transformers (Mamba2Mixer)")
pytest.importorskip("safetensors", reason="the oracle's checkpoints need safetensors")

# pylint: disable=g-import-not-at-top,wrong-import-position

from genemamba_jax import convert, inference, rundir
from genemamba_jax.convert import __main__ as convert_cli
from genemamba_jax.data.readers import open_source
from tests.conftest import _require_shared_data
from tests.convert.torch_genemamba import MODES, OriginalMambaModel, randomize_
from tests.convert.torch_genemamba_files import geneformer_tokens, save_original_checkpoint

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


@pytest.fixture(scope="module")
def kang_subset(tmp_path_factory):
  """96 Kang cells, in a shuffled order."""
  import anndata  # pylint: disable=g-import-not-at-top
  adata = anndata.read_h5ad(_require_shared_data() / KANG)
  order = np.random.default_rng(0).permutation(adata.n_obs)[:96]
  path = tmp_path_factory.mktemp("kang") / "kang_subset.h5ad"
  adata[order].copy().write_h5ad(path)
  return path
