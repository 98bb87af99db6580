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
import difflib
import errno
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections

from genemamba_jax import signals
from genemamba_jax.errors import DataError

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
  previous = signals.install(boundary=_guarded)
  try:
    return _guarded(fn, errors, on_interrupt)
  finally:
    signals.restore(previous)  # the command is over: nothing to deliver again
    signals.quiet_exit()


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
    signals.handled()
    _close_bars()
    what = (str(e) or on_interrupt
            or "nothing half-written is kept; re-run the command to do it again")
    terminated = isinstance(e, signals.Terminated)
    print(f"\n{'terminated (SIGTERM)' if terminated else 'interrupted'}: {what}", file=sys.stderr,
          flush=True)
    return signals.TERMINATED if terminated else signals.INTERRUPTED
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


RUN_DIRECTORY = "a train/finetune run directory (its latest checkpoint) or checkpoints/<step>"
CELL_INPUT = ".h5ad file, 10x folder or 10x .h5, or a SOMA experiment (folder or URI)"


def add_model_arguments(parser, checkpoint: str = RUN_DIRECTORY, batch_size: int = 64,
                        unit: str = "cells", max_len: str | None = "the training length") -> None:
  """How a command runs a trained model, the same in each: --checkpoint, --batch-size and,
  unless `max_len` (the default's description) is None, --max-len."""
  parser.add_argument("--checkpoint", required=True, help=checkpoint)
  parser.add_argument("--batch-size", type=int, default=batch_size,
                      help=f"{unit} per forward pass (default {batch_size}); results do not "
                           "depend on it")
  if max_len is not None:
    parser.add_argument("--max-len", type=int, default=None,
                        help=f"tokens per cell (default: {max_len})")


def add_input_arguments(parser, inputs: str = "the input") -> None:
  """The options that say how to read cells from `--input` (and `--reference`/`--query`): gene
  ids, gene map, counts layer and the SOMA options, the same in every command that reads cells."""
  from genemamba_jax.data import soma_reader  # pylint: disable=g-import-not-at-top (scipy: slow)
  parser.add_argument("--gene-column", default=None,
                      help=f"var column with the gene ids in {inputs} (default: the var index)")
  parser.add_argument("--gene-map", default=None,
                      help=f"symbol -> vocabulary id table (pkl/TSV), e.g. Geneformer's "
                           f"gene_name_id_dict.pkl when {inputs} has symbols and the vocabulary "
                           f"Ensembl ids")
  parser.add_argument("--layer", "--x-layer", default=None,
                      help=f"counts from this layer of {inputs}, or 'raw' for .raw.X (default: "
                           f"X); of a SOMA experiment: its X layer (default raw)")
  soma_reader.add_arguments(parser)
