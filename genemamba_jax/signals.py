"""Ctrl-C and SIGTERM as exceptions raised where a command can act on them.

`cli.guarded` installs the handlers around a command: SIGINT raises
KeyboardInterrupt and SIGTERM raises `Terminated`, so both unwind the command
like an error (atomic writes and hidden work directories are cleaned up), never
inside an import, and again when Python or C code dropped the first one.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading

INTERRUPTED = 130  # the shell's status for a command ended by SIGINT
TERMINATED = 143  # ... and by SIGTERM


class Interrupted(KeyboardInterrupt):
  """Ctrl-C, after the command saved what it could; the message says what was kept."""


class Terminated(KeyboardInterrupt):
  """SIGTERM (a `kill`, a scheduler's preemption), raised like Ctrl-C's KeyboardInterrupt."""



def install(boundary) -> dict:
  """Ctrl-C and SIGTERM raise in the command (`KeyboardInterrupt`, `Terminated`).

  Python's default for SIGTERM ends the process where it stands, leaving the
  temporary files of atomic writes (and finetune's hidden workdir) behind; raised
  as an exception, it unwinds the command like Ctrl-C does and they are removed.
  Both are raised where the command can act on them (see `_on_signal`).
  `boundary` is the function whose frame has the command's except clauses: frames
  above it are not the command's. Handlers are installed only over Python's defaults (not over a caller's own,
  nor over an ignored signal, as in a shell's background job), in the main
  thread; returns {signal: the handler to restore}.
  """
  if threading.current_thread() is not threading.main_thread():
    return {}
  _SIGNALS.update(raised=None, boundary=boundary.__code__)
  replaced = {}
  for signum, default in ((signal.SIGINT, signal.default_int_handler),
                          (signal.SIGTERM, signal.SIG_DFL)):
    if signal.getsignal(signum) is default:
      replaced[signum] = signal.signal(signum, _on_signal)
  if replaced:
    install_unraisable_hook()
  return replaced


def install_unraisable_hook() -> None:
  """Wraps sys.unraisablehook (once per process) to drop what is no error of the command.

  - The KeyboardInterrupt or Terminated the signal handler raised, when it was raised
    where Python drops exceptions (a finalizer, a weakref or garbage-collector callback):
    the signal is delivered again instead (see `_on_signal`).
  - RuntimeError("Event loop is closed") from nowhere (no object): I/O that Orbax had in
    flight (TensorStore reads or writes) completing into the event loop Orbax closed when
    an interrupt or an error (a full disk) went through it. The interrupt or error is
    what the command reports, in one line; these would print a traceback each.
  """
  if _SIGNALS["hooked"]:
    return
  _SIGNALS["hooked"] = True
  previous = sys.unraisablehook

  def unraisable(info) -> None:
    if _SIGNALS["raised"] is not None and info.exc_value is _SIGNALS["raised"]:
      _SIGNALS["raised"] = None  # dropped: the next delivery raises anew
      _deliver_again(_SIGNALS["signum"])
      return
    if (info.object is None and isinstance(info.exc_value, RuntimeError)
        and str(info.exc_value) == "Event loop is closed"):
      return
    previous(info)

  sys.unraisablehook = unraisable


# The exception the signal handler raised (and its signal) until the command has handled it.
_SIGNALS = {"hooked": False, "raised": None, "signum": None, "boundary": None}


def _on_signal(signum, frame) -> None:
  """Raises KeyboardInterrupt (SIGINT) or Terminated (SIGTERM) where the command can act on it.

  - Not inside an import the command makes: an exception raised while a C extension
    initializes can crash the interpreter (matplotlib's ft2font: "Fatal Python error" at
    exit); the signal is delivered again a moment later, after it.
  - Nor inside numba or llvmlite (compiling, or loading a compiled function from numba's
    cache): their Python code runs as callbacks of C code (numba's dispatcher, LLVM through
    ctypes) that does not always pass an exception on, and numba went on with a half-loaded
    function and crashed (segmentation faults in scanpy's normalize_total under SIGTERM).
  - An exception raised in a finalizer, a weakref or garbage-collector callback is
    dropped by Python, and some C code swallows one raised in a callback it made: the
    command went on and finished. Until `_guarded` has the exception, the signal comes
    again every second (and from the unraisable hook at once); then a new one is raised,
    unless the first is still on its way up (it is being handled: cleanup in progress).
  - So a second Ctrl-C or SIGTERM during that cleanup is ignored: cleaning up is what the
    first asked for (kill -9, or a scheduler's SIGKILL after its grace period, still ends it).
  """
  pending = _SIGNALS["raised"]
  if pending is not None and _being_handled(pending):
    _deliver_again(signum, after=1.0, unless_handled=pending)
    return
  for f in _frames(frame):
    if f.f_code is _SIGNALS["boundary"]:
      break
    if _not_to_interrupt(f.f_code.co_filename):
      _deliver_again(signum)
      return
  error = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
  _SIGNALS.update(raised=error, signum=signum)
  _deliver_again(signum, after=1.0, unless_handled=error)  # should it get lost on the way
  raise error


# Code an exception must not interrupt: the import machinery, and packages whose Python code
# runs as callbacks of C code that drops exceptions (see `_on_signal`).
_NOT_TO_INTERRUPT = tuple(f"{os.sep}{package}{os.sep}" for package in ("numba", "llvmlite"))


def _not_to_interrupt(filename: str) -> bool:
  return filename.startswith("<frozen importlib") or any(
      part in filename for part in _NOT_TO_INTERRUPT)


def _being_handled(error: BaseException) -> bool:
  """Whether `error` is on its way up the main thread (an except, finally or __exit__ runs)."""
  current = sys.exc_info()[1]
  while current is not None:
    if current is error:
      return True
    current = current.__context__
  return False


def _deliver_again(signum: int, after: float = 0.05,
                   unless_handled: BaseException | None = None) -> None:
  """Sends `signum` to this process `after` seconds from now (from a thread: the handler runs
  again in the main thread), unless the command has handled `unless_handled` by then."""
  def send() -> None:
    if unless_handled is None or _SIGNALS["raised"] is unless_handled:
      os.kill(os.getpid(), signum)

  timer = threading.Timer(after, send)
  timer.daemon = True
  timer.start()


def _frames(frame):
  while frame is not None:
    yield frame
    frame = frame.f_back


def quiet_exit() -> None:
  """After the command, Ctrl-C and SIGTERM are ignored while the interpreter shuts down.

  The work is done and reported by then, but shutting down can take a moment (JAX
  clears its backends in an exit handler); a signal there printed a traceback of
  that handler. Registered last, so it runs first of the exit handlers (again at
  each call: a later import may have registered more).
  """
  if threading.current_thread() is threading.main_thread():
    atexit.unregister(_ignore_signals)
    atexit.register(_ignore_signals)


def _ignore_signals() -> None:
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)


def restore(previous: dict) -> None:
  """Puts back the handlers `install` replaced; nothing is delivered again after this."""
  _SIGNALS["raised"] = None
  for signum, handler in previous.items():
    signal.signal(signum, handler)


def handled() -> None:
  """The command has the raised signal's exception: no delivery again."""
  _SIGNALS["raised"] = None
