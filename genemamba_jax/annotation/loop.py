"""finetune(c, workdir): cell type annotation on a pretrained GeneMamba, in named sections.

checkpoint -> cells (tokenized with the checkpoint's vocabulary, <cls> first) ->
labels and splits -> classifier -> training -> predictions for every cell ->
scores and outputs -> fine-tuned checkpoint (a run directory that `embed`,
`evaluate` and `load_classifier` read).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import anndata
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from genemamba_jax import inference
from genemamba_jax import progress as progress_lib
from genemamba_jax import rundir
from genemamba_jax.annotation import config as config_lib
from genemamba_jax.annotation import report
from genemamba_jax.annotation import splits as splits_lib
from genemamba_jax.annotation.head import CellTypeClassifier, ClassifierHead
from genemamba_jax.files import atomic_dir, atomic_path
from genemamba_jax.data import genes as genes_lib
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax import errors
from genemamba_jax.errors import DataError
from genemamba_jax.data.readers import AnnDataSource
from genemamba_jax.train.checkpoint import Checkpointer

PREDICTION_COLUMNS = ("genemamba_prediction", "genemamba_confidence", "genemamba_split")


# How error messages name the settings inside `finetune` (its flags are config keys).
OPTION_NAMES = {"layer": "--config.data.layer", "gene_column": "--config.data.gene_column",
                "gene_map": "--config.data.gene_map", "max_len": "--config.data.max_len"}


def finetune(c: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Fine-tunes as `c` says (see annotation/config.py); returns metrics {split: scores}.

  The workdir appears complete or not at all: everything is written to a hidden
  sibling and renamed at the end, so a failed, interrupted or killed run leaves
  nothing a re-run trips over. A workdir that already holds a fine-tuned run is refused.
  """
  config_lib.check(c)
  workdir = Path(workdir)
  if (workdir / "metrics.json").exists() or (workdir / rundir.CHECKPOINTS).exists():
    raise DataError(f"{workdir}: already holds a fine-tuned run; choose a new --workdir or "
                    "remove it")
  with errors.option_names(**OPTION_NAMES):
    try:
      with atomic_dir(workdir) as tmp:
        return _finetune(c, tmp)
    except FileExistsError:
      raise DataError(f"{workdir}: exists and is not empty; choose a new --workdir or remove "
                      "it") from None


