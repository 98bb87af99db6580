"""Tests for the vocabulary, its directory format and the safe unpickler."""

import collections
import json
import os
import pickle
import re

import numpy as np
import pytest

from genemamba_jax.data import safe_pickle
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.errors import DataError
from genemamba_jax.data.vocab import Vocab


def _geneformer_files(shared_data):
  d = shared_data / "geneformer_30m"
  return d / "token_dictionary.pkl", d / "gene_median_dictionary.pkl"


# --- Vocab -------------------------------------------------------------------


def test_from_genes_special_ids_and_sorted_genes():
  v = Vocab.from_genes(["ENSG3", "ENSG1", "ENSG2", "ENSG1"])
  assert (v.pad_id, v.mask_id, v.cls_id, v.eos_id) == (0, 1, 2, 3)
  assert v.gene_ids == ["ENSG1", "ENSG2", "ENSG3"]
  assert v.id_to_token == ["<pad>", "<mask>", "<cls>", "<eos>", "ENSG1",
                           "ENSG2", "ENSG3"]
  assert len(v) == 7
  ids = v.gene_token_ids(["ENSG2", "nope", "ENSG3", "<pad>"])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [5, -1, 6, -1])


def test_from_genes_rejects_bad_names():
  with pytest.raises(DataError, match="not a usable gene name"):
    Vocab.from_genes(["ENSG1", "<unk>"])
  with pytest.raises(DataError, match="empty"):
    Vocab.from_genes([])


