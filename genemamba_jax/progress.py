"""The progress bars every command shows, and the status lines printed beside them.

Two habits of plain tqdm make a command's output hard to read, and `Bar` drops them:

- `close()` draws the bar again although the last `update()` already drew its final
  state; in a log file, a notebook or any console that does not honour `\\r`, every
  finished bar then shows its 100% line twice. `Bar` ends the line without the redraw
  when nothing changed since the last draw.
- counts with `unit_scale` come out as `0.00/700` (tqdm formats small numbers with two
  decimals); `Bar(counts=True)` shows integer counts with thousands separators,
  `12,000/30,000 cells`.

Open bars with `with bar(...) as b:` so that a bar is closed, and its line ended, before an
exception reaches the command's `error: ...` line (which would otherwise be printed on
the bar's unfinished line).

`status(message)` prints a line on stderr, the bars' stream: stdout is block-buffered
when it goes to a file or a pipe, so status lines there would reach a combined log out of
order with the bars.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

# tqdm's own layout, with integer counts: {n:,} instead of the scaled {n_fmt}.
COUNT_FORMAT = ("{l_bar}{bar}| {n:,}/{total:,} {unit} "
                "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")


class Bar(tqdm):
  """tqdm that draws its final state once (see the module docstring)."""

  def __init__(self, *args, counts: bool = False, **kwargs):
    if counts and kwargs.get("total") is not None:
      kwargs.setdefault("bar_format", COUNT_FORMAT)
    self._drawn = None  # (n, postfix) of the last draw
    self._closing = False
    super().__init__(*args, **kwargs)

  def display(self, msg=None, pos=None, **kwargs):
    if msg is None and not kwargs:
      state = (self.n, self.postfix)
      if self._closing and state == self._drawn:
        return True  # close(): the final state is on screen already, just end the line
      self._drawn = state
    return super().display(msg, pos, **kwargs)

  def close(self):
    self._closing = True
    super().close()


def bar(total: int | None, desc: str | None, unit: str, *, counts: bool = True,
        **kwargs) -> Bar:
  """A `Bar` over `total` items; `desc=None` hides it (library calls without a label).

  Args:
    total: number of items (cells, steps), or None when unknown.
    desc: the label left of the bar.
    unit: what an item is, e.g. "cells".
    counts: integer counts with thousands separators (see COUNT_FORMAT).
    **kwargs: more tqdm arguments (initial, disable, ...).
  """
  kwargs.setdefault("disable", desc is None)
  kwargs.setdefault("dynamic_ncols", True)
  return Bar(total=total, desc=desc, unit=unit, counts=counts, **kwargs)


def status(message: str) -> None:
  """One status line on stderr (the bars' stream), flushed at once."""
  print(message, file=sys.stderr, flush=True)
