"""The trained classifier: `load_classifier(run_dir) -> Classifier`, and batched prediction.

Prediction pads and batches cells as genemamba_jax/inference.py does
(`padded_batches`: input order, power-of-two length buckets, a short last batch
filled with empty rows), so results do not depend on the batch size beyond float
rounding. The fine-tuning loop (trainer.py) predicts validation cells and every
cell of its input with `make_predict_step` (on its training devices); a loaded
`Classifier` splits each batch's rows over every local device (inference.batch_step).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from genemamba_jax import inference, rundir
from genemamba_jax.data import genes as genes_lib
from genemamba_jax.errors import DataError
from genemamba_jax.finetune.head import CellTypeClassifier, ClassifierHead, pooled_width


def make_predict_step(graphdef) -> Callable:
  """Jitted (state, tokens [B, L], mask [B, L]) -> (probabilities [B, classes], cells [B, d]).

  `graphdef`, `state`: an eval-mode CellTypeClassifier split by `nnx.split`. One
  jitted function per graphdef: the trainer calls it every epoch with new states
  without compiling again.
  """

  @jax.jit
  def step(state, tokens, mask):
    model = nnx.merge(graphdef, state)
    cells = model.embed(tokens, mask)
    return jax.nn.softmax(model.head(cells), axis=-1), cells

  return step


def _classify(model: CellTypeClassifier, tokens, mask, carry):
  """`inference.batch_step`'s fn: ((probabilities [B, classes], cells [B, d]), carry)."""
  cells = model.embed(tokens, mask)
  return (jax.nn.softmax(model.head(cells), axis=-1), cells), carry


def predict_batches(step: Callable, state, sentences: Sequence[np.ndarray], batch_size: int,
                    pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(probabilities [cells, classes] float32, cells [cells, d] float32) in input order."""
  probabilities, cells = [], []
  for start, stop, tokens, mask in inference.padded_batches(sentences, batch_size, pad_id):
    p, e = step(state, tokens, mask)
    probabilities.append(np.asarray(p[:stop - start], np.float32))
    cells.append(np.asarray(e[:stop - start], np.float32))
  if not probabilities:
    raise ValueError("no cells to predict")
  return np.concatenate(probabilities), np.concatenate(cells)


@dataclasses.dataclass
class Classifier:
  """A fine-tuned cell type classifier in eval mode (`load_classifier`).

  `model(tokens [B, L], mask [B, L]) -> logits [B, classes]`; `run` is the loaded
  run directory (vocabulary, task.json); `tokenizer()` and `tokenize()` make cells
  the way the run was trained (its max_len, <cls>, gene map; task.json "data").
  """
  model: CellTypeClassifier
  classes: list[str]
  run: rundir.Pretrained

  def __post_init__(self):
    # Every local device: the rows of a batch are split over them (inference.batch_step).
    self._step = inference.batch_step(_classify, self.model)

  @property
  def data_settings(self) -> dict:
    """How the run read its cells: {"layer", "gene_column", "gene_map", "max_len"}, and for a
    SOMA experiment {"measurement", "x_layer", "obs_filter"} (`predict`'s --measurement,
    --x-layer, --obs-filter)."""
    return dict(self.run.task.get("data", {}))

  def tokenizer(self):
    """The run's tokenizer: its max_len, <cls> first, its gene map; every cell kept, in order."""
    data = self.data_settings
    gene_map = genes_lib.load_gene_map(data["gene_map"]) if data.get("gene_map") else None
    return self.run.tokenizer(max_len=data.get("max_len") or None, cls=True, gene_map=gene_map)

  def tokenize(self, adata, path: str = "<AnnData>", layer: str | None = None,
               gene_column: str | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """An AnnData's cells -> (sentences, obs_names), in input order. `layer` and `gene_column`
    default to the run's (task.json "data"); pass them when the new file differs."""
    from genemamba_jax.data.readers import AnnDataSource  # pylint: disable=g-import-not-at-top
    data = self.data_settings
    source = AnnDataSource(adata, path, layer if layer is not None else data.get("layer") or None,
                           gene_column if gene_column is not None
                           else data.get("gene_column") or None)
    sentences, obs_names, _ = inference.tokenize_all(self.tokenizer(), source, desc=None)
    return sentences, obs_names

  def predict_sentences(self, sentences: Sequence[np.ndarray], batch_size: int = 64
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenized cells -> (probabilities [cells, classes] float32, cell embeddings [cells, d]
    float32; d = d_model, 2 d_model for cls_mean pooling), in input order."""
    outputs, _ = inference.map_batches(self._step, sentences, batch_size,
                                       self.model.backbone.config.pad_id, desc=None)
    if not outputs:
      raise ValueError("no cells to predict")
    return tuple(np.concatenate([np.asarray(o[i], np.float32) for o in outputs]) for i in (0, 1))

  def predict(self, sentences: Sequence[np.ndarray], batch_size: int = 64
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels [cells] str, probabilities, embeddings): `predict_sentences` plus the argmax."""
    probabilities, embeddings = self.predict_sentences(sentences, batch_size)
    labels = np.asarray(self.classes, dtype=object)[probabilities.argmax(axis=1)]
    return labels, probabilities, embeddings


def build_head(d_model: int, task: dict, rngs: nnx.Rngs) -> ClassifierHead:
  """The head task.json describes (pooling, hidden widths, dropout, slope), freshly initialized."""
  return ClassifierHead(pooled_width(d_model, task.get("pooling", "cls")), len(task["classes"]),
                        task["head_hidden"], dropout=task["dropout"],
                        negative_slope=task["negative_slope"], rngs=rngs)


def load_classifier(path: str | os.PathLike) -> Classifier:
  """A fine-tuned run (or one of its checkpoints) -> its `Classifier`, whose predictions equal
  the run's predictions.csv."""
  loaded = rundir.load_pretrained(path)
  if loaded.task is None or loaded.head is None:
    raise DataError(f"{loaded.checkpoint.run_dir}: not a fine-tuned run (no task.json / head); "
                    "pass the --workdir of genemamba_jax.finetune")
  head = build_head(loaded.config.d_model, loaded.task, nnx.Rngs(0))
  state = nnx.state(head, nnx.Any(nnx.Param, nnx.BatchStat))
  nnx.replace_by_pure_dict(state, rundir.select_like(loaded.head, nnx.to_pure_dict(state)))
  nnx.update(head, state)
  model = CellTypeClassifier(loaded.model, head, loaded.task.get("pooling", "cls"))
  model.eval()
  return Classifier(model, list(loaded.task["classes"]), loaded)
