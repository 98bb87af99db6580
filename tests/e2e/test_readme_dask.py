"""README, "Preprocessing on a Dask cluster": its shell block runs as written (scheduler, 2
workers and both commands on this machine, on a free port)."""

import json
import os
import re
import signal
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from genemamba_jax.data import records
from tests.conftest import _require_shared_data, require_dask

require_dask()
README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def _block() -> str:
  start = README.index("### Preprocessing on a Dask cluster")
  return re.compile(r"```bash\n(.*?)```", re.DOTALL).search(README, start).group(1)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_dask_block_runs_as_written(tmp_path):
  (tmp_path / "corpus").mkdir()
  shutil.copy(_require_shared_data() / "pbmc68k_reduced_counts.h5ad", tmp_path / "corpus")
  block = _block()
  assert "--dask-scheduler $SCHEDULER" in block and "8786" in block
  # Only the port changes (8786 may be taken here); the services it starts are stopped at the
  # end, and the whole process group if it hangs.
  script = ("trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n"
            + block.replace("8786", str(_free_port())))
  proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    out, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == 0, err[-3000:]
  assert "written: 1 shard(s) and manifest.json in tokens/" in out
  # (Equal to a single process's output: tests/data/test_dask_prepare.py.)
  manifest = records.load_manifest(tmp_path / "tokens")
  assert "cells read: 700" in out and manifest["num_cells"] > 0
  assert manifest["vocab"] == json.loads((tmp_path / "vocab" / "vocab.json").read_text())
