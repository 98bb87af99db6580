"""The fine-tuning configuration for cell type annotation: every key, its default and its checks.

Defaults follow the original's protocol (docs/commands.md, `finetune`): <cls> first, the
CLS state as the cell, the 3-block MLP head, full fine-tuning with Adam at
1e-4, batch 24, 5 epochs.
"""

from __future__ import annotations

import ml_collections

from genemamba_jax.errors import DataError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_checkpoint = ""  # a train/finetune run directory, or one checkpoints/<step> directory
  c.data = ml_collections.ConfigDict({
      "input": "",  # the .h5ad with counts and labels
      "layer": "",  # counts from this layer ('' = X, 'raw' = .raw.X)
      "gene_column": "",  # var column with the vocabulary's gene ids ('' = var index)
      "gene_map": "",  # symbol -> vocabulary id table (pkl or TSV), if the ids differ
      "max_len": 0,  # tokens per cell; 0 = the length the backbone was trained on
  })
  c.label_column = "cell_type"  # obs column with the cell types (missing = unlabelled)
  c.split_column = ""  # obs column with train/val/test per cell ('' = stratified random split)
  c.val_fraction = 0.1
  c.test_fraction = 0.1
  c.seed = 0
  c.pooling = "cls"  # cls (final state at <cls>) | mean (masked mean over the cell's tokens)
  c.head = "mlp"  # mlp (the original's) | linear (a linear probe; with freeze_backbone)
  c.head_layers = 3  # [Linear, BatchNorm, Dropout, LeakyReLU] blocks of the mlp head
  c.head_width = 0  # their width; 0 = d_model
  c.dropout = 0.5
  c.negative_slope = 0.1
  c.freeze_backbone = False  # True: train the head only
  c.class_weights = False  # True: weight the loss by n / (classes * n_class) ("balanced")
  c.batch_size = 24
  c.epochs = 5
  c.num_steps = 0  # > 0 overrides epochs
  c.lr = 1e-4
  c.weight_decay = 0.0
  c.clip_norm = 1.0  # <= 0 disables clipping
  c.warmup_steps = 0
  c.log_every = 20
  c.eval_every = 0  # > 0: validation accuracy every this many steps
  c.write_h5ad = True  # predictions.h5ad: the input with predictions in obs and obsm['X_genemamba']
  c.lock()
  return c


def check(c: ml_collections.ConfigDict) -> None:
  """Impossible settings, found before anything is read or compiled."""
  if not c.init_checkpoint:
    raise DataError("set --config.init_checkpoint to a pretraining run directory (the --workdir "
                    "of genemamba_jax.train) or one of its checkpoints/<step> directories")
  if not c.data.input:
    raise DataError("set --config.data.input to the .h5ad file with the cells to annotate")
  if c.pooling not in ("cls", "mean"):
    raise DataError(f"pooling={c.pooling!r}; use 'cls' or 'mean'")
  if c.head not in ("mlp", "linear"):
    raise DataError(f"head={c.head!r}; use 'mlp' or 'linear'")
  for key in ("batch_size", "epochs", "log_every"):
    if c[key] < 1:
      raise DataError(f"{key}={c[key]} must be >= 1")
  if not 0 <= c.dropout < 1:
    raise DataError(f"dropout={c.dropout} must be in [0, 1)")
  if c.lr <= 0:
    raise DataError(f"lr={c.lr} must be > 0")
