"""Shared command-line plumbing of the absl-based commands (train, finetune)."""

import sys

from absl import flags


def parse_flags(argv):
  """absl's parsing, with a bad flag, config key or value as a one-line error (exit status 2)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    cause = e  # config overrides wrap a KeyError in an AttributeError: show the innermost text
    while cause.args and isinstance(cause.args[0], Exception):
      cause = cause.args[0]
    message = (cause.args[0] if cause.args and isinstance(cause.args[0], str) else str(cause))
    message = " ".join(message.split())
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
