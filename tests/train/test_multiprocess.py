"""Two real training processes on 127.0.0.1 (launch/local_multiprocess.sh), one story.

  A  2 processes from scratch; process 1 is killed (SIGKILL) after the step-3 checkpoint:
     process 0 stops within seconds with one line, no hang, no traceback.
  B  2 processes resume from A's last complete checkpoint; after the step-9 evaluation
     only process 1 gets SIGTERM: both stop at the same step and save there.
  C  1 process continues B's 2-process checkpoint (another mesh) for 2 more steps.
  D  1 process, the same steps from scratch: every loss, batch and the eval loss of
     A + B + C equal D's (the same global batches; float sums in another order).

Launches share JAX's compilation cache, so B compiles nothing new, nor D after C.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
TINY = ["--config.log_every=1", "--config.checkpoint_every=3", "--config.eval_every=9",
        "--config.eval_batches=2", "--config.data.max_len=32", "--config.model.n_layers=1",
        "--config.model.scan_backend=sequential", "--config.mesh.heartbeat_timeout=10",
        "--config.mesh.shutdown_timeout=10", "--config.mesh.init_timeout=120",
        "--config.num_steps=1000"]
pytestmark = pytest.mark.slow


class Launch:
  """launch/local_multiprocess.sh N in its own process group, its output collected as it comes."""

  def __init__(self, n: int, workdir: Path, env: dict, steps: int | None = None):
    # num_steps (so the learning-rate schedule) is the same in every launch; `steps` pauses.
    more = [f"--config.steps_per_run={steps}"] if steps else []
    self.proc = subprocess.Popen(
        ["bash", str(LAUNCH), str(n), "configs/demo.py", str(workdir), *TINY, *more],
        cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    self.lines: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line.rstrip("\n"))

  def pids(self) -> list[int]:
    return [int(l.split(" is pid ")[1].split()[0]) for l in self.lines if " is pid " in l]

  def of(self, i: int) -> list[str]:
    """Process i's lines, progress bars left out."""
    mine = [l[len(f"[{i}] "):] for l in self.lines if l.startswith(f"[{i}] ")]
    return [l for l in mine if "step/s" not in l and not l.startswith("[Gloo]")]

  def wait(self, timeout: float) -> int:
    try:
      rc = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started
      raise
    self._reader.join(10)
    return rc


def _rows(workdir: Path) -> dict:
  """metrics.jsonl: step -> its training row; ("eval", step) -> its eval loss."""
  path = workdir / "metrics.jsonl"
  out = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        row = json.loads(line)
      except ValueError:  # the line being written
        continue
      if "eval_loss" in row:
        out[("eval", row["step"])] = row["eval_loss"]
      else:
        out[row["step"]] = row
  return out


def _until(condition, launch: Launch, timeout: float, what: str):
  end = time.monotonic() + timeout
  while not condition():
    if launch.proc.poll() is not None or time.monotonic() > end:
      os.killpg(launch.proc.pid, signal.SIGKILL)
      pytest.fail(f"never saw {what}; output:\n" + "\n".join(launch.lines[-30:]))
    time.sleep(0.1)


