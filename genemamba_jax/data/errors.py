"""The one exception type for bad input data."""


class DataError(ValueError):
  """Input that cannot be used as given.

  The message names the file, field or value at fault and says what to do
  instead; command-line entry points print it as a one-line error and exit
  with a non-zero status.
  """
