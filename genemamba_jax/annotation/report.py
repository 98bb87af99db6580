"""Scores and outputs of an annotation run: metrics.json, predictions.csv, confusion_matrix.png."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from genemamba_jax.annotation.splits import SPLITS
from genemamba_jax.atomic import atomic_path
from genemamba_jax.data import jsonio


def split_metrics(true: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, float]:
  """scikit-learn scores of one split (labels as class indices)."""
  labels = list(range(len(classes)))
  out = {
      "n_cells": len(true),
      "accuracy": float(skm.accuracy_score(true, pred)),
      "macro_f1": float(skm.f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
      "weighted_f1": float(skm.f1_score(true, pred, labels=labels, average="weighted",
                                        zero_division=0)),
      "weighted_precision": float(skm.precision_score(true, pred, labels=labels,
                                                      average="weighted", zero_division=0)),
      "weighted_recall": float(skm.recall_score(true, pred, labels=labels, average="weighted",
                                                zero_division=0)),
  }
  return out


def all_metrics(split: np.ndarray, true: np.ndarray, pred: np.ndarray,
                classes: list[str]) -> dict[str, dict[str, float]]:
  """{"train"|"val"|"test": scores} for every split that has cells."""
  return {name: split_metrics(true[split == name], pred[split == name], classes)
          for name in SPLITS if np.any(split == name)}


def predictions_frame(obs_names, split, true, pred, probabilities, classes) -> pd.DataFrame:
  """obs_name, split, true, pred (class names; true is empty when unlabelled), confidence."""
  names = np.asarray(classes, dtype=object)
  return pd.DataFrame({
      "obs_name": obs_names, "split": split,
      "true": np.where(true >= 0, names[np.maximum(true, 0)], ""),
      "pred": names[pred], "confidence": probabilities.max(axis=1).round(6)})


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> None:
  with atomic_path(path) as tmp:
    frame.to_csv(tmp, index=False)


def write_metrics(metrics: dict, path: str | os.PathLike) -> None:
  jsonio.write_json_atomic(path, metrics)


def plot_confusion(true: np.ndarray, pred: np.ndarray, classes: list[str], path, title: str):
  """Row-normalized confusion matrix (recall per true class) with counts, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  counts = skm.confusion_matrix(true, pred, labels=list(range(len(classes))))
  fraction = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  size = max(4.0, 0.55 * len(classes) + 2.5)
  fig, ax = plt.subplots(figsize=(size + 1, size))
  image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
  ax.set_yticks(range(len(classes)), classes, fontsize=8)
  for i in range(len(classes)):
    for j in range(len(classes)):
      if counts[i, j]:
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                color="white" if fraction[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
  fig.tight_layout()
  try:
    with atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=120)
  finally:
    plt.close(fig)
