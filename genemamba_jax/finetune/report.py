"""Scores and outputs of an annotation run: metrics.json, predictions.csv, confusion_matrix.png."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from genemamba_jax.finetune.splits import SPLITS
from genemamba_jax.files import atomic_path
from genemamba_jax import files


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
  files.write_json_atomic(path, metrics)


# Rows with fewer test cells than this are drawn faded: one cell makes a row 100% (the
# darkest colour) whether the class is easy or not.
FEW_CELLS = 5


def confusion_figure(true: np.ndarray, pred: np.ndarray, classes: list[str], title: str):
  """Row-normalized confusion matrix (recall per true class) with counts; returns the Figure.

  Colour = fraction of the true class predicted as each class; the number in a square
  is its cell count; each row label carries the class's support (n cells). Rows with
  fewer than FEW_CELLS cells are faded, and the figure says so.

  Args:
    true, pred: [cells] class indices.
    classes: class names, by index.
    title: the figure title (e.g. the split and its scores).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  counts = skm.confusion_matrix(true, pred, labels=list(range(len(classes))))
  support = counts.sum(axis=1)
  fraction = counts / np.maximum(support[:, None], 1)
  size = max(4.0, 0.55 * len(classes) + 2.5)
  fig = Figure(figsize=(size + 2, size + 0.4), layout="constrained")
  FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
  ax = fig.subplots()
  few = (support > 0) & (support < FEW_CELLS)
  alpha = np.where(few[:, None], 0.35, 1.0) * np.ones_like(fraction)
  image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1, alpha=alpha)
  ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
  ax.set_yticks(range(len(classes)), [f"{c} (n={n})" for c, n in zip(classes, support)],
                fontsize=8)
  for i in range(len(classes)):
    for j in range(len(classes)):
      if counts[i, j]:
        dark = fraction[i, j] > 0.5 and not few[i]
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true (n = cells of the class)")
  ax.set_title(title)
  fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
  if few.any():
    fig.text(0.01, 0.005, f"faded rows: fewer than {FEW_CELLS} cells, their fractions say "
             "little", fontsize=7, color="0.3", ha="left", va="bottom")
  return fig


def plot_confusion(true: np.ndarray, pred: np.ndarray, classes: list[str], path, title: str):
  """Writes `confusion_figure` as a PNG, atomically."""
  fig = confusion_figure(true, pred, classes, title)
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120)
