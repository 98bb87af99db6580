"""The one command-line pattern: argparse, config files with overrides, and one error wrapper.

Every command is `main(argv=None) -> int`, a console script and `python -m genemamba_jax.X`:

    def main(argv=None):
      return cli.run(build_parser(), argv)          # parser's `run(args) -> lines to print`

Bad input (`DataError`, a bad config key or value) and a full disk end the command
with one line `error: <what>; <what to do>` on stderr and exit status 2, no
traceback; Ctrl-C ends it with status 130 and one line `interrupted: ...`, SIGTERM
with status 143 (128 + 15, what a shell reports for a command SIGTERM ended) and
one line `terminated (SIGTERM): ...`. Both unwind the command like an error, so
the temporary files of atomic writes are removed (commands that can save their
work, like `train`, handle SIGINT and SIGTERM themselves first). `--help` exits 0.

Config-file commands (`train`, `finetune`) take `--config FILE[:ARG]` (a Python
file with `get_config(arg)` returning an ml_collections ConfigDict) and
overrides `--config.key=value`, typed by the key's default; an unknown key is
refused with the closest keys of its section. `--help` lists every key.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import difflib
import errno
import importlib.util
import inspect
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections

from genemamba_jax.data.errors import DataError

INTERRUPTED = 130  # the shell's status for a command ended by SIGINT
TERMINATED = 143  # ... and by SIGTERM


class Interrupted(KeyboardInterrupt):
  """Ctrl-C, after the command saved what it could; the message says what was kept."""


class Terminated(KeyboardInterrupt):
  """SIGTERM (a `kill`, a scheduler's preemption), raised like Ctrl-C's KeyboardInterrupt."""


class CommandError(DataError):
  """A problem of the command line itself (a bad flag value, a config file that fails)."""


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
        errors: tuple[type[BaseException], ...] = ()) -> int:
  """Parses `argv` and calls `args.run(args)` under `guarded`."""
  args = parser.parse_args(argv)
  return guarded(lambda: args.run(args), errors, getattr(args, "on_interrupt", None))


def guarded(fn: Callable[[], Sequence[str] | None],
            errors: tuple[type[BaseException], ...] = (), on_interrupt: str | None = None) -> int:
  """Calls `fn`, prints the lines it returns; the one error wrapper (see the module docstring).

  `errors` adds exception types that mean "the run cannot go on" (reported like
  bad input, e.g. a non-finite loss); `on_interrupt` says what Ctrl-C keeps.
  Open progress bars are closed before any message, so it starts its own line.
  Returns the exit status.
  """
  previous = _install_signal_handlers()
  try:
    return _guarded(fn, errors, on_interrupt)
  finally:
    _SIGNALS["raised"] = None  # the command is over: nothing to deliver again
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    _quiet_exit()


def _install_signal_handlers() -> dict:
  """Ctrl-C and SIGTERM raise in the command (`KeyboardInterrupt`, `Terminated`).

  Python's default for SIGTERM ends the process where it stands, leaving the
  temporary files of atomic writes (and finetune's hidden workdir) behind; raised
  as an exception, it unwinds the command like Ctrl-C does and they are removed.
  Both are raised where the command can act on them (see `_on_signal`).
  Handlers are installed only over Python's defaults (not over a caller's own,
  nor over an ignored signal, as in a shell's background job), in the main
  thread; returns {signal: the handler to restore}.
  """
  if threading.current_thread() is not threading.main_thread():
    return {}
  _SIGNALS["raised"] = None
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
_SIGNALS = {"hooked": False, "raised": None, "signum": None}


def _on_signal(signum, frame) -> None:
  """Raises KeyboardInterrupt (SIGINT) or Terminated (SIGTERM) where the command can act on it.

  - Not inside an import the command makes: an exception raised while a C extension
    initializes can crash the interpreter (matplotlib's ft2font: "Fatal Python error" at
    exit); the signal is delivered again a moment later, after it.
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
    if f.f_code is _guarded.__code__:
      break
    if f.f_code.co_filename.startswith("<frozen importlib"):
      _deliver_again(signum)
      return
  error = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
  _SIGNALS.update(raised=error, signum=signum)
  _deliver_again(signum, after=1.0, unless_handled=error)  # should it get lost on the way
  raise error


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
  again in the main thread), unless `_guarded` has handled `unless_handled` by then."""
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


def _quiet_exit() -> None:
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


def _guarded(fn, errors, on_interrupt) -> int:
  try:
    lines = fn()
  except (DataError, *errors) as e:
    _close_bars()
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 2
  except OSError as e:
    if _disk_full(e) is None:
      raise
    _close_bars()
    full = _disk_full(e)
    where = f"{full.filename}: " if full.filename else ""
    print(f"error: {where}no space left to write ({full.strerror}); free some space and re-run "
          "the same command (what was finished is kept, nothing half-written is)",
          file=sys.stderr, flush=True)
    return 2
  except KeyboardInterrupt as e:
    _SIGNALS["raised"] = None  # handled: no delivery again
    _close_bars()
    what = (str(e) or on_interrupt
            or "nothing half-written is kept; re-run the command to do it again")
    terminated = isinstance(e, Terminated)
    print(f"\n{'terminated (SIGTERM)' if terminated else 'interrupted'}: {what}", file=sys.stderr,
          flush=True)
    return TERMINATED if terminated else INTERRUPTED
  if lines:
    print("\n".join(lines), flush=True)
  return 0


def _close_bars() -> None:
  """Closes progress bars an exception left open (their line ends before the message)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  for bar in list(getattr(tqdm, "_instances", ())):
    bar.close()


def _disk_full(error: BaseException) -> OSError | None:
  """The out-of-space OSError (ENOSPC, EDQUOT, or EFBIG: a file-size limit) in the chain."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
      return error
    error = error.__cause__ or error.__context__
  return None


# --- config files ------------------------------------------------------------------------------


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`FILE[:ARG]` -> get_config(ARG) of that Python file; CommandError when it cannot be used."""
  path, _, arg = spec.partition(":")
  file = Path(path)
  if not file.is_file():
    folder = file.parent if file.parent.is_dir() else Path(".")
    near = sorted(p.name for p in folder.glob("*.py") if not p.name.startswith("_"))
    hint = f" ({file.parent or '.'} has {', '.join(near)})" if near else ""
    raise CommandError(f"--config {path}: no such file{hint}; pass a config file such as "
                       "configs/demo.py")
  module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise CommandError(f"--config {path}: defines no get_config(arg)")
    config = module.get_config(arg or None)
  except (ValueError, KeyError, TypeError, AttributeError) as e:  # a bad :ARG, a misspelt key
    raise CommandError(f"--config {spec}: {' '.join(str(e).split())}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise CommandError(f"--config {path}: get_config returned {type(config).__name__}, not a "
                       "ConfigDict")
  return config


def _parse_value(text: str, current, key: str):
  """`text` as a value of `current`'s type (bool, int, float, str, tuple, list, None)."""
  try:
    if isinstance(current, bool):
      lowered = text.lower()
      if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError("expected true or false")
      return lowered in ("true", "1", "yes")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):  # a,b,c: a list of strings
        value = [v for v in text.split(",") if v]
      if not isinstance(value, (tuple, list)):
        value = [value]
      return type(current)(value)
    try:
      return ast.literal_eval(text)  # a None default: a number, a literal, or else a string
    except (ValueError, SyntaxError):
      return text
  except ValueError as e:
    kind = type(current).__name__
    raise CommandError(f"--config.{key}={text}: not {'an' if kind[0] in 'aeiou' else 'a'} {kind} "
                       f"({e})") from None


