"""Multi-process training on loopback CPU: 1 process vs 2 (launch/local_multiprocess.sh).

The demo config (global batch 16: 8 cells per process with 2), `--steps` steps each;
steps/s is the median of metrics.jsonl's logged rates after the first log interval
(compilation left out), and the losses of every logged step are compared.

    python bench/bench_multiprocess.py [--steps 60] [--write] [--note "machine loaded"]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import results  # noqa: E402  pylint: disable=wrong-import-position

HEADING = "## Multi-process training (CPU, loopback)"


def _run(processes: int, workdir: Path, steps: int, env: dict) -> list[dict]:
  common = ["configs/demo.py", str(workdir), f"--config.num_steps={steps}",
            "--config.log_every=10", f"--config.eval_every={10 * steps}",
            f"--config.checkpoint_every={10 * steps}"]
  if processes == 1:
    cmd = [sys.executable, "-m", "genemamba_jax.train", "--config", common[0], "--workdir",
           *common[1:]]
  else:
    cmd = ["bash", "launch/local_multiprocess.sh", str(processes), *common]
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "loss" in r]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--write", action="store_true", help="replace the RESULTS.md section")
  parser.add_argument("--note", default="", help="e.g. how loaded the machine was")
  a = parser.parse_args()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  with tempfile.TemporaryDirectory() as tmp:
    runs = {n: _run(n, Path(tmp) / f"p{n}", a.steps, env) for n in (1, 2)}
  rate = {n: statistics.median(r["steps_per_s"] for r in rows[1:]) for n, rows in runs.items()}
  diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(runs[1], runs[2]))
  last = runs[1][-1]
  text = f"""{HEADING}

`python bench/bench_multiprocess.py --steps {a.steps}`: the demo config (d_model 64, 2 layers,
L 128, global batch 16), 1 process vs 2 processes on 127.0.0.1 (gloo collectives, 8 cells per
process). {results.machine()}. {a.note}

| processes | steps/s (median after step 10) | loss at step {last['step']} |
|---|---|---|
| 1 | {rate[1]:.2f} | {runs[1][-1]['loss']:.6f} |
| 2 | {rate[2]:.2f} | {runs[2][-1]['loss']:.6f} |

Largest loss difference over the {len(runs[1])} logged steps: {diff:.1e} (the same global
batches; float sums in another order). On one CPU host two processes only add an all-reduce
over TCP: the point is that the multi-host path runs and gives one process's training, not
speed.
"""
  print(text)
  if a.write:
    results.write_section(HEADING, text)


if __name__ == "__main__":
  main()
