"""The one exception type for bad input data, and how messages name the settings to change."""

import contextlib
import contextvars
from collections.abc import Iterator


class DataError(ValueError):
  """Input that cannot be used as given.

  The message names the file, field or value at fault and says what to do
  instead; command-line entry points print it as a one-line error and exit
  with a non-zero status.
  """


# The command-line spelling of the settings that error messages tell the user to change: the
# flags of `prepare` / `embed` by default, `--config.data.*` inside `finetune` (`option_names`).
_OPTION_NAMES: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "option_names", default={})


def option(name: str) -> str:
  """How the running command spells setting `name` (e.g. "layer" -> "--layer")."""
  return _OPTION_NAMES.get().get(name, "--" + name.replace("_", "-"))


@contextlib.contextmanager
def option_names(**names: str) -> Iterator[None]:
  """Within the block, error messages name settings as `names` says (setting -> spelling)."""
  token = _OPTION_NAMES.set({**_OPTION_NAMES.get(), **names})
  try:
    yield
  finally:
    _OPTION_NAMES.reset(token)