def _finetune(c: ml_collections.ConfigDict, workdir: Path) -> dict:
  """`finetune`, writing into `workdir` (the hidden sibling)."""
  # --- the pretrained backbone, with a trained-looking <cls>
  base = rundir.load_pretrained(c.init_checkpoint)
  # <cls> first, as the original fine-tunes.
  if base.vocab.cls_id is None:  # e.g. a converted original checkpoint: append the row
    base = rundir.add_tokens(base, [vocab_lib.CLS])
  elif not base.tokenize.get("cls") and base.task is None:
    # Never seen in pretraining: start it at the mean gene embedding (the original's choice).
    rundir.start_at_gene_mean(base.model, base.vocab, base.vocab.cls_id)
  backbone = base.model

  # --- cells, labels, splits
  path = c.data.input
  adata = _read(path)
  columns = [c.label_column] + ([c.split_column] if c.split_column else [])
  source = AnnDataSource(adata, path, c.data.layer or None, c.data.gene_column or None)
  max_len = c.data.max_len or base.tokenize.get("max_len", 2048)
  gene_map = genes_lib.load_gene_map(c.data.gene_map) if c.data.gene_map else None
  tokenizer = base.tokenizer(max_len=max_len, cls=True, gene_map=gene_map)
  sentences, obs_names, obs = inference.tokenize_all(tokenizer, source, columns)
  labels, classes = splits_lib.encode_labels(obs[c.label_column], f"{path}: obs[{c.label_column!r}]")
  if c.split_column:
    split = splits_lib.split_from_column(obs[c.split_column], labels,
                                         f"{path}: obs[{c.split_column!r}]")
  else:
    split = splits_lib.stratified_split(labels, c.val_fraction, c.test_fraction, c.seed)
  train_idx = np.flatnonzero(split == "train")
  print(f"{len(obs_names)} cells, {len(classes)} cell types; "
        + ", ".join(f"{s} {np.sum(split == s)}" for s in (*splits_lib.SPLITS, splits_lib.UNLABELLED)))

  # --- classifier and optimizer
  d = backbone.config.d_model
  hidden = [c.head_width or d] * c.head_layers if c.head == "mlp" else []
  rngs = nnx.Rngs(params=c.seed, dropout=c.seed + 1)
  head = ClassifierHead(d, len(classes), hidden, dropout=c.dropout,
                        negative_slope=c.negative_slope, rngs=rngs)
  model = CellTypeClassifier(backbone, head, c.pooling)
  batch_size = min(c.batch_size, len(train_idx))
  steps_per_epoch = len(train_idx) // batch_size
  num_steps = c.num_steps or c.epochs * steps_per_epoch
  wrt = nnx.All(nnx.Param, nnx.PathContains("head")) if c.freeze_backbone else nnx.Param
  optimizer = nnx.Optimizer(model, _optimizer(c, num_steps), wrt=wrt)
  weights = _class_weights(labels[train_idx], len(classes), c.class_weights)
  train_step = _make_train_step(wrt)

  # --- training: one padded length for every batch (one compiled shape)
  length = inference.bucket_length(max(len(s) for s in sentences), 1 << 30)
  with (open(workdir / "metrics.jsonl", "a", encoding="utf-8") as log,
        progress_lib.bar(num_steps, "fine-tuning", "step", counts=False) as progress):
    rng = np.random.default_rng(c.seed)
    order = np.zeros((0,), np.int64)
    model.train()
    for step in range(num_steps):
      if len(order) < batch_size:  # a new epoch: reshuffle; the remainder is dropped (BatchNorm)
        order = rng.permutation(train_idx)
      rows, order = order[:batch_size], order[batch_size:]
      tokens, mask = _pad([sentences[i] for i in rows], length, backbone.config.pad_id)
      loss, accuracy = train_step(model, optimizer, tokens, mask, jnp.asarray(labels[rows]), weights)
      if (step + 1) % c.log_every == 0 or step + 1 == num_steps:
        record = {"step": step + 1, "loss": float(loss), "train_batch_accuracy": float(accuracy)}
        if c.eval_every and (step + 1) % c.eval_every == 0 and np.any(split == "val"):
          model.eval()
          val = np.flatnonzero(split == "val")
          pred, _, _ = _predict(model, [sentences[i] for i in val])
          record["val_accuracy"] = float(np.mean(pred == labels[val]))
          model.train()
        log.write(json.dumps(record) + "\n")
        log.flush()
        progress.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
      progress.update(1)

  # --- predictions for every cell, scores and outputs
  model.eval()
  pred, probabilities, embeddings = _predict(model, sentences)
  labelled = labels >= 0
  metrics = report.all_metrics(split[labelled], labels[labelled], pred[labelled], classes)
  report.write_metrics(metrics, workdir / "metrics.json")
  frame = report.predictions_frame(obs_names, split, labels, pred, probabilities, classes)
  report.write_csv(frame, workdir / "predictions.csv")
  shown = "test" if "test" in metrics else "val" if "val" in metrics else "train"
  report.plot_confusion(labels[split == shown], pred[split == shown], classes,
                        workdir / "confusion_matrix.png",
                        f"{shown} split: accuracy {metrics[shown]['accuracy']:.3f}, "
                        f"macro-F1 {metrics[shown]['macro_f1']:.3f}")
  if c.write_h5ad:
    _write_h5ad(adata, frame, embeddings, workdir / "predictions.h5ad")

  # --- the fine-tuned checkpoint, loadable like a pretraining run
  task = {"label_column": c.label_column, "classes": classes, "pooling": c.pooling,
          "head_hidden": hidden, "dropout": c.dropout, "negative_slope": c.negative_slope,
          "init_checkpoint": str(base.checkpoint.step_dir), "num_steps": num_steps}
  rundir.write_run_files(workdir, backbone.config, base.vocab, base.medians,
                         {**base.tokenize, "cls": True, "max_len": max_len}, task)
  params = {"backbone": nnx.to_pure_dict(nnx.state(backbone, nnx.Param)),
            "head": nnx.to_pure_dict(nnx.state(head, nnx.Any(nnx.Param, nnx.BatchStat)))}
  with Checkpointer(workdir / "checkpoints", keep=1, save_every=max(num_steps, 1)) as ckpt:
    ckpt.save(num_steps, {"params": params}, force=True)
  return metrics


