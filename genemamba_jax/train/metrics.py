"""What a training run reports: metrics.jsonl, TensorBoard scalars and a progress bar.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step
(`step`, `loss`, `lr`, ... and `eval_loss` on eval steps); TensorBoard gets the
same scalars; the progress bar shows steps/s, tokens/s and the ETA.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
from tqdm import tqdm

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


class MetricsWriter:
  """Writes metrics.jsonl and TensorBoard events under `workdir` (process 0 only)."""

  def __init__(self, workdir: str, total_steps: int, start_step: int):
    self.active = jax.process_index() == 0
    self._file = self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                     dynamic_ncols=True, disable=not self.active)
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
    """steps/s and tokens/s since the previous call; moves the progress bar."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds = max(now - self._last_time, 1e-9)
    self._bar.update(step - self._last_step)
    self._last_time, self._last_step = now, step
    return {"steps_per_s": steps / seconds, "tokens_per_s": tokens / seconds}

  def progress(self, **fields) -> None:
    self._bar.set_postfix({k: f"{v:.4g}" for k, v in fields.items()}, refresh=False)

  def close(self) -> None:
    self._bar.close()
    if self.active:
      self._file.close()
      self._tb.close()
