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
