"""GPU rows for bench/RESULTS.md: the paper model's training throughput and the scan kernel's bandwidth.

    python bench/bench_gpu.py [--batch 8] [--steps 10] [--write]

On one GPU, in one run:
  1. The paper model (24 Mamba-2 BiMamba layers, d 512, vocab 25,426, 2,048 tokens, bf16
     compute, remat; 65.74M parameters): tokens/s, model FLOP utilisation (6 N FLOPs per
     token against the device's peak), and s/sample beside the paper's Table 6 (0.1284 s/sample
     on an A100) and the target (<= 6.4 ms/sample on one H100).
  2. The same model with Mamba-1 mixers, scan backend `pallas` vs `chunked`.
  3. The Mamba-1 Pallas kernel alone (forward, and forward+backward): achieved memory bandwidth
     (bytes it must read and write / time) against the device's peak.
Exits with status 2 and a message when no GPU is visible.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import results  # noqa: E402  (bench/results.py, beside this script)
import train_step  # noqa: E402  (bench/train_step.py, beside this script)
from genemamba_jax.model import count_params
from genemamba_jax.train import metric_writer

PAPER_S_PER_SAMPLE = 0.1284  # Table 6, A100
TARGET_S_PER_SAMPLE = 0.0064  # the target on one H100
PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}


def _peak_bandwidth() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, value in sorted(PEAK_BYTES_PER_S.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return value
  return None


def paper_rows(batch: int, steps: int) -> list[dict]:
  rows = []
  for mixer, backend in (("mamba2", "auto"), ("mamba1", "pallas"), ("mamba1", "chunked")):
    r = train_step.time_train_step(mixer=mixer, d_model=512, layers=24, seq_len=2048,
                                   batch=batch, vocab=25_426, steps=steps, backend=backend,
                                   dtype="bfloat16", remat=True)
    params = count_params(r["config"])
    peak = metric_writer.peak_flops_per_device()
    s_per_sample = 2048 / r["tokens_per_s"]
    rows.append({"model": f"{mixer} ({params / 1e6:.2f}M)", "backend": backend,
                 "tokens/s": r["tokens_per_s"], "ms/sample": 1e3 * s_per_sample,
                 "vs paper A100": PAPER_S_PER_SAMPLE / s_per_sample,
                 "MFU": 6 * params * r["tokens_per_s"] / peak if peak else float("nan"),
                 "compile s": r["compile_s"]})
  return rows


def kernel_rows(b: int = 8, length: int = 2048, d: int = 1024, n: int = 16) -> list[dict]:
  from genemamba_jax.ops.pallas_scan import selective_scan_pallas  # pylint: disable=g-import-not-at-top
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (b, length, d))
  dt = jax.nn.softplus(jax.random.normal(ks[1], (b, length, d)) - 2)
  a = -jnp.exp(jax.random.normal(ks[2], (d, n)))
  bb, cc = (jax.random.normal(k, (b, length, n)) for k in ks[3:])
  fwd = jax.jit(lambda *args: selective_scan_pallas(*args))
  grad = jax.jit(jax.grad(lambda *args: selective_scan_pallas(*args).sum(), argnums=(0, 1, 2, 3,
                                                                                    4)))
  word = 4
  seq = b * length * d * word  # one [b, L, d] float32 array
  small = b * length * n * word  # one [b, L, N] array
  states = b * (length // 64) * d * n * word  # chunk boundary states
  moved = {"forward": 2 * seq + 2 * small + seq + states,  # read x, dt, B, C; write y, states
           "forward+backward": 2 * (2 * seq + 2 * small + seq + states) + 3 * seq + 2 * small}
  peak = _peak_bandwidth()
  rows = []
  for name, fn in (("forward", fwd), ("forward+backward", grad)):
    jax.block_until_ready(fn(x, dt, a, bb, cc))
    times = []
    for _ in range(10):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(x, dt, a, bb, cc))
      times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    rows.append({"pass": name, "shape (b, L, d, N)": f"({b}, {length}, {d}, {n})",
                 "ms": 1e3 * t, "GB/s": moved[name] / t / 1e9,
                 "of peak": moved[name] / t / peak if peak else float("nan")})
  return rows


# The placeholder section of RESULTS.md for as long as no GPU has run this script.
NOT_MEASURED = "## GPU: not measured yet"


def _table(rows: list[dict]) -> str:
  keys = list(rows[0])
  fmt = lambda v: f"{v:,.3g}" if isinstance(v, float) else str(v)
  return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] +
                   ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--write", action="store_true", help="write (or replace) the section in RESULTS.md")
  a = parser.parse_args()
  if jax.default_backend() not in ("gpu", "cuda", "rocm"):
    print(f"no GPU visible (JAX platform {jax.default_backend()}); run this on a GPU machine",
          file=sys.stderr)
    return 2
  device = jax.devices()[0].device_kind
  text = (f"\n## GPU ({device})\n\n`python bench/bench_gpu.py --batch {a.batch}`, "
          f"{datetime.date.today()}, JAX {jax.__version__}.\n\n"
          f"Paper model, bf16, remat, batch {a.batch} x 2,048 tokens:\n\n"
          f"{_table(paper_rows(a.batch, a.steps))}\n\nMamba-1 Pallas kernel:\n\n"
          f"{_table(kernel_rows())}\n")
  print(text)
  if a.write:
    results.write_section(text.strip("\n").splitlines()[0], text, replaces=(NOT_MEASURED,))
  return 0


if __name__ == "__main__":
  sys.exit(main())
