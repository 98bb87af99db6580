"""finetune(c, workdir): cell type annotation on a pretrained GeneMamba, in named sections.

checkpoint -> cells (tokenized with the checkpoint's vocabulary, <cls> first) ->
labels and splits -> the workdir (new, or an interrupted run to resume) ->
training (trainer.py) -> predictions for every cell -> scores and outputs ->
the fine-tuned checkpoint (a run directory that `embed`, `evaluate` and
`load_classifier` read). metrics.json is written last: a workdir holding it is
a finished run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anndata
import ml_collections
import numpy as np
from flax import nnx

from genemamba_jax import errors, files, inference, rundir
from genemamba_jax.data import genes as genes_lib
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.data import soma_reader
from genemamba_jax.data.readers import AnnDataSource, check_obs_columns
from genemamba_jax.errors import DataError
from genemamba_jax.finetune import config as config_lib
from genemamba_jax.finetune import predict as predict_lib
from genemamba_jax.finetune import report
from genemamba_jax.finetune import splits as splits_lib
from genemamba_jax.finetune import trainer
from genemamba_jax.finetune.head import CellTypeClassifier
from genemamba_jax.model import GeneMamba
from genemamba_jax.train.checkpoint import Checkpointer

CONFIG_FILE = "config.json"
# Keys a resumed run may change: they do not change what is trained.
RUN_TIME_KEYS = ("log_every", "write_h5ad")
# How error messages name the settings inside `finetune` (its flags are config keys).
OPTION_NAMES = {key: f"--config.data.{key}" for key in ("layer", "gene_column", "gene_map",
                                                        "max_len", "measurement", "obs_filter",
                                                        "tiledb_config")}


def finetune(c: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Fine-tunes as `c` says (finetune/config.py); returns metrics {split: scores}, plus
  "stopped": "SIGINT" | "SIGTERM" when a signal stopped it after saving a checkpoint.

  Everything is checked before anything is written. A workdir holding an
  unfinished run with the same settings resumes it; one holding a finished run,
  a run with other settings or anything else is refused.
  """
  config_lib.check(c)
  with errors.option_names(**OPTION_NAMES):
    return _finetune(c, Path(workdir))


