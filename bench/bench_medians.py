"""Benchmark: per-gene non-zero medians with GeneDigests (speed, accuracy).

Generates 10x-like UMI data (cells drawn from a few cell types, UMIs sampled
multinomially from type-specific gene profiles, so counts are overdispersed
across cells), normalizes each cell to counts / total * 1e4, streams it
through `GeneDigests.update` in chunks and compares the digest medians with
numpy's exact per-gene medians of the non-zero values.

  python bench/bench_medians.py [--cells 15000] [--genes 20000] [--write]

--write records the figures in bench/RESULTS.md under "## Gene medians
(t-digest)", replacing only that section.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import results  # noqa: E402  (bench/results.py, beside this script)
from genemamba_jax.data.digests import GeneDigests  # noqa: E402

HEADING = "## Gene medians (t-digest)"


def make_counts(cells: int, genes: int, seed: int = 0) -> sp.csr_matrix:
  """[cells, genes] float32 CSR of UMI counts, ~1400 non-zeros per cell."""
  rng = np.random.default_rng(seed)
  base = rng.lognormal(0.0, 1.8, genes)
  types = 8
  profiles = base * rng.lognormal(0.0, 0.8, (types, genes))
  cdf = np.cumsum(profiles / profiles.sum(1, keepdims=True), axis=1)
  cell_type = rng.integers(0, types, cells)
  umis = np.maximum(rng.lognormal(np.log(2200), 0.45, cells).astype(np.int64),
                    200)
  rows, cols = [], []
  for t in range(types):
    idx = np.flatnonzero(cell_type == t)
    n = umis[idx]
    u = rng.random(int(n.sum()))
    g = np.minimum(np.searchsorted(cdf[t], u), genes - 1)
    rows.append(np.repeat(idx, n))
    cols.append(g)
  key = np.concatenate(rows).astype(np.int64) * genes + np.concatenate(cols)
  key.sort()
  uniq, cnt = np.unique(key, return_counts=True)
  x = sp.csr_matrix((cnt.astype(np.float32), (uniq // genes, uniq % genes)),
                    shape=(cells, genes))
  x.sort_indices()
  return x


def normalize(x: sp.csr_matrix) -> sp.csr_matrix:
  total = np.asarray(x.sum(1), np.float64).ravel()
  y = x.copy()
  y.data = (y.data / np.repeat(total, np.diff(y.indptr)) * 1e4).astype(np.float32)
  return y


def exact_medians(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
  """[genes] numpy median of each column's non-zeros (nan if none), [genes] n."""
  c = x.tocsc()
  c.sort_indices()
  n = np.diff(c.indptr)
  med = np.full(x.shape[1], np.nan)
  for j in np.flatnonzero(n).tolist():
    med[j] = np.median(c.data[c.indptr[j]:c.indptr[j + 1]].astype(np.float64))
  return med, n


def real_data_errors() -> list[str]:
  """Max relative error on the real files in ../shared/data, if present."""
  folder = Path(__file__).resolve().parents[1].parent / "shared" / "data"
  out = []
  for name in ("kang_pbmc_ifnb.h5ad", "pbmc68k_reduced_counts.h5ad"):
    if not (folder / name).exists():
      continue
    import anndata  # pylint: disable=import-outside-toplevel
    a = anndata.read_h5ad(folder / name)
    x = normalize(sp.csr_matrix(a.X, dtype=np.float32))
    ids = list(a.var_names)
    d = GeneDigests()
    d.update(ids, x)
    est = d.medians()
    med, n = exact_medians(x)
    sel = np.flatnonzero(n >= 100).tolist()
    err = np.array([abs(est[ids[j]] - med[j]) / med[j] for j in sel])
    out.append(f"{name} ({len(sel)} genes with >= 100 non-zeros): max "
               f"{err.max():.4%}, {np.mean(err < 1e-9):.0%} exact")
  return out


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cells", type=int, default=15000)
  ap.add_argument("--genes", type=int, default=20000)
  ap.add_argument("--chunk", type=int, default=4096)
  ap.add_argument("--compression", type=float, default=200.0)
  ap.add_argument("--write", action="store_true")
  args = ap.parse_args()

  t = time.perf_counter()
  x = normalize(make_counts(args.cells, args.genes))
  gen_s = time.perf_counter() - t
  ids = [f"ENSG{i:011d}" for i in range(args.genes)]
  chunks = [x[s:s + args.chunk] for s in range(0, x.shape[0], args.chunk)]
  nnz = x.nnz

  d = GeneDigests(args.compression)
  t = time.perf_counter()
  for c in chunks:
    d.update(ids, c)
  est = d.medians()
  upd_s = time.perf_counter() - t
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    d.save(Path(tmp) / "medians.json")
    save_s = time.perf_counter() - t
    size_mb = (Path(tmp) / "medians.json").stat().st_size / 2**20
    t = time.perf_counter()
    GeneDigests.load(Path(tmp) / "medians.json")
    load_s = time.perf_counter() - t

  med, n = exact_medians(x)
  sel = np.flatnonzero(n >= 100)
  err = np.array([abs(est[ids[j]] - med[j]) / med[j] for j in sel.tolist()])
  small = np.flatnonzero((n > 0) & (n < 100))
  err_small = np.array([abs(est[ids[j]] - med[j]) / med[j]
                        for j in small.tolist()])
  rate = nnz / upd_s
  exact_share = np.mean(err < 1e-9)
  ref = "not installed"
  try:  # Reference: the pure-Python tdigest package (a test dependency).
    import tdigest  # pylint: disable=import-outside-toplevel
    sample = x.data[:20_000].astype(np.float64)
    t = time.perf_counter()
    tdigest.TDigest().batch_update(sample)
    ref = f"{sample.size / (time.perf_counter() - t) / 1e3:.0f} k values/s"
  except ImportError:
    pass
  lines = [
      f"- machine: {cpu_model()} ({os.cpu_count()} cores), {platform.machine()}, "
      f"python {platform.python_version()}, numpy {np.__version__}",
      f"- data: {args.cells} cells x {args.genes} genes, {nnz:,} non-zeros "
      f"({nnz / args.cells:.0f} per cell), chunks of {args.chunk} cells, "
      f"compression {args.compression:g} (generated in {gen_s:.1f} s)",
      f"- `update` over the pre-sliced CSR chunks + final `medians()` (all "
      f"compression included): {upd_s:.2f} s = **{rate / 1e6:.1f} M values/s** "
      f"(one process; the pure-Python `tdigest` package: {ref})",
      f"- accuracy vs numpy, {sel.size} genes with >= 100 non-zeros: max "
      f"relative error **{err.max():.4%}**, median {np.median(err):.4%}, "
      f"{exact_share:.0%} exact; {small.size} genes with 1-99 non-zeros: max "
      f"{err_small.max():.2e}",
      "- real UMI data, same check: " + ("; ".join(real_data_errors())
                                            or "../shared/data not found"),
      f"- {d.num_centroids():,} centroids ({d.num_centroids() / len(est):.0f} "
      f"per gene); save {save_s:.1f} s, {size_mb:.0f} MiB JSON; load "
      f"{load_s:.1f} s",
  ]
  print("\n".join(lines))
  if args.write:
    results.write_section(HEADING, HEADING + "\n\n`python bench/bench_medians.py --write`\n\n"
                  + "\n".join(lines) + "\n\n")


if __name__ == "__main__":
  main()
