"""Embedding speed on the same weights: ours vs the original PyTorch GeneMamba, in one run.

A random original `MambaModel` (tests/convert/torch_genemamba.py, the parity tests'
oracle: transformers' Mamba2Mixer as each layer, the original's bidirectional
loop) at the paper's width and length is saved in the original's format and
converted with `genemamba_jax.convert`. Both sides embed the same real cells
(the longest cells of 10x PBMC 10k, tokenized by our pipeline with the
converted run's vocabulary and medians, 2,048 tokens, padded and masked where
shorter): ours is `embed`'s jitted forward (`time_embed` of bench/train_step.py),
theirs the original's embeddings -> layers -> norm_f in PyTorch eager under
no_grad, at SSD chunk 64 and 256 (the faster counts). The original's forward
also computes the [B, L, V] logits, which embedding does not need: they are
left out of its time. Each side runs in its own process, so its peak memory
is its own; the cell embedding is the masked mean of the final states.

    python bench/bench_vs_pytorch.py [--layers 4] [--batch 4] [--steps 3] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

HEADING = "## Embedding vs the original PyTorch GeneMamba (CPU, same weights)"
SHARED = ROOT.parent / "shared" / "data"
CELLS = SHARED / "pbmc_10k_protein_v3.h5ad"
GENEFORMER = SHARED / "geneformer_30m"
TARGET = 2.0  # the goal: at least 2x the original's inference throughput on CPU


def _memory_mib(field: str) -> float:
  """VmHWM (peak) or VmRSS (now) of this process. Not getrusage's ru_maxrss: Linux carries
  that over from the parent into a fresh child, which would hide each side's own peak."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) / 1024
  return float("nan")


def prepare(work: Path, d_model: int, layers: int, seq_len: int, batch: int) -> dict:
  """Original checkpoint -> converted run -> the batch of cells; returns paths and timings."""
  # pylint: disable-next=g-import-not-at-top
  from tests.convert import torch_genemamba, torch_genemamba_files
  from genemamba_jax import convert, inference  # pylint: disable=g-import-not-at-top
  from genemamba_jax import rundir  # pylint: disable=g-import-not-at-top
  from genemamba_jax.data import genes  # pylint: disable=g-import-not-at-top
  from genemamba_jax.data.readers import open_source  # pylint: disable=g-import-not-at-top
  tokens = torch_genemamba_files.geneformer_tokens(SHARED)
  model = torch_genemamba.randomize_(
      torch_genemamba.OriginalMambaModel(len(tokens), d_model, layers), seed=0)
  torch_genemamba_files.save_original_checkpoint(model, work / "original", tokens)
  t0 = time.perf_counter()
  converted = convert.load_pytorch(work / "original",
                                   median_dictionary=str(GENEFORMER / "gene_median_dictionary.pkl"))
  convert.write_run(converted, work / "run")
  convert_s = time.perf_counter() - t0
  loaded = rundir.load_pretrained(work / "run")
  gene_map = genes.load_gene_map(str(GENEFORMER / "gene_name_id_dict.pkl"))
  sentences, names, _ = inference.tokenize_all(loaded.tokenizer(max_len=seq_len, gene_map=gene_map),
                                               open_source(str(CELLS), None, None), desc=None)
  longest = np.argsort([-len(s) for s in sentences], kind="stable")[:batch]
  ids = np.zeros((batch, seq_len), np.int32)
  mask = np.zeros((batch, seq_len), bool)
  for row, i in enumerate(longest):
    ids[row, :len(sentences[i])] = sentences[i]
    mask[row, :len(sentences[i])] = True
  np.savez(work / "cells.npz", tokens=ids, mask=mask)
  return {"convert_s": convert_s, "lengths": mask.sum(1).tolist(),
          "cells": [str(names[i]) for i in longest]}


def run_ours(work: Path, steps: int) -> dict:
  import train_step  # pylint: disable=g-import-not-at-top  (bench/train_step.py)
  from genemamba_jax import rundir  # pylint: disable=g-import-not-at-top
  cells = np.load(work / "cells.npz")
  model = rundir.load_pretrained(work / "run").model
  before = _memory_mib("VmRSS")
  result = train_step.time_embed(model, cells["tokens"], cells["mask"], steps=steps, warmup=1)
  np.save(work / "ours.npy", result.pop("embedding"))
  return dict(result, rss_mib=_memory_mib("VmHWM"), rss_before_mib=before)


