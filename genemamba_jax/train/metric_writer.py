"""What a training run reports: metrics.jsonl, TensorBoard scalars and a progress bar.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step
(`step`, `loss`, `lr`, ... and `eval_loss` on eval steps); TensorBoard gets the
same scalars; the progress bar shows steps/s, the loss of the step just logged,
tokens/s and the ETA.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax

from genemamba_jax import progress as progress_lib
from genemamba_jax.files import write_bytes_atomic

# Peak dense bf16 FLOP/s of one accelerator, for the MFU estimate (vendor figures).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5": 459e12, "TPU v5 lite": 197e12, "TPU v6 lite": 918e12}


def peak_flops_per_device() -> float | None:
  """The device's peak FLOP/s when known (None on CPU: no MFU then)."""
  kind = jax.devices()[0].device_kind
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return flops
  return None


def keep_rows_until(path: str, step: int) -> None:
  """Drops the rows of metrics.jsonl after `step` (and a torn last line), atomically.

  A resumed run restarts at its checkpoint's step; the rows an interrupted run
  logged after it would otherwise appear twice.
  """
  if not os.path.exists(path):
    return
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # the half-written line of a killed run
        continue
      if row.get("step", 0) <= step:
        kept.append(json.dumps(row) + "\n")
  write_bytes_atomic(path, "".join(kept).encode("utf-8"))


class MetricsWriter:
  """Writes metrics.jsonl and TensorBoard events under `workdir` (process 0 only).

  Starting at `start_step` > 0 (a resumed run) first drops what an interrupted
  run logged after that step, in metrics.jsonl and (TensorBoard's purge_step) in
  the event files, so each step appears once.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int):
    self.active = jax.process_index() == 0
    self._file = self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      keep_rows_until(path, start_step)
      self._file = open(path, "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
    self._bar = progress_lib.bar(total_steps, "train", "step", counts=False, initial=start_step,
                                 disable=not self.active)
    self._last_time, self._last_step = time.perf_counter(), start_step

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for key, value in scalars.items():
      if math.isfinite(float(value)):
        self._tb.add_scalar(key, float(value), step)
    self._tb.flush()

  def rates(self, step: int, tokens: float) -> dict[str, float]:
    """steps/s and tokens/s since the previous call (the bar moves in `progress`)."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds = max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    return {"steps_per_s": steps / seconds, "tokens_per_s": tokens / seconds}

  def progress(self, **fields) -> None:
    """Shows `fields` (e.g. the loss of the step just logged) and moves the bar to that step.

    The fields are set before the bar moves: a move draws the bar, so fields set
    after it would show only at the next log, one interval late.
    """
    self._bar.set_postfix({k: f"{v:.4g}" for k, v in fields.items()}, refresh=False)
    self._bar.update(self._last_step - self._bar.n)

  def close(self) -> None:
    self._bar.close()
    if self.active:
      self._file.close()
      self._tb.close()


def last_logged(workdir: str) -> dict:
  """The latest value of every key in metrics.jsonl (with the step it was logged at)."""
  path = os.path.join(workdir, "metrics.jsonl")
  last = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          last.update(json.loads(line))
        except json.JSONDecodeError:
          continue
  return last
