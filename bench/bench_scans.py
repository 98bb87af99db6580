"""Selective-scan backends on CPU: forward and forward+backward time and memory.

Mamba-1 `selective_scan` (batch 2, d = 256, N = 16) and Mamba-2 `ssd` (batch 2,
H = 8, P = 64, G = 1, N = 64, i.e. d_inner 512) at L = 512, 2048, 4096, float32,
every backend in `genemamba_jax.ops.BACKENDS` (plus, for Mamba-1, the numba CPU
kernels and the chunked backend with the associative scan inside chunks that
non-CPU platforms use).

Time: `jax.jit`, compiled ahead, one warm-up call, then the median of a few
calls (fewer when a call takes seconds). fwd+bwd is the gradient of sum(y)
w.r.t. all six inputs. Memory: XLA's compiled buffer assignment
(`memory_analysis()`): temp + argument + output bytes, the planned peak of the
executable (CPU has no device peak-memory counter), plus, for the numba
kernels, the host arrays they allocate outside XLA's plan
(`cpu_scan.host_bytes`). A configuration whose plan exceeds MEM_LIMIT is
recorded as skipped, not run.

    python bench/bench_scans.py [--lengths 512 2048 4096] [--write]
"""

import argparse
import datetime
import functools
import os
import platform
import statistics
import textwrap
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import results  # noqa: E402  (bench/results.py, beside this script)
from genemamba_jax.ops import BACKENDS, cpu_scan, selective_scan, ssd  # noqa: E402

_ss_module = sys.modules["genemamba_jax.ops.selective_scan"]

HEADING = "## Selective scan backends (CPU)"
MEM_LIMIT = 8 * 2**30  # shared 24 GB machine: leave room for other work
MiB = 2**20


def mamba1_inputs(length, b=2, d=256, n=16):
  r = np.random.default_rng(0)
  return (jnp.asarray(r.normal(size=(b, length, d)), jnp.float32),
          jnp.asarray(r.uniform(1e-3, 0.1, (b, length, d)), jnp.float32),
          -jnp.tile(jnp.arange(1, n + 1, dtype=jnp.float32), (d, 1)),  # S4D-real
          jnp.asarray(r.normal(size=(b, length, n)), jnp.float32),
          jnp.asarray(r.normal(size=(b, length, n)), jnp.float32),
          jnp.ones((d,), jnp.float32))


def mamba2_inputs(length, b=2, h=8, p=64, g=1, n=64):
  r = np.random.default_rng(0)
  return (jnp.asarray(r.normal(size=(b, length, h, p)), jnp.float32),
          jnp.asarray(r.uniform(1e-3, 0.1, (b, length, h)), jnp.float32),
          jnp.asarray(-r.uniform(1.0, 16.0, (h,)), jnp.float32),
          jnp.asarray(r.normal(size=(b, length, g, n)), jnp.float32),
          jnp.asarray(r.normal(size=(b, length, g, n)), jnp.float32),
          jnp.ones((h,), jnp.float32))


def _chunked_assoc_inner(x, dt, A, B, C, D, *, backend, chunk_size):
  del backend
  return _ss_module._chunked(x, dt, A, B, C, chunk_size, inner="associative") + D * x


def variants(op):
  """(label, fn(*inputs)) per backend to time."""
  fn = selective_scan if op == "selective_scan" else ssd
  out = [(b, functools.partial(fn, backend=b)) for b in BACKENDS]
  if op == "selective_scan":
    out.append(("numba", functools.partial(fn, backend="numba")))
    out.append(("chunked, assoc. inner", functools.partial(
        _chunked_assoc_inner, backend="chunked", chunk_size=64)))
  return out


def measure(fn, args, host_bytes=0):
  """Compiles fn for args; returns dict(ms, mem, compile_s) or dict(skip).

  host_bytes: memory the function allocates outside XLA's plan (the numba kernels).
  """
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  mem = (ma.temp_size_in_bytes + ma.argument_size_in_bytes
         + ma.output_size_in_bytes + host_bytes)
  if mem > MEM_LIMIT:
    return dict(skip=f"skipped: plan needs {mem / 2**30:.1f} GiB", mem=mem,
                compile_s=compile_s)
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  first = time.perf_counter() - t0
  repeats = 5 if first < 0.2 else 3 if first < 3 else 1
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return dict(ms=1e3 * statistics.median(times), mem=mem, compile_s=compile_s,
              repeats=repeats)


def run(lengths):
  rows = []
  for op, make in (("selective_scan", mamba1_inputs), ("ssd", mamba2_inputs)):
    for length in lengths:
      args = make(length)
      for label, fn in variants(op):
        loss = lambda *a, fn=fn: jnp.sum(fn(*a))
        host = {}
        if label == "numba":
          b, _, d = args[0].shape
          host = {grad: cpu_scan.host_bytes(b, length, d, args[2].shape[1], 64, grad=grad)
                  for grad in (False, True)}
        fwd = measure(fn, args, host.get(False, 0))
        bwd = measure(jax.grad(loss, argnums=tuple(range(6))), args, host.get(True, 0))
        rows.append(dict(op=op, L=length, backend=label, fwd=fwd, bwd=bwd))
        print(f"{op:15s} L={length:5d} {label:22s} " + " | ".join(
            f"{k} " + (r["skip"] if "skip" in r else
                       f"{r['ms']:9.1f} ms {r['mem'] / MiB:7.0f} MiB "
                       f"(compile {r['compile_s']:.1f} s)")
            for k, r in (("fwd", fwd), ("fwd+bwd", bwd))), flush=True)
  return rows