def run_torch(work: Path, steps: int, chunk: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from tests.convert import torch_genemamba_files  # pylint: disable=g-import-not-at-top
  cells = np.load(work / "cells.npz")
  model = torch_genemamba_files.load_original_checkpoint(work / "original", chunk_size=chunk)
  ids = torch.as_tensor(cells["tokens"], dtype=torch.long)
  padding = torch.as_tensor(~cells["mask"])
  valid = torch.as_tensor(cells["mask"], dtype=torch.float32)[..., None]

  def embed():
    with torch.no_grad():  # the original's forward without its lm_head
      hidden = model.norm_f(model.mamba_mixer(model.embeddings(ids), padding))
      return (hidden * valid).sum(1) / valid.sum(1)

  before = _memory_mib("VmRSS")
  embed()  # warm-up
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    out = embed()
    times.append(time.perf_counter() - t0)
  np.save(work / f"torch_{chunk}.npy", out.numpy())
  return {"cells_per_s": len(ids) * steps / sum(times), "batch_ms_median": 1e3 * np.median(times),
          "rss_mib": _memory_mib("VmHWM"), "rss_before_mib": before, "threads": torch.get_num_threads()}


def child(work: Path, side: str, steps: int) -> dict:
  """Runs one side in a fresh process (its own peak memory); returns its JSON result."""
  cmd = [sys.executable, __file__, "--child", side, "--work", str(work), "--steps", str(steps)]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--steps", type=int, default=3, help="timed batches per side")
  parser.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    work = Path(args.work)
    side = run_ours(work, args.steps) if args.child == "ours" else run_torch(
        work, args.steps, int(args.child.split("_")[1]))
    print(json.dumps(side))
    return
  if not SHARED.is_dir():
    sys.exit(f"error: {SHARED}: the shared data folder (Geneformer's dictionaries, PBMC cells) "
             "is needed")
  import results  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    work = Path(tmp)
    info = prepare(work, args.d_model, args.layers, args.seq_len, args.batch)
    sides = {name: child(work, name, args.steps) for name in ("ours", "torch_64", "torch_256")}
    ours = np.load(work / "ours.npy")
    diffs = {name: float(np.max(np.abs(ours - np.load(work / f"{name}.npy"))))
             for name in ("torch_64", "torch_256")}
    scale = float(np.max(np.abs(ours)))
  best = max(("torch_64", "torch_256"), key=lambda n: sides[n]["cells_per_s"])
  ratio = sides["ours"]["cells_per_s"] / sides[best]["cells_per_s"]
  rows = [("ours (`embed`'s jitted forward, chunk 64)", sides["ours"], None),
          ("original, transformers Mamba2Mixer torch path, chunk 64", sides["torch_64"],
           diffs["torch_64"]),
          ("original, chunk 256", sides["torch_256"], diffs["torch_256"])]
  table = ["| | cells/s | batch ms (median) | peak RSS MiB (RSS before the forward) | max abs "
           "embedding diff vs ours |", "|---|---|---|---|---|"]
  for label, side, diff in rows:
    table.append(f"| {label} | {side['cells_per_s']:.3f} | {side['batch_ms_median']:,.0f} | "
                 f"{side['rss_mib']:,.0f} ({side['rss_before_mib']:,.0f}) | "
                 + ("-" if diff is None else f"{diff:.1e}") + " |")
  stamp = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"
  text = "\n".join([
      HEADING, "",
      f"`python bench/bench_vs_pytorch.py --write` ({stamp} UTC): "
      + " ".join(__doc__.split("\n\n")[1].split()), "",
      f"- shapes: d_model {args.d_model}, {args.layers} layers (the paper's model has 24; the "
      f"per-layer cost is the same), vocabulary 25,426, L {args.seq_len}, batch {args.batch} "
      f"cells of {min(info['lengths'])}-{max(info['lengths'])} tokens, mean combination, "
      f"float32; {args.steps} timed batches after a warm-up",
      f"- machine: {results.machine()}; torch threads {sides['torch_64']['threads']}",
      f"- conversion (read safetensors, write the run directory): {info['convert_s']:.1f} s", "",
      *table, "",
      f"**ours / original (faster chunk) = {ratio:.2f}x** (goal >= {TARGET:.0f}x: "
      f"{'met' if ratio >= TARGET else 'not met'}); embeddings agree to "
      f"{max(diffs.values()):.1e} (largest |value| {scale:.2f}).",
  ])
  print(text)
  if args.write:
    results.write_section(HEADING, text)


if __name__ == "__main__":
  main()