@dataclasses.dataclass
class Classifier:
  """A fine-tuned cell type classifier, in eval mode (`load_classifier`).

  `model(tokens [B, L], mask [B, L]) -> logits [B, classes]`; `run` is the
  loaded run directory (vocabulary, `run.tokenizer()`, task).
  """
  model: CellTypeClassifier
  classes: list[str]
  run: rundir.Pretrained

  def predict(self, sentences, batch_size: int = 64
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenized cells (as `run.tokenizer()` makes them) -> (labels [cells] str, probabilities
    [cells, classes] float32, cell embeddings [cells, d_model] float32), in input order."""
    pred, probabilities, embeddings = _predict(self.model, sentences, batch_size)
    return np.asarray(self.classes, dtype=object)[pred], probabilities, embeddings


def load_classifier(path: str | os.PathLike) -> Classifier:
  """A fine-tuned run (or one of its checkpoints) -> its `Classifier`."""
  loaded = rundir.load_pretrained(path)
  if loaded.task is None or loaded.head is None:
    raise DataError(f"{loaded.checkpoint.run_dir}: not a fine-tuned run (no task.json / head); "
                    "pass the --workdir of genemamba_jax.finetune")
  task = loaded.task
  head = ClassifierHead(loaded.config.d_model, len(task["classes"]), task["head_hidden"],
                        dropout=task["dropout"], negative_slope=task["negative_slope"],
                        rngs=nnx.Rngs(0))
  state = nnx.state(head, nnx.Any(nnx.Param, nnx.BatchStat))
  nnx.replace_by_pure_dict(state, rundir.select_like(loaded.head, nnx.to_pure_dict(state)))
  nnx.update(head, state)
  model = CellTypeClassifier(loaded.model, head, task["pooling"])
  model.eval()
  return Classifier(model, list(task["classes"]), loaded)


def _read(path: str) -> anndata.AnnData:
  if not Path(path).exists():
    raise DataError(f"{path}: no such file; set --config.data.input to your .h5ad file")
  if not Path(path).is_file() or Path(path).suffix != ".h5ad":
    raise DataError(f"{path}: not an .h5ad file; set --config.data.input to one")
  try:
    return anndata.read_h5ad(path)
  except (OSError, KeyError, ValueError) as e:
    raise DataError(f"{path}: not a readable .h5ad file ({e})") from None


def _optimizer(c, num_steps: int) -> optax.GradientTransformation:
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, c.lr, c.warmup_steps), optax.constant_schedule(c.lr)],
      [c.warmup_steps]) if c.warmup_steps else c.lr
  adam = optax.adamw(schedule, weight_decay=c.weight_decay) if c.weight_decay else optax.adam(
      schedule)
  return optax.chain(optax.clip_by_global_norm(c.clip_norm), adam) if c.clip_norm > 0 else adam


def _class_weights(train_labels: np.ndarray, num_classes: int, balanced: bool) -> jax.Array:
  """[classes]: ones, or n / (classes * n_class) over the training cells (0 for absent classes)."""
  if not balanced:
    return jnp.ones((num_classes,), jnp.float32)
  counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
  weights = np.where(counts > 0, len(train_labels) / (num_classes * np.maximum(counts, 1)), 0.0)
  return jnp.asarray(weights, jnp.float32)


def _make_train_step(wrt):
  @nnx.jit
  def train_step(model, optimizer, tokens, mask, labels, weights):
    def loss_fn(model):
      logits = model(tokens, mask)
      w = weights[labels]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1e-9), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt),
                                               has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

  return train_step


def _pad(rows, length: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
  tokens = np.full((len(rows), length), pad_id, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return jnp.asarray(tokens), jnp.asarray(tokens != pad_id)


@nnx.jit
def _predict_batch(model, tokens, mask):
  embedding = model.embed(tokens, mask)
  return jax.nn.softmax(model.head(embedding), axis=-1), embedding


def _predict(model: CellTypeClassifier, sentences, batch_size: int = 64):
  """Eval-mode (pred [cells], probabilities [cells, classes], embeddings [cells, d]) in order."""
  probabilities, embeddings = [], []
  for start, stop, tokens, mask in inference.padded_batches(sentences, batch_size,
                                                            model.backbone.config.pad_id):
    p, e = _predict_batch(model, jnp.asarray(tokens), jnp.asarray(mask))
    probabilities.append(np.asarray(p[:stop - start]))
    embeddings.append(np.asarray(e[:stop - start]))
  probabilities = np.concatenate(probabilities)
  return probabilities.argmax(axis=1), probabilities, np.concatenate(embeddings)


def _write_h5ad(adata: anndata.AnnData, frame, embeddings: np.ndarray, path: Path) -> None:
  """The input with the predictions in obs and the fine-tuned cell embeddings in obsm."""
  out = adata.copy()
  out.obs["genemamba_prediction"] = frame["pred"].to_numpy()
  out.obs["genemamba_confidence"] = frame["confidence"].to_numpy()
  out.obs["genemamba_split"] = frame["split"].to_numpy()
  out.obsm["X_genemamba"] = embeddings
  with atomic_path(path) as tmp:
    out.write_h5ad(tmp)