def _cell(r, ref, key, fmt):
  if "skip" in r and key == "ms":
    return r["skip"]
  v = r[key]
  ratio = ""
  if ref is not None and key in ref:
    # Time: speed-up over sequential (>1 = faster). Memory: size / sequential's.
    ratio = (f" ({ref[key] / v:.2f}x)" if key == "ms"
             else f" ({v / ref[key]:.2f}x)")
  return fmt(v) + ratio


def table(rows):
  lines = ["| op | L | backend | fwd ms (speed-up) | fwd+bwd ms (speed-up) "
           "| fwd MiB (vs seq) | fwd+bwd MiB (vs seq) |",
           "|---|---|---|---|---|---|---|"]
  ms = lambda v: f"{v:,.1f}"
  mib = lambda v: f"{v / MiB:,.0f}"
  for row in rows:
    ref = next(r for r in rows if r["op"] == row["op"] and r["L"] == row["L"]
               and r["backend"] == "sequential")
    lines.append(
        f"| {row['op']} | {row['L']} | {row['backend']} | "
        f"{_cell(row['fwd'], ref['fwd'], 'ms', ms)} | "
        f"{_cell(row['bwd'], ref['bwd'], 'ms', ms)} | "
        f"{_cell(row['fwd'], ref['fwd'], 'mem', mib)} | "
        f"{_cell(row['bwd'], ref['bwd'], 'mem', mib)} |")
  return "\n".join(lines)


def fastest_training(rows):
  out = []
  for op in dict.fromkeys(r["op"] for r in rows):
    for length in dict.fromkeys(r["L"] for r in rows):
      timed = [r for r in rows if r["op"] == op and r["L"] == length
               and "ms" in r["bwd"] and r["backend"] in (*BACKENDS, "numba")]
      if timed:
        best = min(timed, key=lambda r: r["bwd"]["ms"])
        out.append(f"{op} L={length}: {best['backend']} "
                   f"({best['bwd']['ms']:,.0f} ms)")
  return out


def machine():
  with open("/proc/cpuinfo") as f:
    model = next((l.split(":", 1)[1].strip() for l in f
                  if l.startswith("model name")), platform.processor())
  return (f"{model}, {os.cpu_count()} cores, {platform.machine()}, python "
          f"{platform.python_version()}, jax {jax.__version__} "
          f"({jax.default_backend()}), numpy {np.__version__}")


def section(rows, seconds):
  load = os.getloadavg()
  wrap = lambda text: textwrap.fill(text, 100, break_on_hyphens=False)
  return "\n".join([
      HEADING, "",
      wrap("`python bench/bench_scans.py --write`: `genemamba_jax.ops.selective_scan` (Mamba-1: "
      "batch 2, d = 256, N = 16) and `ssd` (Mamba-2: batch 2, H = 8, P = 64, G = 1, "
      "N = 64), float32, chunk_size 64. Time: jit, compiled ahead, one warm-up, median "
      "of 5 / 3 / 1 calls (by call length). fwd+bwd = gradient of sum(y) w.r.t. all six "
      "inputs. Memory: XLA's compiled buffer plan (`memory_analysis()` temp + arguments "
      "+ outputs), i.e. the executable's planned peak; CPU has no device peak counter. "
      "Speed-up = sequential's time / the backend's (>1 is faster); memory ratio = the "
      "backend's / sequential's. \"numba\" is the compiled CPU kernels "
      "(`ops/cpu_scan.py`, the CPU default for Mamba-1); its memory adds the host arrays the "
      "kernels allocate outside XLA's plan. \"chunked, assoc. inner\" is the chunked backend "
      "with the associative scan inside chunks (what it uses off CPU)."),
      "",
      f"- machine: {machine()}",
      f"- run: {datetime.date.today().isoformat()}, {seconds:.0f} s in all, load "
      f"average at the end {load[0]:.1f} (shared machine: other work ran alongside)",
      "", table(rows), "",
      wrap("Fastest for training (fwd+bwd) on this CPU: " + "; ".join(
          fastest_training(rows)) + "."), "", ""])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
  parser.add_argument("--write", action="store_true",
                      help=f"replace the '{HEADING}' section of bench/RESULTS.md")
  args = parser.parse_args()
  t0 = time.perf_counter()
  rows = run(args.lengths)
  text = section(rows, time.perf_counter() - t0)
  print()
  print(text)
  if args.write:
    results.write_section(HEADING, text)


if __name__ == "__main__":
  main()
