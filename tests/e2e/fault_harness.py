"""The fault harness of tests/e2e/test_faults.py: run a command in a subprocess, send it signals,
limit its file size, kill it, and compare what it leaves with an uninterrupted reference run.

The moments are drawn from random.Random(FAULTS_SEED) (default 0); run with another FAULTS_SEED
to draw others.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("FAULTS_SEED", "0"))
TRACEBACK = "Traceback (most recent call last)"

# --- running a command ---------------------------------------------------------------------------


# A full disk, portably: files may not grow past the limit, and writes beyond it fail with
# EFBIG (SIGXFSZ, which would kill the process instead, is ignored). Set in a wrapper that then
# execs the command (limits and ignored signals carry over), not in a preexec_fn: this process
# runs JAX's threads, and a fork of a threaded process may deadlock before the exec.
LIMIT_FILE_SIZE = ("import os, resource, signal, sys; limit = int(sys.argv[1]); "
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
                   "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


RUNNING: list["Run"] = []  # every command started (to stop the background ones at the end)


class Run:
  """One command in a subprocess, its stdout and stderr in files (read while it runs)."""

  def __init__(self, argv: list[str], env: dict, logs: Path, fsize: int | None = None):
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.err")))
    self.argv = argv
    self.logs, self.n = logs, n
    self.out_file, self.err_file = logs / f"{n:02d}.out", logs / f"{n:02d}.err"
    command = [sys.executable, "-m", *argv]
    if fsize is not None:
      command = [sys.executable, "-c", LIMIT_FILE_SIZE, str(fsize), "-m", *argv]
    with open(self.out_file, "w") as out, open(self.err_file, "w") as err:
      # stdout and stderr are pipes under a file-size limit (it would cut the log files).
      self.process = subprocess.Popen(
          command, cwd=ROOT, env=env, stdout=subprocess.PIPE if fsize else out,
          stderr=subprocess.PIPE if fsize else err, text=True)
    self.start, self.wall_start = time.monotonic(), time.time()
    self.signals: list[str] = []
    self._captured = None
    RUNNING.append(self)

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def stderr(self) -> str:
    if self._captured is not None:
      return self._captured[1]
    return self.err_file.read_text(errors="replace")

  def stdout(self) -> str:
    if self._captured is not None:
      return self._captured[0]
    return self.out_file.read_text(errors="replace")

  def wait_for(self, ready: Callable[[], bool], timeout: float = 600) -> float | None:
    """Polls `ready` every 2 ms; the seconds since the start when it held, None if the
    command ended first."""
    deadline = time.monotonic() + timeout
    while self.process.poll() is None:
      if ready():
        return self.elapsed()
      assert time.monotonic() < deadline, f"{self}: timed out"
      time.sleep(0.002)
    return None

  def send(self, signum: int, after: float = 0.0) -> None:
    time.sleep(after)
    if self.process.poll() is None:
      self.process.send_signal(signum)
      self.signals.append(f"{signal.Signals(signum).name} at {self.elapsed():.2f} s")

  def finish(self, timeout: float = 600) -> int:
    if self.process.stdout is not None:  # piped
      self._captured = self.process.communicate(timeout=timeout)
    else:
      self.process.wait(timeout=timeout)
    with open(self.logs / "runs.txt", "a") as f:  # what took how long, when it failed
      f.write(f"{self.n:02d} {self.elapsed():6.2f} s  exit {self.process.returncode:4d}  "
              f"{', '.join(self.signals) or '-'}  {' '.join(self.argv[:2])}\n")
    return self.process.returncode

  def __str__(self) -> str:
    return (f"`{' '.join(self.argv)}` (exit {self.process.returncode}, "
            f"{', '.join(self.signals) or 'no signal'}; seed {SEED})\n"
            f"--- stderr (end) ---\n{self.stderr()[-3000:]}")


def one_line(run: Run, status: int, prefix: str, stream: str = "stderr") -> str:
  """The run ended with `status` and exactly one line starting with `prefix` (on `stream`),
  and no traceback."""
  err = run.stderr()
  # 130 after Ctrl-C, or ended by SIGINT itself, which a shell reports as 130 too (CPython
  # exits so when a KeyboardInterrupt went through an extension module's import, even one the
  # command caught; seen before signals._on_signal deferred signals out of imports).
  statuses = (130, -signal.SIGINT) if status == 130 else (status,)
  assert run.process.returncode in statuses, str(run)
  text = run.stdout() if stream == "stdout" else err
  lines = [line for line in text.splitlines() if line.startswith(prefix)]
  assert len(lines) == 1 and TRACEBACK not in err, str(run)
  return lines[0]


DEBRIS = re.compile(r"^\..*\.tmp|\.orbax-checkpoint-tmp|\.tmp$")


def debris(root: Path) -> list[str]:
  """Temporaries under `root`: atomic writes' hidden `.<name>.<pid>-<hex>.tmp*` files and
  directories, Orbax's `*.orbax-checkpoint-tmp*`, unfinished shards' `*.tmp`."""
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if DEBRIS.search(p.name))


def tree(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


# --- a command and its chain of faults ------------------------------------------------------------


@dataclasses.dataclass
class Command:
  name: str
  argv: Callable[[Path], list[str]]  # the output path -> the command line (module first)
  busy: str  # stderr shows this once the command works (inside the CLI wrapper)
  outputs: Callable[[Path], object]  # what a finished run must have as the reference does
  clean: Callable[[Path, object], None]  # checks after a failed or interrupted run
  # It is writing its output, for a kill -9 in the act (None: its outputs are too small to
  # catch that; the random kills do).
  writing: Callable[[Path], bool] | None
  random_kills: int = 1
  # SIGINT and SIGTERM come at the busy line + a delay drawn from [0, a quarter of the time
  # the reference worked after that line], at most this many seconds: the reference may have
  # compiled (or shared the cores), the faulted runs find its compilation cache.
  signal_window: float = 0.5
  # How SIGINT and SIGTERM end it: (exit status, stream, the one line's start).
  signal_ends: tuple = ((130, "stderr", "interrupted: "), (143, "stderr", "terminated (SIGTERM): "))
  # The file-size limit, from the reference run; default: its largest output file - 1.
  fsize: Callable[[Reference], int] | None = None


@dataclasses.dataclass
class Reference:
  out: Path
  outputs: object
  busy_at: float  # start to the busy line
  work_end: float  # start to its last write (then it reports and the interpreter shuts down)
  largest: int  # bytes of its largest output file


def reference(cmd: Command, base: Path, env: dict) -> Reference:
  out = base / "reference" / cmd.name
  out.parent.mkdir(parents=True, exist_ok=True)
  run = Run(cmd.argv(out), env, base / "logs" / f"{cmd.name}-reference")
  busy_at = run.wait_for(lambda: cmd.busy in run.stderr())
  assert run.finish() == 0 and busy_at is not None, str(run)
  files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file()]
  last_write = max(p.stat().st_mtime for p in [out, *out.rglob("*")])
  return Reference(out, cmd.outputs(out), busy_at, last_write - run.wall_start,
                   max(p.stat().st_size for p in files))


def fault_chain(cmd: Command, ref: Reference, base: Path, env: dict) -> Path:
  """SIGINT, SIGTERM, a full disk and kill -9s on one output, then a run to completion."""
  rng = random.Random(f"{SEED}:{cmd.name}")
  out = base / "faults" / cmd.name
  out.parent.mkdir(parents=True, exist_ok=True)
  logs = base / "logs" / cmd.name
  rest = ref.work_end - ref.busy_at  # how long the reference worked after its busy line

  for signum, (status, stream, prefix) in zip((signal.SIGINT, signal.SIGTERM), cmd.signal_ends):
    run = Run(cmd.argv(out), env, logs)
    assert run.wait_for(lambda: cmd.busy in run.stderr()) is not None, str(run)
    run.send(signum, after=rng.uniform(0, min(cmd.signal_window, rest / 4)))
    run.finish()
    one_line(run, status, prefix, stream)
    assert debris(out.parent) == [], str(run)
    cmd.clean(out, ref)

  limit = cmd.fsize(ref) if cmd.fsize else ref.largest - 1
  run = Run(cmd.argv(out), env, logs, fsize=limit)
  run.finish()
  line = one_line(run, 2, "error: ")
  assert "no space left" in line, str(run)
  assert debris(out.parent) == [], str(run)
  cmd.clean(out, ref)
  # How long a run takes here: that one ran to its outputs (with a warm compilation cache).
  duration = run.elapsed()

  finished = False  # a kill that came after the command had finished on its own
  delays = (["writing"] if cmd.writing else []) + [rng.uniform(0, duration)
                                                   for _ in range(cmd.random_kills)]
  for delay in delays:
    run = Run(cmd.argv(out), env, logs)
    if delay == "writing":
      run.wait_for(lambda: cmd.writing(out))
      run.send(signal.SIGKILL, after=rng.uniform(0, 0.01))
    else:
      run.wait_for(lambda: run.elapsed() >= delay)
      run.send(signal.SIGKILL)
    status = run.finish()
    assert status in (0, -signal.SIGKILL), str(run)
    finished = finished or status == 0

  if not finished or cmd.name != "finetune":  # finetune refuses a finished workdir (below)
    run = Run(cmd.argv(out), env, logs)
    assert run.finish() == 0, str(run)
  assert debris(out.parent) == []
  assert_same(cmd.outputs(out), ref.outputs)
  return out


def assert_same(got, want, where: str = "") -> None:
  """Equal nested dicts / lists of bytes, numbers, strings and arrays (arrays bit for bit)."""
  if isinstance(want, dict):
    assert sorted(got) == sorted(want), where
    for key in want:
      assert_same(got[key], want[key], f"{where}/{key}")
  elif isinstance(want, np.ndarray):
    np.testing.assert_array_equal(got, want, err_msg=where)
    assert got.dtype == want.dtype, where
  else:
    assert got == want, where


# --- what each command writes ------------------------------------------------------------------


def hidden_temp_of(path: Path) -> bool:
  """An atomic write of `path` (or into the directory `path`) is under way."""
  if path.is_dir():
    return any(p.name.startswith(".") and ".tmp" in p.name for p in path.iterdir())
  return path.parent.is_dir() and any(p.name.startswith(f".{path.stem}.") and ".tmp" in p.name
                                      for p in path.parent.iterdir())


def absent(out: Path, ref) -> None:
  del ref
  assert not out.exists(), f"a failed run left {out}: {sorted(tree(out)) if out.is_dir() else ''}"