def _closest(name: str, options: Sequence[str], section: str) -> str:
  near = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
  if near:
    return "did you mean " + " or ".join(f"{section}{n}" for n in near) + "?"
  return f"the keys of {section.rstrip('.') or 'the config'} are {', '.join(sorted(options))}"


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets `config.<key>` from the text of `--config.<key>=<text>`; CommandError names the key."""
  *parents, leaf = key.split(".")
  node, section = config, ""
  for part in parents:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise CommandError(f"--config.{key}: unknown key {section}{part}; "
                         + _closest(part, list(node.keys()), section))
    node, section = node[part], f"{section}{part}."
  if leaf not in node:
    raise CommandError(f"--config.{key}: unknown key {section}{leaf}; "
                       + _closest(leaf, list(node.keys()), section))
  value = _parse_value(text, node[leaf], key)
  try:
    with node.unlocked():
      node[leaf] = value
  except TypeError as e:
    raise CommandError(f"--config.{key}={text}: {e}") from None


def key_comments(sources: Sequence[tuple[object, str]]) -> dict[str, str]:
  """{"section.key": comment} read from the source of config builders, for `--help`.

  Each source is (function or class, key prefix). Recognised, with the comment at
  the end of the line or on the comment lines just above it:
    c.key = value                 (prefix + "key"; `c.section.key` likewise)
    c.section = ConfigDict(dict(  then  key=value,  lines (prefix + "section.key")
    return ConfigDict(dict(       then  key=value,  lines (prefix + "key")
    name: type = value            (dataclass fields: prefix + "name")
  """
  assign = re.compile(r"^\s*\w+\.([\w.]+)\s*=\s*(.*)$")
  item = re.compile(r"^\s*[\"']?(\w+)[\"']?\s*[=:]\s*[^=].*$")
  field = re.compile(r"^\s*(\w+)\s*:\s*[^=]+=.*$")
  out = {}
  for source, prefix in sources:
    section, above = None, []
    for line in inspect.getsource(source).splitlines():
      if line.strip().startswith("#"):
        above.append(line.strip().lstrip("#").strip())
        continue
      code, _, comment = line.partition("  # ")
      stripped = code.strip()
      text = comment.strip() or " ".join(above)
      above = []
      if "ConfigDict(dict(" in code or "ConfigDict({" in code:
        match = assign.match(code)
        section = match.group(1) + "." if match else ""
        continue
      if section is not None and stripped.startswith(("))", "})")):
        section = None
        continue
      match = (item if section is not None else assign).match(code)
      if match is None and section is None:
        match = field.match(code)
      if match and text:
        out[prefix + (section or "") + match.group(1)] = text
  return out


def _first_sentence(text: str, limit: int = 110) -> str:
  sentence = re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")
  return sentence if len(sentence) <= limit else sentence[:limit - 3].rstrip() + "..."


def describe_keys(config: ml_collections.ConfigDict, comments: dict[str, str],
                  prefix: str = "") -> list[str]:
  """One line per leaf key: `  key = value  # comment`."""
  lines = []
  for key in config.keys():
    value = config[key]
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      lines.extend(describe_keys(value, comments, f"{name}."))
    else:
      comment = f"  # {_first_sentence(comments[name])}" if name in comments else ""
      lines.append(f"  {name} = {value!r}{comment}")
  return lines


class ConfigCommand:
  """argparse for `--config FILE[:ARG] --workdir DIR [--config.key=value ...]`.

  `run(config, workdir) -> lines` does the work; `default_config()` and the
  (source, key prefix) pairs of `comment_sources` give `--help` its key list
  and comments (see `key_comments`).
  """

  def __init__(self, prog: str, description: str, default_config: Callable,
               run_fn: Callable, example: str, comment_sources: Sequence[tuple] = (),
               errors: tuple[type[BaseException], ...] = ()):
    self.prog, self.description, self.example = prog, description, example
    self.default_config, self.run_fn, self.errors = default_config, run_fn, errors
    self.comment_sources = tuple(comment_sources) or ((default_config, ""),)

  def parser(self) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=self.prog, description=self.description, add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true", help="this help, with every config key")
    parser.add_argument("--config", metavar="FILE[:ARG]", help=f"config file, e.g. {self.example}")
    parser.add_argument("--workdir", metavar="DIR", help="the run directory")
    return parser

  def main(self, argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = self.parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
      self.print_help(parser, args.config)
      return 0
    overrides, unexpected = [], []
    for item in rest:
      if item.startswith("--config."):
        key, eq, value = item[len("--config."):].partition("=")
        if not eq:
          unexpected.append(item)
        overrides.append((key, value))
      else:
        unexpected.append(item)
    if unexpected:
      parser.error(f"unexpected arguments {' '.join(unexpected)} (config overrides are "
                   "--config.key=value, with the '=')")
    if not args.config or not args.workdir:
      parser.error("--config and --workdir are required")

    def run_command():
      config = load_config_file(args.config)
      for key, value in overrides:
        apply_override(config, key, value)
      return self.run_fn(config, args.workdir)

    return guarded(run_command, self.errors)

  def print_help(self, parser: argparse.ArgumentParser, spec: str | None) -> None:
    parser.print_help()
    config, source = self.default_config(), "defaults"
    if spec:
      try:
        config, source = load_config_file(spec), spec
      except CommandError as e:
        print(f"\n({e}; showing the defaults)")
    comments = key_comments(self.comment_sources)
    print(f"\nconfig keys ({source}); override any with --config.KEY=VALUE:")
    print("\n".join(describe_keys(config, comments)))
