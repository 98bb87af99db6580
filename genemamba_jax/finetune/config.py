"""The fine-tuning configuration for cell type annotation: every key, its default and its checks.

`default_config()` is tuned for small labelled sets (hundreds to a few
thousand cells; bench/RESULTS.md, "Cell type annotation"): mean pooling, a
linear head at lr 1e-2 with dropout 0.1, the backbone at 0.3x that rate, 10%
warmup then cosine, batch 32, 10 epochs but at least 400 steps, validation
macro-F1 every epoch with early stopping (patience 8, the best step kept) and
class weights when the classes are unbalanced. `original_config()` is the
original's protocol: <cls> state, the 3-block MLP head, Adam 1e-4, batch 24,
5 epochs, no class weights, no early stopping, the last step's weights.
"""

from __future__ import annotations

import json

import ml_collections

from genemamba_jax import errors
from genemamba_jax.errors import DataError

POOLINGS = ("cls", "mean", "cls_mean")
HEADS = ("mlp", "linear")
CLASS_WEIGHTS = ("auto", "balanced", "none")
SCHEDULES = ("cosine", "constant")
# "auto" class weights: balanced when the largest training class has this many times the
# cells of the smallest; below it, plain cross-entropy.
AUTO_IMBALANCE = 3.0


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_checkpoint = ""  # a train/finetune run directory, or one checkpoints/<step> directory
  c.data = ml_collections.ConfigDict({
      "input": "",  # the .h5ad, or SOMA experiment (folder or URI), with counts and labels
      "layer": "",  # counts from this layer ('' = X, 'raw' = .raw.X); SOMA: X layer ('' = raw)
      "gene_column": "",  # var column with the vocabulary's gene ids ('' = var index)
      "measurement": "RNA",  # SOMA input: the measurement to read
      "obs_filter": "",  # SOMA input: only cells passing this obs value filter ('' = all)
      # SOMA input in cloud storage: TileDB settings, KEY=VALUE[,KEY=VALUE...] (e.g.
      # vfs.s3.region=us-west-2); config.json keeps only the keys, as values may be secrets.
      "tiledb_config": "",
      "gene_map": "",  # symbol -> vocabulary id table (pkl or TSV), if the ids differ
      "max_len": 0,  # tokens per cell; 0 = the length the backbone was trained on
  })
  c.label_column = "cell_type"  # obs column with the cell types (missing = unlabelled)
  c.split_column = ""  # obs column with train/val/test per cell ('' = stratified random split)
  c.val_fraction = 0.1
  c.test_fraction = 0.1
  c.seed = 0
  c.pooling = "mean"  # cls (state at <cls>) | mean (masked mean) | cls_mean (both, concatenated)
  c.head = "linear"  # linear | mlp (the original's [Linear, BatchNorm, Dropout, LeakyReLU] blocks)
  c.head_layers = 3  # blocks of the mlp head
  c.head_width = 0  # their width; 0 = d_model
  c.dropout = 0.1  # on the pooled cell (linear head) or in each block (mlp head)
  c.negative_slope = 0.1
  c.lr = 1e-2  # peak learning rate of the head
  # backbone lr = lr * this; 0 freezes the backbone. At 0.1 the demo backbone underfit (train
  # accuracy 0.89-0.96); for a large, well-pretrained backbone a smaller share may keep more of it.
  c.backbone_lr_scale = 0.3
  c.schedule = "cosine"  # cosine (to end_lr_fraction * lr) | constant, both after the warmup
  c.warmup_fraction = 0.1  # of the steps, linear from 0
  c.end_lr_fraction = 0.0
  c.weight_decay = 0.0  # AdamW's (not on biases and norms)
  c.clip_norm = 1.0  # <= 0 disables clipping
  c.label_smoothing = 0.0
  c.class_weights = "auto"  # auto (balanced when unbalanced) | balanced | none
  c.batch_size = 32
  c.epochs = 10
  c.min_steps = 400  # at least this many steps however small the training set (0 = epochs only)
  c.num_steps = 0  # > 0: exactly this many steps (overrides epochs and min_steps)
  c.eval_every = 0  # validation macro-F1 every this many steps; 0 = once per epoch
  c.patience = 8  # stop after this many validations without a better one (0 = never)
  c.keep_best = True  # end with the best validation step's weights (False: the last step's)
  c.log_every = 20
  c.write_h5ad = True  # predictions.h5ad: the input with predictions in obs and obsm['X_genemamba']
  c.lock()
  return c


