"""End-to-end tokenization throughput and peak memory: .h5ad -> ArrayRecord shards.

Real 10x PBMC cells (`pbmc_10k_protein_v3.h5ad`, ~1,590 expressed genes per
cell, symbols mapped to Ensembl ids with Geneformer's table) are tiled to 10k
and 100k cells, written as ordinary uncompressed CSR .h5ad files, and tokenized
with Geneformer's vocabulary and medians by `python -m genemamba_jax.prepare
tokenize` in a fresh process each. Peak RSS must not grow with the file size.

    python bench/bench_tokenize.py [--cells 10000 100000] [--workers 1]
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WORK = ROOT / "bench" / "_work"


def make_file(n_cells: int) -> Path:
  import anndata
  import scipy.sparse as sp
  path = WORK / f"pbmc10k_tiled_{n_cells}.h5ad"
  if not path.exists():
    src = anndata.read_h5ad(DATA / "pbmc_10k_protein_v3.h5ad")
    X = sp.csr_matrix(src.X)
    reps = -(-n_cells // X.shape[0])
    tiled = sp.vstack([X] * reps, format="csr")[:n_cells]
    adata = anndata.AnnData(tiled, var=src.var[[]])
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.obs["sample"] = np.where(np.arange(n_cells) % 2, "a", "b")
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
  return path


def child(argv):
  """Runs the CLI in this process and prints seconds and peak RSS."""
  from genemamba_jax import prepare
  t0 = time.perf_counter()
  status = prepare.main(argv)
  seconds = time.perf_counter() - t0
  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
  with open("/proc/self/status") as f:
    rss = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
  print(f"RESULT status={status} seconds={seconds:.3f} peak_rss_mb={rss:.0f}")


def kernel_vs_numpy(path: Path, vocab: Path, gene_map: Path) -> tuple[float, float]:
  """cells/s of the compiled kernel and of the numpy reference path, same chunks, in memory."""
  import collections
  from genemamba_jax.data import genes, qc, readers
  from genemamba_jax.data.tokenizer import CellTokenizer, TokenizeConfig
  tok = CellTokenizer.from_vocab_dir(vocab, TokenizeConfig(), genes.load_gene_map(gene_map))
  source = readers.open_source(path)
  mapper = tok.mapper(source)
  chunks = list(source.chunks(1024))
  n = sum(c.counts.shape[0] for c in chunks)
  tok.tokenize_chunk(chunks[0], source, mapper, collections.Counter())  # compile / load
  rates = []
  for fn in (lambda c: tok.tokenize_chunk(c, source, mapper, collections.Counter()),
             lambda c: tok.tokenize_normalized(qc.normalize_chunk(
                 c, source, mapper, tok.config.qc, collections.Counter()))):
    t0 = time.perf_counter()
    for c in chunks:
      fn(c)
    rates.append(n / (time.perf_counter() - t0))
  return tuple(rates)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--child", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  if args.child:
    return child(args.child)
  WORK.mkdir(parents=True, exist_ok=True)
  gf = DATA / "geneformer_30m"
  vocab = WORK / "geneformer_vocab"
  if not vocab.exists():
    from genemamba_jax import prepare
    prepare.main(["import-geneformer", "--token-dictionary", str(gf / "token_dictionary.pkl"),
                  "--median-dictionary", str(gf / "gene_median_dictionary.pkl"), "--out", str(vocab)])
  rows = []
  for n in args.cells:
    path = make_file(n)
    out = WORK / f"tokens_{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", "tokenize", "--input", str(path), "--vocab",
           str(vocab), "--out", str(out), "--gene-map", str(gf / "gene_name_id_dict.pkl"),
           "--batch-column", "sample", "--workers", str(args.workers)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT")][-1]
    fields = dict(kv.split("=") for kv in line.split()[1:])
    seconds = float(fields["seconds"])
    rows.append((n, seconds, n / seconds, float(fields["peak_rss_mb"]), path.stat().st_size / 2**20))
    print(f"{n:>8,} cells: {seconds:6.2f} s  {n / seconds:>8,.0f} cells/s  "
          f"peak RSS {fields['peak_rss_mb']} MB  (file {rows[-1][4]:.0f} MB)", flush=True)
  # prepare medians on the largest file: every non-zero is digested (symbols, no gene table).
  import h5py
  path, out = make_file(max(args.cells)), WORK / "medians_vocab"
  shutil.rmtree(out, ignore_errors=True)
  res = subprocess.run([sys.executable, __file__, "--child", "medians", "--input", str(path),
                        "--out", str(out), "--min-genes", "0"], capture_output=True, text=True,
                       check=True)
  line = [l for l in res.stdout.splitlines() if l.startswith("RESULT")][-1]
  fields = dict(kv.split("=") for kv in line.split()[1:])
  with h5py.File(path) as f:
    values = int(f["X/indptr"][-1])
  print(f"prepare medians, {max(args.cells):,} cells, {values / 1e6:.0f}M non-zeros: "
        f"{fields['seconds']} s = {values / float(fields['seconds']) / 1e6:.1f}M values/s end to end, "
        f"peak RSS {fields['peak_rss_mb']} MB")
  kernel, reference = kernel_vs_numpy(make_file(min(args.cells)), vocab, gf / "gene_name_id_dict.pkl")
  print(f"QC + ranking only, chunks of 1024 in memory: kernel {kernel:,.0f} cells/s, numpy "
        f"reference {reference:,.0f} cells/s ({kernel / reference:.1f}x)")
  if len(rows) >= 2:  # fixed start-up costs (imports, vocabulary, kernel cache) cancel out
    (n0, t0, *_), (n1, t1, *_) = rows[0], rows[-1]
    print(f"marginal throughput {n0:,} -> {n1:,} cells: {(n1 - n0) / (t1 - t0):,.0f} cells/s")
  cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
             platform.processor())
  print(f"machine: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"numpy {np.__version__}; workers={args.workers}")
  return rows


if __name__ == "__main__":
  main()
