"""Several tokenized directories read as one corpus (genemamba_jax.data.corpora + pipeline)."""

import json

import numpy as np
import pytest

from genemamba_jax.data import corpora, pipeline
from genemamba_jax.errors import DataError
from tests.data.test_pipeline import LABELS, _build

VOCAB = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "GENE_A": 4}
MEDIANS = {"GENE_A": 1.5}


@pytest.fixture(scope="module")
def two_dirs(tmp_path_factory):
  """Directories a (31 cells, ids 0..30) and b (23 cells, ids 31..53), the same vocabulary; b
  knows one more label, so the combined label list re-indexes "T cell"."""
  a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
  cells = _build(a, (20, 11), vocab=VOCAB, medians=MEDIANS, seed=1)
  cells += _build(b, (9, 0, 14), vocab=VOCAB, medians=MEDIANS, seed=2, first=31,
                  labels=LABELS + ["NK cell"], sources=["b.h5ad"],
                  settings={"max_len": 64, "cls": True, "eos": True, "layer": "counts"})
  return str(a), str(b), cells


def _config(**kwargs):
  base = dict(batch_size=8, seq_len=16, shard_index=0, shard_count=1)
  return pipeline.PipelineConfig(**{**base, **kwargs})


def _ids(batch):
  return (batch["tokens"][:, 1] - 100).tolist()


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_combined_manifest(two_dirs):
  a, b, _ = two_dirs
  manifest = corpora.load_manifest(f"{a},{b}")
  assert manifest["num_cells"] == 54
  assert manifest["labels"] == ["B cell", "NK cell", "T cell"]
  assert manifest["sources"] == ["a.h5ad", "b.h5ad"]
  assert manifest["directories"] == [a, b]
  # The settings both share are kept; b's own `layer` is not the corpus's.
  assert manifest["settings"] == {"max_len": 64, "cls": True, "eos": True}
  assert corpora.load_manifest([a, b]) == manifest
  assert corpora.load_manifest(a)["num_cells"] == 31  # one directory: its own manifest


def test_in_order_reads_a_then_b(two_dirs):
  a, b, cells = two_dirs
  config = _config(batch_size=5, seq_len=40, shuffle=False, num_epochs=1, drop_remainder=False)
  batches = list(pipeline.make_dataset(f"{a}, {b}", config))
  assert [i for batch in batches for i in _ids(batch)] == list(range(54))
  assert len(batches) == pipeline.num_batches_per_epoch(f"{a},{b}", config) == 11
  labels = ["B cell", "NK cell", "T cell"]
  for batch in batches:
    for row, i in enumerate(_ids(batch)):
      tokens, meta = cells[i]
      np.testing.assert_array_equal(batch["tokens"][row, :len(tokens)], tokens)
      want = labels.index(meta["label"]) if "label" in meta else -1
      assert batch["label"][row] == want


def test_shuffle_and_process_shards_span_both(two_dirs):
  a, b, _ = two_dirs
  seen = []
  for index in range(2):
    config = _config(batch_size=9, num_epochs=1, shard_index=index, shard_count=2)
    seen.append([i for batch in pipeline.make_dataset([a, b], config) for i in _ids(batch)])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(54))  # 54 = 2 shards x 3 batches x 9
  for ids in seen:  # each process reads cells of both directories, mixed
    assert min(ids) < 31 <= max(ids)
    assert ids != sorted(ids)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_mid_epoch_equals_uninterrupted(two_dirs, workers):
  a, b, _ = two_dirs
  path = f"{a},{b}"
  config = _config(batch_size=8, worker_count=workers)  # 6 batches an epoch, repeats forever
  reference = _take(iter(pipeline.make_dataset(path, _config(batch_size=8))), 14)
  it = iter(pipeline.make_dataset(path, config))
  try:
    first = _take(it, 4)  # mid-epoch
    state = json.loads(json.dumps(it.get_state()))
  finally:
    if workers:
      it.close()
  fresh = iter(pipeline.make_dataset(path, config))
  try:
    fresh.set_state(state)
    rest = _take(fresh, 10)  # on into the next two epochs
  finally:
    if workers:
      fresh.close()
  assert len(first + rest) == len(reference)
  for got, want in zip(first + rest, reference):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("change, message", [
    (dict(vocab={**VOCAB, "GENE_A": 5}), "vocab['GENE_A']: 5 vs 4"),
    (dict(vocab={**VOCAB, "GENE_B": 5}), "vocab['GENE_B']: 5 vs '(absent)'"),
    (dict(medians={"GENE_A": 2.0}), "medians['GENE_A']: 2.0 vs 1.5"),
    (dict(settings={"max_len": 64, "cls": False, "eos": True}), "settings.cls: False vs True"),
    (dict(token_dtype="int32"), "token_dtype: 'int32' vs 'uint16'"),
])
def test_different_tokenizations_are_refused(two_dirs, tmp_path, change, message):
  a, _, _ = two_dirs
  other = tmp_path / "other"
  _build(other, (5,), **{"vocab": VOCAB, "medians": MEDIANS, **change})
  with pytest.raises(DataError, match="tokenized differently") as e:
    pipeline.make_dataset(f"{a},{other}", _config(batch_size=4))
  assert message in str(e.value) and str(other) in str(e.value) and "\n" not in str(e.value)


def test_bad_paths(two_dirs, tmp_path):
  a, _, _ = two_dirs
  with pytest.raises(DataError, match="twice"):
    corpora.load_manifest(f"{a},{a}")
  with pytest.raises(DataError, match="names no directory"):
    corpora.load_manifest(" , ")
  with pytest.raises(DataError, match="not a tokenized dataset"):
    corpora.load_manifest(f"{a},{tmp_path}")