def original_config() -> ml_collections.ConfigDict:
  """The original's protocol (README, `finetune`): `configs/finetune.py:original`."""
  c = default_config()
  c.update(pooling="cls", head="mlp", head_layers=3, dropout=0.5, lr=1e-4, backbone_lr_scale=1.0,
           schedule="constant", warmup_fraction=0.0, class_weights="none", batch_size=24,
           epochs=5, min_steps=0, patience=0, keep_best=False)
  return c


PRESETS = {"": default_config, "default": default_config, "original": original_config}


def get(name: str | None) -> ml_collections.ConfigDict:
  """The config of a preset name ('' or None: the default)."""
  name = (name or "").strip()
  if name not in PRESETS:
    raise DataError(f"finetune preset {name!r}; use one of: default, original")
  return PRESETS[name]()


def check(c: ml_collections.ConfigDict) -> None:
  """Impossible settings, found before anything is read or compiled."""
  if not c.init_checkpoint:
    raise DataError("set --config.init_checkpoint to a pretraining run directory (the --workdir "
                    "of genemamba_jax.train) or one of its checkpoints/<step> directories")
  if not c.data.input:
    raise DataError("set --config.data.input to the .h5ad file or SOMA experiment with the cells "
                    "to annotate")
  for key, allowed in (("pooling", POOLINGS), ("head", HEADS), ("class_weights", CLASS_WEIGHTS),
                       ("schedule", SCHEDULES)):
    if c[key] not in allowed:
      raise DataError(f"--config.{key}={c[key]!r}; use one of {', '.join(allowed)}")
  for key in ("batch_size", "epochs", "log_every", "head_layers"):
    if c[key] < 1:
      raise DataError(f"--config.{key}={c[key]} must be >= 1")
  for key in ("min_steps", "num_steps", "eval_every", "patience", "head_width", "weight_decay",
              "backbone_lr_scale"):
    if c[key] < 0:
      raise DataError(f"--config.{key}={c[key]} must be >= 0")
  for key in ("dropout", "warmup_fraction", "label_smoothing"):
    if not 0 <= c[key] < 1:
      raise DataError(f"--config.{key}={c[key]} must be in [0, 1)")
  if not 0 <= c.end_lr_fraction <= 1:
    raise DataError(f"--config.end_lr_fraction={c.end_lr_fraction} must be in [0, 1]")
  if c.lr <= 0:
    raise DataError(f"--config.lr={c.lr} must be > 0")
  tiledb_settings(c)  # KEY=VALUE items, or a one-line error


def tiledb_settings(c: ml_collections.ConfigDict) -> tuple[tuple[str, str], ...]:
  """`data.tiledb_config` ("vfs.s3.region=us-west-2,vfs.s3.no_sign_request=true") as
  (("vfs.s3.region", "us-west-2"), ...), parsed as every command's --tiledb-config."""
  from genemamba_jax.data import soma_reader  # pylint: disable=g-import-not-at-top (scipy: slow)
  items = [item for item in c.data.tiledb_config.split(",") if item.strip()]
  with errors.option_names(tiledb_config="--config.data.tiledb_config"):
    return soma_reader.parse_tiledb_config(items)


def recorded(c: ml_collections.ConfigDict) -> dict:
  """`c` as config.json holds it: the TileDB settings by key only (values may be credentials)."""
  out = json.loads(c.to_json_best_effort())
  from genemamba_jax.data import soma_reader  # pylint: disable=g-import-not-at-top (scipy: slow)
  out["data"]["tiledb_config"] = ",".join(soma_reader.setting_keys(tiledb_settings(c)))
  return out