def _finetune(c: ml_collections.ConfigDict, workdir: Path) -> dict:
  _check_workdir(workdir, c)  # before the work: a refused workdir is refused at once

  # --- the pretrained backbone, with a trained-looking <cls>
  base = rundir.load_pretrained(c.init_checkpoint)
  if base.vocab.cls_id is None:  # e.g. a converted original checkpoint: append the row
    base = rundir.add_tokens(base, [vocab_lib.CLS])
  elif not base.tokenize.get("cls") and base.task is None:
    # Never seen in pretraining: start it at the mean gene embedding (the original's choice).
    rundir.start_at_gene_mean(base.model, base.vocab, base.vocab.cls_id)
  backbone = base.model

  # --- cells, labels, splits
  path = c.data.input
  columns = [c.label_column] + ([c.split_column] if c.split_column else [])
  adata, source, soma = _read(c, columns)
  max_len = c.data.max_len or base.tokenize.get("max_len", 2048)
  gene_map = genes_lib.load_gene_map(c.data.gene_map) if c.data.gene_map else None
  tokenizer = base.tokenizer(max_len=max_len, cls=True, gene_map=gene_map)
  sentences, obs_names, obs = inference.tokenize_all(tokenizer, source, columns)
  labels, classes = splits_lib.encode_labels(obs[c.label_column],
                                             f"{path}: obs[{c.label_column!r}]")
  if c.split_column:
    split = splits_lib.split_from_column(obs[c.split_column], labels,
                                         f"{path}: obs[{c.split_column!r}]")
  else:
    split = splits_lib.stratified_split(labels, c.val_fraction, c.test_fraction, c.seed)
  cells = trainer.Cells(sentences, labels, split, classes, backbone.config.pad_id)
  plan = trainer.Plan.of(c, len(cells.rows("train")))
  print(f"{len(obs_names)} cells, {len(classes)} cell types; "
        + ", ".join(f"{s} {np.sum(split == s)}"
                    for s in (*splits_lib.SPLITS, splits_lib.UNLABELLED))
        + f"; {plan.num_steps} steps of {plan.batch_size} cells")

  # --- the workdir: new, or an unfinished run with these settings (resumed)
  _claim_workdir(workdir, c)

  # --- training
  d, pooling = backbone.config.d_model, c.pooling
  hidden = [c.head_width or d] * c.head_layers if c.head == "mlp" else []
  task = {"label_column": c.label_column, "classes": classes, "pooling": pooling,
          "head_hidden": hidden, "dropout": c.dropout, "negative_slope": c.negative_slope,
          "init_checkpoint": str(base.checkpoint.step_dir),
          "data": {"layer": c.data.layer, "gene_column": c.data.gene_column,
                   "gene_map": os.path.abspath(c.data.gene_map) if c.data.gene_map else "",
                   "max_len": max_len, **soma}}

  def build_model():
    rngs = nnx.Rngs(c.seed)
    return CellTypeClassifier(GeneMamba(backbone.config, rngs=rngs),
                              predict_lib.build_head(d, task, rngs), pooling)

  core = trainer.make_core(c, build_model, len(classes), plan.num_steps, plan.batch_size)
  result = trainer.train(c, core, nnx.to_pure_dict(nnx.state(backbone, nnx.Param)), cells, plan,
                         workdir)
  if result.stopped:
    return {"stopped": result.stopped, "step": result.steps}

  # --- predictions for every cell, scores and outputs
  model = result.model
  graphdef, state = nnx.split(model)
  probabilities, embeddings = predict_lib.predict_batches(
      predict_lib.make_predict_step(graphdef), state, sentences, 64, cells.pad_id)
  pred = probabilities.argmax(axis=1)
  labelled = labels >= 0
  metrics = report.all_metrics(split[labelled], labels[labelled], pred[labelled], classes)
  frame = report.predictions_frame(obs_names, split, labels, pred, probabilities, classes)
  report.write_csv(frame, workdir / "predictions.csv")
  shown = "test" if "test" in metrics else "val" if "val" in metrics else "train"
  report.plot_confusion(labels[split == shown], pred[split == shown], classes,
                        workdir / "confusion_matrix.png",
                        f"{shown} split: accuracy {metrics[shown]['accuracy']:.3f}, "
                        f"macro-F1 {metrics[shown]['macro_f1']:.3f}")
  if c.write_h5ad:
    _write_h5ad(adata, frame, embeddings, workdir / "predictions.h5ad")

  # --- the fine-tuned checkpoint, loadable like a pretraining run; metrics.json last
  task.update(num_steps=result.steps, best_step=result.best_step,
              early_stopped=result.early_stopped)
  rundir.write_run_files(workdir, backbone.config, base.vocab, base.medians,
                         {**base.tokenize, "cls": True, "max_len": max_len}, task)
  params = {"backbone": nnx.to_pure_dict(nnx.state(model.backbone, nnx.Param)),
            "head": nnx.to_pure_dict(nnx.state(model.head, nnx.Any(nnx.Param, nnx.BatchStat)))}
  with Checkpointer(workdir / rundir.CHECKPOINTS, keep=1, save_every=1 << 30) as ckpt:
    ckpt.save(result.best_step, {"params": params}, force=True)
  report.write_metrics(metrics, workdir / "metrics.json")
  shutil.rmtree(workdir / trainer.TRAIN_STATE, ignore_errors=True)  # resume state: done
  return metrics


