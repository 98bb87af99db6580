"""Labels and train/val/test splits of the cells to annotate."""

from __future__ import annotations

import numpy as np
import pandas as pd

from genemamba_jax.errors import DataError

SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"  # cells without a label: predicted, never trained or scored on
_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
            "validation": "val", "test": "test", "testing": "test"}


def encode_labels(values: pd.Series, where: str) -> tuple[np.ndarray, list[str]]:
  """obs labels -> (codes [cells] int32, -1 where missing; classes sorted by name)."""
  present = values.notna().to_numpy()
  names = values.astype(object).where(present, None)
  classes = sorted({str(v) for v in names[present]})
  if len(classes) < 2:
    raise DataError(f"{where}: needs at least 2 cell types to classify, found {classes}")
  index = {c: i for i, c in enumerate(classes)}
  codes = np.asarray([index[str(v)] if ok else -1 for v, ok in zip(names, present)], np.int32)
  return codes, classes


def split_from_column(values: pd.Series, labels: np.ndarray, where: str) -> np.ndarray:
  """A `partition`-style obs column (train / val / test, or aliases) -> split name per cell."""
  normalized = values.astype(str).str.strip().str.lower().map(_ALIASES)
  bad = sorted(set(values[normalized.isna()].astype(str)))
  if bad:
    raise DataError(f"{where}: values {bad[:5]} are not a split; use train, val (valid, "
                    "validation) or test")
  split = normalized.to_numpy(dtype=object)
  split[labels < 0] = UNLABELLED
  if not np.any(split == "train"):
    raise DataError(f"{where}: no labelled cell is in the train split")
  return split.astype(str)


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float,
                     seed: int) -> np.ndarray:
  """Per-class random split (paper B.2: done by hand so that rare classes reach every split).

  In each class of n cells, round(n * fraction) cells go to val and to test, at
  least one each when the class has 3 or more cells; the rest train.
  """
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
    raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in "
                    "[0, 1) with a sum below 1")
  rng = np.random.default_rng(seed)
  split = np.full(len(labels), UNLABELLED, dtype=object)
  for cls in np.unique(labels[labels >= 0]):
    idx = rng.permutation(np.flatnonzero(labels == cls))
    n = len(idx)
    n_test, n_val = (_share(n, f) for f in (test_fraction, val_fraction))
    split[idx[:n_test]] = "test"
    split[idx[n_test:n_test + n_val]] = "val"
    split[idx[n_test + n_val:]] = "train"
  return split.astype(str)


def _share(n: int, fraction: float) -> int:
  if fraction <= 0:
    return 0
  return max(round(n * fraction), 1 if n >= 3 else 0)
