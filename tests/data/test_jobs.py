"""jobs: running work units, and handing their results back in unit order."""

import os
import time

import pytest

from genemamba_jax.data import jobs


def test_in_order_holds_early_results_back_until_their_turn():
  arrivals = [(2, "c"), (0, "a"), (3, "d"), (1, "b"), (4, "e")]
  seen = []

  def results():
    for item in arrivals:
      seen.append(item[0])
      yield item

  out = []
  for payload in jobs.in_order(results()):
    out.append((payload, list(seen)))
  assert [p for p, _ in out] == ["a", "b", "c", "d", "e"]
  assert out[0][1] == [2, 0]  # "a" is handed on as soon as it arrives, not at the end
  assert out[1][1] == [2, 0, 3, 1]


@pytest.mark.slow
def test_run_units_ordered_yields_in_unit_order_though_units_finish_out_of_order(tmp_path):
  # Unit 0 waits until unit 3 is done: with 2 processes, units 1-3 surely finish first.
  units = [jobs.Unit(i, 0, 10 * i, 10 * i + 10) for i in range(4)]
  done = []
  ordered = jobs.run_units(_unit, units, (str(tmp_path),), 2, 40, "test", ordered=True)
  for payload in ordered:
    done.append(payload)
    assert sorted(os.listdir(tmp_path)) == ["3"]  # unit 0 is handed on after unit 3 finished
  assert done == [0, 1, 2, 3]


def _unit(unit, folder):
  if unit.index == 0:
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(folder, "3")) and time.time() < deadline:
      time.sleep(0.05)
  elif unit.index == 3:
    open(os.path.join(folder, "3"), "w").close()
  return unit.stop - unit.start, unit.index