@pytest.mark.parametrize("tokens, message", [
    ({"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 4}, "contiguous"),
    ({"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 2}, "unique"),
    ({"<mask>": 0, "<pad>": 1, "<cls>": 2, "<eos>": 3}, "<pad> must have id 0"),
    ({"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": "3"}, "not an integer"),
    ({"<pad>": -1, "<mask>": 0, "<cls>": 1, "<eos>": 2}, ">= 0"),
])
def test_vocab_validation(tokens, message):
  with pytest.raises(DataError, match=message):
    Vocab(tokens, source="my_vocab.json")


def test_vocab_without_cls_and_eos():
  # The original GeneMamba's vocabulary (converted checkpoints) has no <cls> or <eos>.
  v = Vocab({"<pad>": 0, "<mask>": 1, "G1": 2, "G2": 3})
  assert (v.cls_id, v.eos_id, v.special_ids, v.gene_ids) == (None, None, [0, 1], ["G1", "G2"])


def test_from_geneformer_appends_cls_eos():
  v = Vocab.from_geneformer({"<pad>": 0, "<mask>": 1, "G1": np.int16(2),
                             "G2": 3})
  assert (v.cls_id, v.eos_id, len(v)) == (4, 5, 6)
  assert v.gene_ids == ["G1", "G2"]


def test_from_geneformer_keeps_existing_specials():
  tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "G1": 4}
  v = Vocab.from_geneformer(tokens)
  assert v.token_to_id == tokens
  only_cls = Vocab.from_geneformer({"<pad>": 0, "<mask>": 1, "<cls>": 2,
                                    "G1": 3})
  assert (only_cls.cls_id, only_cls.eos_id) == (2, 4)


# --- vocabulary directories --------------------------------------------------


def test_save_load_round_trip(tmp_path):
  v = Vocab.from_genes(["B", "A"])
  medians = {"A": 1.5, "B": np.float32(2.0), "unused": 9.0}
  info = {"source": "test", "median_space": "log1p"}
  vocab_lib.save_vocab_dir(tmp_path / "v", v, medians, info)
  v2, medians2, info2 = vocab_lib.load_vocab_dir(tmp_path / "v")
  assert v2 == v
  assert medians2 == {"A": 1.5, "B": 2.0}
  assert info2 == info
  # Atomic writes leave no temp files behind.
  assert sorted(os.listdir(tmp_path / "v")) == [
      "medians.json", "vocab.json", "vocab_info.json"]


def test_save_requires_a_median_per_gene(tmp_path):
  with pytest.raises(DataError, match=r"1 of 2 gene tokens have no median.*B"):
    vocab_lib.save_vocab_dir(tmp_path, Vocab.from_genes(["A", "B"]), {"A": 1})
  with pytest.raises(DataError, match="finite numbers > 0"):
    vocab_lib.save_vocab_dir(tmp_path, Vocab.from_genes(["A"]), {"A": 0.0})


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match="vocabulary directory not found"):
    vocab_lib.load_vocab_dir(tmp_path / "absent")
  with pytest.raises(DataError, match=r"vocab\.json: file not found"):
    vocab_lib.load_vocab_dir(tmp_path)
  vocab_lib.save_vocab_dir(tmp_path, Vocab.from_genes(["A", "B"]),
                           {"A": 1.0, "B": 2.0})
  (tmp_path / "medians.json").write_text(json.dumps({"A": 1.0}))
  with pytest.raises(DataError, match=r"medians\.json.*no median.*'B'"):
    vocab_lib.load_vocab_dir(tmp_path)
  (tmp_path / "vocab.json").write_text("{not json")
  with pytest.raises(DataError, match=r"vocab\.json: cannot read it as JSON"):
    vocab_lib.load_vocab_dir(tmp_path)


def test_import_geneformer_real(shared_data, tmp_path):
  token_pkl, median_pkl = _geneformer_files(shared_data)
  v, medians = vocab_lib.import_geneformer(token_pkl, median_pkl, tmp_path)
  assert len(v) == 25_428
  assert (v.pad_id, v.mask_id, v.cls_id, v.eos_id) == (0, 1, 25_426, 25_427)
  assert len(v.gene_ids) == len(medians) == 25_424
  # Geneformer's ids are kept unchanged.
  for gene, want in [("ENSG00000000003", 2), ("ENSG00000000005", 3),
                     ("ENSGR0000265658", 25_425)]:
    assert v.token_to_id[gene] == want
  raw_tokens = safe_pickle.load_pickle(token_pkl)
  raw_medians = safe_pickle.load_pickle(median_pkl)
  assert all(v.token_to_id[t] == i for t, i in raw_tokens.items())
  assert medians == raw_medians
  assert medians["ENSG00000000003"] == 2.001186019549122
  loaded, loaded_medians, info = vocab_lib.load_vocab_dir(tmp_path)
  assert loaded == v and loaded_medians == medians
  assert info["source"] == "geneformer"
  assert info["median_space"] == "normalized"
  assert info["dropped_tokens_without_median"] == 0
  assert info["geneformer_ids_preserved"] is True


def test_import_geneformer_drops_genes_without_median(tmp_path):
  tokens = {"<pad>": 0, "<mask>": 1, "G1": 2, "G2": 3, "G3": 4}
  (tmp_path / "t.pkl").write_bytes(pickle.dumps(tokens))
  (tmp_path / "m.pkl").write_bytes(pickle.dumps({"G1": 1.0, "G3": 3.0,
                                                 "G9": 9.0}))
  v, medians = vocab_lib.import_geneformer(tmp_path / "t.pkl",
                                           tmp_path / "m.pkl", tmp_path / "v")
  assert v.id_to_token == ["<pad>", "<mask>", "G1", "G3", "<cls>", "<eos>"]
  assert medians == {"G1": 1.0, "G3": 3.0}
  info = vocab_lib.load_vocab_dir(tmp_path / "v")[2]
  assert info["dropped_tokens_without_median"] == 1
  assert info["dropped_medians_without_token"] == 1
  assert info["geneformer_ids_preserved"] is False


# --- safe_pickle -------------------------------------------------------------


class _RunsCommand:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_real_pickles_become_plain_python(shared_data):
  token_pkl, median_pkl = _geneformer_files(shared_data)
  tokens = safe_pickle.load_pickle(token_pkl)
  assert len(tokens) == 25_426 and tokens["ENSG00000000003"] == 2
  assert {type(i) for i in tokens.values()} == {int}
  medians = safe_pickle.load_pickle(median_pkl)
  assert {type(m) for m in medians.values()} == {float}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_scalars_in_all_protocols(tmp_path, protocol):
  data = {"i": np.int16(7), np.str_("k"): [np.float32(1.5), np.bool_(True)],
          "t": (np.uint8(3), b"x", 1j), "s": {np.int64(1)}, "n": None}
  path = tmp_path / "ok.pkl"
  path.write_bytes(pickle.dumps(data, protocol=protocol))
  loaded = safe_pickle.load_pickle(path)
  assert loaded == {"i": 7, "k": [1.5, True], "t": (3, b"x", 1j), "s": {1},
                    "n": None}
  assert type(loaded["i"]) is int and type(loaded["k"][1]) is bool
  assert type(next(iter(loaded))) is str


def test_refuses_os_system_without_running_it(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps(_RunsCommand(marker)))
  with pytest.raises(DataError) as e:
    safe_pickle.load_pickle(path)
  assert str(e.value).startswith(f"{path}: refusing to unpickle ")
  assert "system: only plain containers, strings, numbers and numpy " in str(
      e.value)
  # A hand-written protocol 0 pickle naming os.system directly.
  path.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
  with pytest.raises(DataError, match=r"refusing to unpickle os\.system"):
    safe_pickle.load_pickle(path)
  assert not marker.exists()


@pytest.mark.parametrize("obj, name", [
    # Harmless in itself, but no file we read needs it: refused to keep the
    # allowlist minimal (see the safe_pickle module docstring).
    (collections.OrderedDict(a=1), "collections.OrderedDict"),
    (np.arange(3), "_reconstruct"),
    (eval, "builtins.eval"),
])
def test_refuses_everything_outside_the_allowlist(tmp_path, obj, name):
  path = tmp_path / "x.pkl"
  path.write_bytes(pickle.dumps(obj))
  with pytest.raises(DataError, match=f"refusing to unpickle .*{name}"):
    safe_pickle.load_pickle(path)


@pytest.mark.parametrize("obj", [np.dtype("i4"), np.datetime64("2020-01-01")])
def test_refuses_numpy_values_that_are_not_plain(tmp_path, obj):
  # Built only from allowed names, but not numbers: refused after loading.
  path = tmp_path / "x.pkl"
  path.write_bytes(pickle.dumps({"k": obj}))
  with pytest.raises(DataError, match="which is not plain data"):
    safe_pickle.load_pickle(path)


def test_codecs_encode_only_for_latin1(tmp_path):
  path = tmp_path / "x.pkl"
  path.write_bytes(b"c_codecs\nencode\n(S'abc'\nS'rot13'\ntR.")
  with pytest.raises(DataError, match="codec 'rot13'"):
    safe_pickle.load_pickle(path)


def test_truncated_and_missing_pickles(shared_data, tmp_path):
  token_pkl, _ = _geneformer_files(shared_data)
  path = tmp_path / "cut.pkl"
  path.write_bytes(token_pkl.read_bytes()[:5000])
  with pytest.raises(DataError,
                     match=re.escape(f"{path}: not a readable pickle")):
    safe_pickle.load_pickle(path)
  path.write_bytes(b"")
  with pytest.raises(DataError, match="truncated or corrupt"):
    safe_pickle.load_pickle(path)
  with pytest.raises(DataError, match="file not found"):
    safe_pickle.load_pickle(tmp_path / "absent.pkl")
