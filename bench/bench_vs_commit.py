"""The train step of this tree vs another commit's, on one machine, in one run.

Checks a refactoring kept the speed: each round times the default CPU train step
(bench_train_step.py's sizes: d_model 128, 4 layers, L 512, batch 8) of both
trees, each in a fresh process, the two interleaved so drift in the machine's
load hits both alike. The other commit is checked out into a temporary git
worktree; its step is timed with its own `time_train_step` (genemamba_jax/bench.py
before the move to bench/train_step.py).

    python bench/bench_vs_commit.py REV [--rounds 3] [--steps 5] [--write]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Train step vs an earlier commit (CPU)"
MIXERS = ("mamba2", "mamba1")
# Prints the tokens/s of `time_train_step` in the tree at sys.argv[1] (either location).
TIMER = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench"]
try:
  from train_step import time_train_step
except ImportError:
  from genemamba_jax.bench import time_train_step
out = time_train_step(mixer=sys.argv[2], steps=int(sys.argv[3]), warmup=2)
print(json.dumps(out["tokens_per_s"]))
"""


def tokens_per_s(tree: Path, mixer: str, steps: int) -> float:
  result = subprocess.run([sys.executable, "-c", TIMER, str(tree), mixer, str(steps)],
                          cwd=tree, capture_output=True, text=True, check=False)
  if result.returncode:
    raise SystemExit(f"{tree}: the train step failed:\n{result.stderr[-2000:]}")
  return float(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("rev", help="the commit to compare with (anything git rev-parse takes)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per process (default 5)")
  parser.add_argument("--mixers", nargs="+", choices=MIXERS, default=list(MIXERS))
  parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
  a = parser.parse_args()
  commit = subprocess.run(["git", "rev-parse", "--short", a.rev], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                        text=True, check=True).stdout.strip()
  with tempfile.TemporaryDirectory() as tmp:
    other = Path(tmp) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(other), commit], cwd=ROOT,
                   check=True)
    try:
      times = {(tree, mixer): [] for tree in ("before", "now") for mixer in a.mixers}
      for round_ in range(a.rounds):
        for mixer in a.mixers:
          for tree, path in (("before", other), ("now", ROOT)):
            times[tree, mixer].append(tokens_per_s(path, mixer, a.steps))
            print(f"round {round_ + 1}, {mixer}, {tree}: {times[tree, mixer][-1]:,.0f} tokens/s",
                  flush=True)
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False)
  rows = []
  for mixer in a.mixers:
    before, now = (statistics.median(times[t, mixer]) for t in ("before", "now"))
    spread = max(max(v) / min(v) - 1 for v in (times["before", mixer], times["now", mixer]))
    rows.append(f"| {mixer} | {before:,.0f} | {now:,.0f} | {now / before:.2f}x | "
                f"{100 * spread:.0f}% |")
  text = "\n".join([
      HEADING, "",
      f"`python bench/bench_vs_commit.py {a.rev} --rounds {a.rounds} --steps {a.steps} "
      f"--mixers {' '.join(a.mixers)}`: the "
      f"default CPU train step (bench_train_step.py's sizes) of commit {commit} vs this tree "
      f"({here}), each timed in a fresh process ({a.steps} steps after 2 warm-up), the two "
      f"interleaved over {a.rounds} rounds; medians. Spread: the largest max/min - 1 of one "
      "tree's rounds, the noise to read the ratio against.", "",
      f"- machine: {results.machine()}, jax {importlib.metadata.version('jax')}", "",
      f"| mixer | {commit} tokens/s | {here} tokens/s | ratio | spread |",
      "|---|---|---|---|---|", *rows])
  print(text)
  if a.write:
    results.write_section(HEADING, text)


if __name__ == "__main__":
  main()