@pytest.fixture(scope="module")
def story(tmp_path_factory):
  base = tmp_path_factory.mktemp("multiprocess")
  env = dict(os.environ, GENEMAMBA_CACHE=str(base / "demo_cache"), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
             PYTHON=sys.executable)
  run, ref = base / "run", base / "reference"
  ckpts = run / "checkpoints"
  out = {"run": run}

  # A: killed after step 3's checkpoint is complete.
  a = Launch(2, run, env)
  _until(lambda: (ckpts / "3").is_dir() and len(_rows(run)) >= 4, a, 400, "step 3 saved")
  out["a_steps_when_killed"] = max(k for k in _rows(run) if isinstance(k, int))
  os.kill(a.pids()[1], signal.SIGKILL)
  killed = time.monotonic()
  out["a_rc"] = a.wait(120)
  out["a_stop_s"] = time.monotonic() - killed
  out["a_lines"] = a.of(0)
  out["a_resumable"] = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())

  # B: 2 processes resume; SIGTERM to process 1 alone after the step-9 evaluation.
  b = Launch(2, run, env)
  _until(lambda: ("eval", 9) in _rows(run), b, 400, "the step-9 eval loss")
  os.kill(b.pids()[1], signal.SIGTERM)
  out["b_rc"] = b.wait(120)
  out["b_lines"] = [b.of(0), b.of(1)]
  out["b_data_files"] = {p.parent.name: sorted(f.name for f in p.glob("*.json"))
                         for p in ckpts.glob("*/data")}
  stopped = [int(l.split("at step ")[1].split()[0]) for l in b.of(0) if l.startswith("SIGTERM")]
  assert stopped, "\n".join(b.lines[-30:])
  out["b_stop"] = final = stopped[0] + 2

  # C: one process continues the 2-process checkpoint; D: one process, from scratch.
  c = Launch(1, run, env, steps=2)
  out["c_rc"], out["c_lines"] = c.wait(300), c.of(0)
  d = Launch(1, ref, env, steps=final)
  out["d_rc"] = d.wait(300)
  out["rows"], out["reference"] = _rows(run), _rows(ref)
  out["leftovers"] = sorted(p.name for p in ckpts.iterdir() if not p.name.isdigit())
  out["cache"] = base / "demo_cache"
  return out


def test_a_killed_peer_stops_the_other_in_one_line(story):
  assert story["a_rc"] != 0
  assert story["a_stop_s"] < 30  # the heartbeat timeout (10 s) is the backstop
  errors = [l for l in story["a_lines"] if l.startswith("error:")]
  assert len(errors) == 1, story["a_lines"]
  assert "process 0 of 2: another process stopped or lost its connection" in errors[0]
  assert "Re-run the same command on every process to resume from step" in errors[0]
  assert not any("Traceback" in l or "Check failure" in l for l in story["a_lines"])
  assert 3 in story["a_resumable"]


def test_b_resumes_and_both_processes_stop_at_one_step(story):
  first, second = story["b_lines"]
  resumed = max(story["a_resumable"])
  assert f"resumed from step {resumed} in {story['run']}" in first
  assert story["b_rc"] == 0, "\n".join(first + second)
  head = lambda lines: [l for l in lines if l.startswith("SIGTERM: saved a checkpoint at step")]
  assert head(first) and head(first) == head(second), (first, second)
  stop = story["b_stop"] - 2
  # Each checkpoint was written once, by both: one data position file per process.
  assert story["b_data_files"][str(stop)] == ["process_0-of-2.json", "process_1-of-2.json"]


def test_c_one_process_continues_a_two_process_checkpoint(story):
  assert story["c_rc"] == 0, "\n".join(story["c_lines"])
  stop = story["b_stop"] - 2
  assert any(l.startswith(f"resumed from step {stop}") for l in story["c_lines"])
  assert story["leftovers"] == []  # no half-written checkpoint left behind


def test_losses_and_batches_equal_one_process(story):
  rows, reference = story["rows"], story["reference"]
  steps = [k for k in reference if isinstance(k, int)]
  assert sorted(steps) == list(range(1, story["b_stop"] + 1))
  assert sorted(k for k in rows if isinstance(k, int)) == sorted(steps)
  for step in steps:
    assert rows[step]["batch_checksum"] == reference[step]["batch_checksum"], step
    assert abs(rows[step]["loss"] - reference[step]["loss"]) < 1e-5, step
  # The held-out loss of 2 processes (equal eval shards) is one process's.
  assert abs(rows[("eval", 9)] - reference[("eval", 9)]) < 1e-5


def test_process_shards_are_disjoint_and_cover_the_global_batch(story):
  from genemamba_jax.data.pipeline import PipelineConfig, make_dataset
  tokens = story["cache"] / "demo_data" / "tokens"
  batches = lambda size, index, count: [b["tokens"] for _, b in zip(range(3), make_dataset(
      tokens, PipelineConfig(batch_size=size, seq_len=32, eval_fraction=0.1, shard_index=index,
                             shard_count=count)))]
  whole, first, second = batches(16, 0, 1), batches(8, 0, 2), batches(8, 1, 2)
  rows = lambda a: sorted(map(bytes, np.asarray(a)))
  for w, f, s in zip(whole, first, second):
    assert not set(rows(f)) & set(rows(s))
    assert rows(np.concatenate([f, s])) == rows(w)
