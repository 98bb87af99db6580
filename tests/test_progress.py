"""Progress bars as a reader sees them: whole counts, the final line once, the current loss."""

import re
import time

import pytest

from genemamba_jax import progress
from genemamba_jax.train import metric_writer


def _frames(err: str, prefix: str) -> list[str]:
  """Every drawing of the bar labelled `prefix`, in order (tqdm redraws after a \\r)."""
  return [f for f in re.split(r"[\r\n]", err) if f.startswith(prefix)]


def test_counts_are_whole_numbers_with_separators(capsys):
  with progress.bar(30_000, "tokenize", "cells") as bar:
    bar.update(12_000)
  frames = _frames(capsys.readouterr().err, "tokenize")
  assert "| 0/30,000 cells" in frames[0]
  assert "| 12,000/30,000 cells" in frames[-1]
  assert not [f for f in frames if ".00/" in f]


def test_the_final_state_is_drawn_once(capsys):
  with progress.bar(2, "job", "cells") as bar:
    bar.update(1)
    time.sleep(0.15)  # past tqdm's mininterval: the last update draws the bar itself
    bar.update(1)
  err = capsys.readouterr().err
  assert sum("100%" in f for f in _frames(err, "job")) == 1  # plain tqdm: twice
  assert err.endswith("\n")


def test_a_bar_left_by_an_error_ends_its_line_before_the_error(capsys):
  with pytest.raises(ValueError):
    with progress.bar(10, "job", "cells") as bar:
      bar.update(3)
      raise ValueError("bad cell")
  progress.status("error: bad cell")
  err = capsys.readouterr().err
  assert "\nerror: bad cell\n" in err and "| 3/10 cells" in err


def test_train_bar_shows_the_loss_of_the_step_just_logged(tmp_path, capsys):
  writer = metric_writer.MetricsWriter(str(tmp_path), total_steps=30, start_step=0)
  try:
    for step, loss in ((10, 7.0), (20, 5.5), (30, 4.25)):
      time.sleep(0.15)  # past tqdm's mininterval, so every move draws
      writer.rates(step, tokens=100.0)
      writer.progress(loss=loss)
  finally:
    writer.close()
  frames = _frames(capsys.readouterr().err, "train")
  shown = {int(re.search(r"\| (\d+)/30", f).group(1)): re.search(r"loss=([\d.]+)", f)
           for f in frames}
  assert {step: m and float(m.group(1)) for step, m in shown.items() if step} == {
      10: 7.0, 20: 5.5, 30: 4.25}  # before the fix: 10 had no loss, 20 showed 7.0, ...
  assert sum("100%" in f for f in frames) == 1