def _check_workdir(workdir: Path, c: ml_collections.ConfigDict) -> None:
  """Raises DataError unless `workdir` is new, empty, or an unfinished run with `c`'s settings."""
  if (workdir / "metrics.json").exists():
    raise DataError(f"{workdir}: already holds a fine-tuned run; choose a new --workdir or "
                    "remove it")
  if (workdir / CONFIG_FILE).is_file():
    saved = files.read_json(workdir / CONFIG_FILE, "choose a new --workdir")
    flat_new, flat_saved = dict(_flatten(config_lib.recorded(c))), dict(_flatten(saved))
    differences = [f"{k} {flat_saved.get(k)!r} -> {flat_new.get(k)!r}"
                   for k in sorted(set(flat_new) | set(flat_saved))
                   if k not in RUN_TIME_KEYS and flat_new.get(k) != flat_saved.get(k)]
    if differences:
      raise DataError(f"{workdir}: holds an unfinished fine-tuning run with other settings "
                      f"({'; '.join(differences)}); resume it with its own settings (its "
                      "config.json), or choose a new --workdir")
  elif workdir.exists() and any(workdir.iterdir()):
    raise DataError(f"{workdir}: exists and is not empty; choose a new --workdir or remove it")


def _claim_workdir(workdir: Path, c: ml_collections.ConfigDict) -> None:
  """Creates the workdir with config.json, or checks the unfinished run there has `c`'s settings."""
  _check_workdir(workdir, c)  # again: another process may have claimed it meanwhile
  workdir.mkdir(parents=True, exist_ok=True)
  files.write_json_atomic(workdir / CONFIG_FILE, config_lib.recorded(c))


def _flatten(tree, prefix: str = ""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}{k}.")
  else:
    yield prefix[:-1], tree


def _read(c: ml_collections.ConfigDict, columns: list[str]
          ) -> tuple[anndata.AnnData, AnnDataSource, dict]:
  """(the input's cells in memory, a source over them, how a SOMA experiment was read: {} for
  an .h5ad, else {"measurement", "x_layer", "obs_filter"}, recorded in task.json "data")."""
  path, layer, gene_column = c.data.input, c.data.layer or None, c.data.gene_column or None
  if soma_reader.is_soma(path):
    # Labelled sets are small: the selected cells are read into an AnnData (its X: the layer).
    experiment = soma_reader.SomaSource(
        path, layer, gene_column, soma_reader.SomaOptions(
            c.data.measurement, c.data.obs_filter or None, config_lib.tiledb_settings(c)))
    if not experiment.n_cells:
      raise DataError(f"{path}: {errors.option('obs_filter')} {c.data.obs_filter!r} selects no "
                      "cells")
    check_obs_columns(experiment, columns)
    adata = experiment.to_anndata()
    return adata, AnnDataSource(adata, path), {
        "measurement": c.data.measurement, "x_layer": experiment.layer,
        "obs_filter": c.data.obs_filter}
  if c.data.obs_filter:
    raise DataError(f"{path}: {errors.option('obs_filter')} applies to SOMA experiments; "
                    "select the cells of an .h5ad before")
  if not Path(path).exists():
    raise DataError(f"{path}: no such file; set --config.data.input to your .h5ad file or SOMA "
                    "experiment")
  if not Path(path).is_file() or Path(path).suffix != ".h5ad":
    raise DataError(f"{path}: not an .h5ad file or SOMA experiment; set --config.data.input to "
                    "one")
  try:
    adata = anndata.read_h5ad(path)
  except (OSError, KeyError, ValueError) as e:
    raise DataError(f"{path}: not a readable .h5ad file ({e})") from None
  return adata, AnnDataSource(adata, path, layer, gene_column), {}


def _write_h5ad(adata: anndata.AnnData, frame, embeddings: np.ndarray, path: Path) -> None:
  """The input with the predictions in obs and the fine-tuned cell embeddings in obsm."""
  out = adata.copy()
  out.obs["genemamba_prediction"] = frame["pred"].to_numpy()
  out.obs["genemamba_confidence"] = frame["confidence"].to_numpy()
  out.obs["genemamba_split"] = frame["split"].to_numpy()
  out.obsm["X_genemamba"] = embeddings
  with files.atomic_path(path) as tmp:
    files.write_h5ad(out, tmp)
