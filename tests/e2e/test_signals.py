"""Signals in one process, fast: SIGTERM unwinds a command like Ctrl-C, a Ctrl-C that lands in a
finalizer still stops the command, a signal during interpreter shutdown is ignored, and a full
disk under Orbax is an OSError. (The commands under faults: tests/e2e/test_faults.py.)"""

import errno
import os
import signal
import subprocess
import sys
import time

from tests.e2e.fault_harness import ROOT, TRACEBACK


def test_sigterm_unwinds_a_command_like_ctrl_c(tmp_path, capsys):
  """Python's default SIGTERM ends a process where it stands; under cli.guarded it raises,
  so atomic writes remove their temporaries, and the command ends in one line with 143."""
  from genemamba_jax import cli, files, signals  # pylint: disable=g-import-not-at-top
  target = tmp_path / "out.csv"

  def command():
    with files.atomic_path(target) as tmp:
      tmp.write_text("half")
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(10)  # the handler raises in this thread before the sleep ends
    return ["never"]

  before = signal.getsignal(signal.SIGTERM)
  assert cli.guarded(command) == signals.TERMINATED == 143
  err = capsys.readouterr().err
  assert [l for l in err.splitlines() if l] == [
      "terminated (SIGTERM): nothing half-written is kept; re-run the command to do it again"]
  assert list(tmp_path.iterdir()) == []
  assert signal.getsignal(signal.SIGTERM) is before  # restored for the caller


def test_an_orbax_save_out_of_space_is_an_oserror():
  """TensorStore reports a full disk as a ValueError carrying the OS error code."""
  from genemamba_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  message = ('OUT_OF_RANGE: Error writing "params.x/0.0" in OCDBT database at local file "/r/'
             'checkpoints/8.orbax-checkpoint-tmp/state/": Failed to write 491987 bytes to file '
             "11: {} [os_error_code='{}']")
  assert checkpoint._out_of_space(ValueError(message.format("File too large", 27))) == 27
  assert checkpoint._out_of_space(ValueError(message.format("No space left on device", 28))) == 28
  assert checkpoint._out_of_space(ValueError(message.format("Permission denied", 13))) is None
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
  assert checkpoint._out_of_space(wrapped) == errno.EDQUOT


def _python(code: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_line(process: subprocess.Popen, line: str) -> None:
  assert process.stdout.readline().strip() == line, process.communicate()


def test_ctrl_c_in_a_finalizer_still_stops_the_command():
  """Python drops an exception raised in a __del__ ("Exception ignored in"), and a Ctrl-C that
  came while a library's finalizer ran (seen: regex's Group.__del__) was lost: the command
  went on and finished. It is delivered again, outside the finalizer."""
  process = _python(
      "import sys, time\n"
      "from genemamba_jax import cli\n"
      "class Slow:\n"
      "  def __del__(self):\n"
      "    print('in __del__', flush=True)\n"
      "    time.sleep(1)\n"
      "def work():\n"
      "  Slow()\n"
      "  time.sleep(10)\n"
      "  return ['finished']\n"
      "sys.exit(cli.guarded(work))\n")
  _wait_for_line(process, "in __del__")
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=60)
  assert process.returncode in (130, -signal.SIGINT), err
  assert "finished" not in out and "Exception ignored" not in err and TRACEBACK not in err, err
  assert err.strip().startswith("interrupted: "), err


def test_a_signal_while_the_interpreter_shuts_down_is_ignored():
  """The command has done its work and said so; JAX's exit handler (clearing its backends)
  still runs, and a Ctrl-C or SIGTERM then printed a traceback of it."""
  for signum in (signal.SIGINT, signal.SIGTERM):
    process = _python(
        "import atexit, sys, time\n"
        "atexit.register(time.sleep, 1)  # a slow exit handler, registered on import like JAX's\n"
        "from genemamba_jax import cli\n"
        "sys.exit(cli.guarded(lambda: ['done']))\n")
    _wait_for_line(process, "done")
    time.sleep(0.3)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and err == "", (signum, err)


def test_sigterm_while_numba_loads_a_cached_function_waits_for_numba(tmp_path):
  """numba's Python code runs as callbacks of C code (its dispatcher; LLVM, through ctypes,
  which drops an exception raised there): a SIGTERM raised inside it left a half-loaded
  function behind, and the command died of a segmentation fault (seen in CI under scanpy's
  normalize_total, 6 of 50 runs under load). The signal is raised after numba returns, and
  the command ends in one line."""
  (tmp_path / "kernel.py").write_text(
      "import numba\n"
      "@numba.njit(cache=True)\n"
      "def total(x):\n"
      "  s = 0.0\n"
      "  for v in x:\n"
      "    s += v\n"
      "  return s\n")
  env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"),
             PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
  compile_once = "import numpy as np, kernel; print(kernel.total(np.ones(3)))"
  assert subprocess.run([sys.executable, "-c", compile_once], env=env, capture_output=True,
                        text=True, check=True).stdout.strip() == "3.0"
  # SIGTERM as the dispatcher enters numba's Python code to load the function from the cache.
  command = (
      "import os, signal, sys, time, traceback\n"
      "import numpy as np, kernel\n"
      "from genemamba_jax import cli\n"
      "def hook(frame, event, arg):\n"
      "  if event == 'call' and f'{os.sep}numba{os.sep}' in frame.f_code.co_filename:\n"
      "    sys.setprofile(None)\n"
      "    print('in numba', flush=True)\n"
      "    os.kill(os.getpid(), signal.SIGTERM)\n"
      "def work():\n"
      "  try:\n"
      "    sys.setprofile(hook)\n"
      "    total = kernel.total(np.ones(3))\n"
      "    sys.stdout.write(f'loaded {total}\\n')  # (the signal may come before or after it)\n"
      "    time.sleep(10)\n"
      "  except KeyboardInterrupt as e:\n"
      "    files = [f.filename for f in traceback.extract_tb(e.__traceback__)]\n"
      "    print('raised in numba' if any(f'{os.sep}numba{os.sep}' in f for f in files)\n"
      "          else 'raised after numba', flush=True)\n"
      "    raise\n"
      "  return ['finished']\n"
      "sys.exit(cli.guarded(work))\n")
  process = subprocess.run([sys.executable, "-c", command], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
  lines = process.stdout.splitlines()
  assert lines[0] == "in numba" and lines[-1] == "raised after numba", process
  assert process.returncode == 143, process
  assert "Exception ignored" not in process.stderr and TRACEBACK not in process.stderr, process
  assert process.stderr.strip().startswith("terminated (SIGTERM): "), process.stderr
