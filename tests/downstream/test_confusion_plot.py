"""The fine-tuning confusion matrix as a reader sees it: support shown, tiny classes faded."""

import numpy as np

from genemamba_jax.finetune import report

CLASSES = ["B", "T", "rare"]


def _figure():
  # 10 B cells (8 right), 6 T cells (all right), 1 "rare" cell (right: a 100% row).
  true = np.array([0] * 10 + [1] * 6 + [2])
  pred = np.array([0] * 8 + [1] * 2 + [1] * 6 + [2])
  return report.confusion_figure(true, pred, CLASSES, "test split")


def test_rows_carry_their_support_and_squares_their_counts():
  ax = _figure().axes[0]
  assert [t.get_text() for t in ax.get_yticklabels()] == ["B (n=10)", "T (n=6)", "rare (n=1)"]
  assert sorted(t.get_text() for t in ax.texts) == ["1", "2", "6", "8"]


def test_a_class_with_one_cell_is_faded_not_the_darkest():
  fig = _figure()
  image = fig.axes[0].images[0]
  alpha = np.asarray(image.get_alpha())
  # Row-normalized, the one-cell class is 100%: drawn at full strength it would be the
  # darkest square. It is faded, and the figure says why.
  assert image.get_array()[2, 2] == 1.0
  assert alpha[2].max() < 0.5 and alpha[:2].min() == 1.0
  assert any("fewer than" in t.get_text() for t in fig.texts)


def test_plot_confusion_writes_a_png(tmp_path):
  true = np.array([0, 1, 1, 2])
  report.plot_confusion(true, true, CLASSES, tmp_path / "cm.png", "val split")
  data = (tmp_path / "cm.png").read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
