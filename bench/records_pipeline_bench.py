"""Throughput of the tokenized-record writer and the Grain input pipeline.

Usage: python bench/records_pipeline_bench.py [--cells N] [--workers 0 2]

Writes N synthetic cells (~1.4k uint16 gene tokens each, like a ranked cell
of a typical scRNA-seq dataset) with ShardWriter into bench/_work/, then reads
batches of B=32, L=2048 through `make_dataset` with each worker count.
"""

import argparse
import os
import shutil
import time

import numpy as np

from genemamba_jax.data import pipeline
from genemamba_jax.data import records


def write_dataset(out_dir, num_cells, num_shards, dtype="uint16"):
  rng = np.random.default_rng(0)
  cells = []
  for i in range(num_cells):
    n = int(rng.integers(1000, 1800))
    genes = rng.choice(25000, size=n, replace=False) + 4
    cells.append(np.concatenate([[2], genes, [3]]).astype(np.int32))
  per = -(-num_cells // num_shards)
  shards = []
  start = time.perf_counter()
  for s in range(num_shards):
    with records.ShardWriter(out_dir, s, dtype) as w:
      for i in range(s * per, min(num_cells, (s + 1) * per)):
        w.write(cells[i], {"obs_name": f"cell{i}", "source": 0, "label": "T"})
      w.finish({})
    shards.append({"file": f"shards/{s:05d}.array_record",
                   "num_cells": w.num_cells})
  elapsed = time.perf_counter() - start
  records.write_manifest(out_dir, {
      "format": "genemamba-tokens", "version": 1, "num_cells": num_cells,
      "token_dtype": dtype, "shards": shards, "sources": ["synthetic"],
      "labels": ["T"], "batches": [], "vocab": {}, "medians": {},
      "settings": {"max_len": 2048, "cls": True, "eos": True},
      "special_ids": {"pad": 0, "mask": 1, "cls": 2, "eos": 3},
      "summary": {}})
  return num_cells / elapsed


def read_rate(data_dir, workers, num_batches, batch_size=32, seq_len=2048):
  config = pipeline.PipelineConfig(batch_size=batch_size, seq_len=seq_len,
                                   worker_count=workers)
  it = iter(pipeline.make_dataset(data_dir, config))
  for _ in range(5):  # Warm-up: worker start-up and first prefetches.
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
    batch["tokens"].sum()  # Touch the data like a host->device copy would.
  rate = num_batches / (time.perf_counter() - start)
  it.close()
  return rate


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--cells", type=int, default=20000)
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  args = parser.parse_args()
  out_dir = os.path.join(os.path.dirname(__file__), "_work", "records_bench")
  shutil.rmtree(out_dir, ignore_errors=True)
  for dtype in ("uint16", "int32"):
    rate = write_dataset(out_dir + "_" + dtype, args.cells, args.shards, dtype)
    print(f"write {dtype}: {rate:,.0f} records/s")
  for workers in args.workers:
    rate = read_rate(out_dir + "_uint16", workers, args.batches)
    print(f"read B=32 L=2048 worker_count={workers}: {rate:.1f} batches/s "
          f"({rate * 32:,.0f} cells/s)")


if __name__ == "__main__":
  main()
