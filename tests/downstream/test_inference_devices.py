"""Inference on every local device (inference.batch_step), embeddings to a fine-tuned
classifier's predictions: 4 host devices give 1 device's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_four_devices_equal_one():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "downstream" /
                                             "inference_devices_check.py")],
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["split_over"] == 4 and result["output_devices"] == 4
  assert result["padded_rows"] == 3  # 3 rows padded to 4 for the devices, cut back to 3
  assert result["rows"] == 13
  # Rows never mix: per-row results are bit-equal; the gene sums add rows in another order.
  assert result["cells"] == {"cls": 0.0, "mean": 0.0} or max(result["cells"].values()) < 1e-6
  assert result["gene_sums"] < 1e-5 and result["gene_counts_equal"]
  assert result["tokens_equal"]
  probabilities, embeddings, rows = result["classifier"]
  assert rows == 13 and probabilities < 1e-6 and embeddings < 1e-6
