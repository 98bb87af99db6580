"""Full train step on CPU: ours vs PyTorch peers, side by side in one run.

Our step is `bench/train_step.py`'s `time_train_step` (the training loop's real
step: default leak-free next_gene objective, AdamW); the peers are
`bench/torch_peers.py` (transformers' Mamba2Mixer, mambapy's MambaBlock with
its parallel scan) in the same layout. Sizes: d_model 128, 4 BiMamba layers,
L 512, batch 8, vocab 2000, N 64 (Mamba-2) / 16 (Mamba-1), float32. Then our
tokens/s per scan backend (which decides the CPU default), and lower+compile
seconds at 12 / 24 / 48 layers.

    python bench/bench_train_step.py [--steps 10] [--peer-steps 3] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import textwrap
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import results
import torch_peers
import train_step

HEADING = "## Train step vs PyTorch peers (CPU)"
SIZES = {"d_model": 128, "layers": 4, "seq_len": 512, "batch": 8, "vocab": 2000}
D_STATE = {"mamba2": 64, "mamba1": 16}
TARGETS = {"mamba2": 2.0, "mamba1": 5.0}  # the speed-up targets over the peers
PEER = {"mamba2": "transformers Mamba2Mixer (torch path)", "mamba1": "mambapy MambaBlock"}
# (label, time_train_step overrides) for the per-backend table.
VARIANTS = [
    ("default: auto (CPU: numba for mamba1, chunked for mamba2), chunk 64", {}),
    ("chunked, chunk 64", {"backend": "chunked"}),
    ("chunked, chunk 32", {"backend": "chunked", "chunk_size": 32}),
    ("chunked, chunk 128", {"backend": "chunked", "chunk_size": 128}),
    ("sequential", {"backend": "sequential"}),
    ("associative", {"backend": "associative"}),
    ("auto, no remat (keep every activation)", {"remat": False}),
    ("auto, remat nothing_saveable", {"remat_policy": "nothing_saveable"}),
    ("auto, bfloat16 compute", {"dtype": "bfloat16"}),
]


def log(text: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {text}", flush=True)


def ours(mixer: str, steps: int, **overrides) -> dict:
  kwargs = dict(SIZES, mixer=mixer, d_state=D_STATE[mixer], steps=steps, **overrides)
  result = train_step.time_train_step(**kwargs)
  log(f"ours {mixer} {overrides or ''}: {result['tokens_per_s']:,.0f} tokens/s "
      f"(median step {result['step_ms_median']:.0f} ms, compile {result['compile_s']:.1f} s)")
  return result


def peer(mixer: str, steps: int, **kwargs) -> dict:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    result = torch_peers.time_torch_train_step(mixer, d_state=D_STATE[mixer], steps=steps,
                                               **SIZES, **kwargs)
  log(f"peer {mixer} {kwargs or ''}: {result['tokens_per_s']:,.0f} tokens/s "
      f"(median step {result['step_ms_median']:.0f} ms, {result['threads']} threads)")
  return result


def run(steps: int, peer_steps: int, backends: bool, compile_layers: list[int]) -> dict:
  out = {"head": {}, "backends": {}, "compile": {}, "load": [os.getloadavg()[0]]}
  for mixer in ("mamba2", "mamba1"):
    row = {"ours": ours(mixer, steps),
           # The peer's exact layout (streams mixed in every layer) on our side too.
           "ours_mixed": ours(mixer, steps, objective="next_gene_faithful")}
    if mixer == "mamba2":  # the peer at its own default SSD chunk and at ours; the faster counts
      row["peer_by_chunk"] = {c: peer(mixer, peer_steps, chunk_size=c) for c in (256, 64)}
      chunk = max(row["peer_by_chunk"], key=lambda c: row["peer_by_chunk"][c]["tokens_per_s"])
      row["peer"], row["peer_note"] = row["peer_by_chunk"][chunk], f"chunk_size {chunk}"
    else:
      row["peer"], row["peer_note"] = peer(mixer, peer_steps), "pscan=True"
    out["head"][mixer] = row
    out["load"].append(os.getloadavg()[0])
  if backends:
    for mixer in ("mamba2", "mamba1"):
      out["backends"][mixer] = {}
      for label, overrides in VARIANTS:
        result = (out["head"][mixer]["ours"] if not overrides
                  else ours(mixer, max(2, steps // 3), warmup=1, **overrides))
        out["backends"][mixer][label] = result
      out["load"].append(os.getloadavg()[0])
  for mixer in ("mamba2", "mamba1"):
    sizes = {k: v for k, v in SIZES.items() if k != "layers"}
    out["compile"][mixer] = train_step.compile_seconds(compile_layers, mixer=mixer,
                                                       d_state=D_STATE[mixer], **sizes)
    log(f"compile {mixer}: " + ", ".join(f"{n} layers {s:.1f} s"
                                          for n, s in out["compile"][mixer].items()))
  out["load"].append(os.getloadavg()[0])
  return out


def _tps(result: dict) -> str:
  return f"{result['tokens_per_s']:,.0f}"


def section(out: dict, seconds: float, steps: int, peer_steps: int) -> str:
  wrap = lambda text: textwrap.fill(text, 100, break_on_hyphens=False)
  lines = [HEADING, "", wrap(
      "`python bench/bench_train_step.py --write`: one full training step (forward, loss, "
      "backward, global-norm clipping, AdamW update) at d_model 128, 4 BiMamba layers, L 512, "
      "batch 8 (4,096 tokens a step), vocab 2,000, float32, random tokens without padding. "
      "Ours: `python bench/train_step.py train-step` (the training loop's `make_train_step`, "
      "default objective next_gene on the separate-streams model; default scan backend `auto`, "
      "which on CPU is the numba kernels for Mamba-1 and the chunked SSD for Mamba-2, chunk "
      "64, "
      "and the default remat policy, which keeps each mixer's in_proj and scan outputs and "
      "recomputes the rest), "
      f"compiled, 2 warm-up steps, {steps} timed. \"ours, mixed\" is the same "
      "step with next_gene_faithful, whose model mixes both directions in every layer exactly as the "
      "peers do; both run the mixer on 2B sequences per layer, so the work is the same up to "
      "the top of the model. Peers: `bench/torch_peers.py`, PyTorch eager, same layout "
      "(embedding, 4 layers of x + (mixer(x) + flip(mixer(flip(x)))) / 2, RMSNorm, Linear "
      f"head with bias), next-token cross-entropy, AdamW, 1 warm-up step, {peer_steps} timed. "
      "tokens/s = 4,096 x timed steps / their total time. Ratio = ours / peer."), "",
      f"- machine: {results.machine()}",
      f"- run: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
      f"{seconds:.0f} s in all; 1-minute load average during the run: "
      + ", ".join(f"{x:.2f}" for x in out["load"]), "",
      ("| mixer (N) | peer | ours tokens/s | ours, mixed | peer tokens/s | ratio | "
       "ratio (mixed) | target |"),
      "|---|---|---|---|---|---|---|---|"]
  for mixer, row in out["head"].items():
    peer_tps = row["peer"]["tokens_per_s"]
    ratio, mixed = (row[k]["tokens_per_s"] / peer_tps for k in ("ours", "ours_mixed"))
    met = "met" if ratio >= TARGETS[mixer] else "not met"
    lines.append(f"| {mixer} ({D_STATE[mixer]}) | {PEER[mixer]}, {row['peer_note']} | "
                 f"{_tps(row['ours'])} | {_tps(row['ours_mixed'])} | {_tps(row['peer'])} | "
                 f"{ratio:.2f}x | {mixed:.2f}x | >= {TARGETS[mixer]:.0f}x: {met} |")
  by_chunk = out["head"].get("mamba2", {}).get("peer_by_chunk")
  if by_chunk:
    lines += ["", wrap("Mamba-2 peer by SSD chunk size: " + "; ".join(
        f"chunk_size {c}: {_tps(r)} tokens/s" for c, r in by_chunk.items())
        + " (the faster one is used above).")]
  if out["backends"]:
    lines += ["", wrap(
        f"Ours per scan backend (same sizes; 1 warm-up, {max(2, steps // 3)} timed steps; the "
        "default row is the one above). This is the measurement behind the CPU default:"), "",
        "| variant | mamba2 tokens/s | mamba1 tokens/s |", "|---|---|---|"]
    for label, _ in VARIANTS:
      lines.append(f"| {label} | " + " | ".join(
          _tps(out["backends"][m][label]) for m in ("mamba2", "mamba1")) + " |")
    fastest = []
    for mixer, rows in out["backends"].items():
      plain = {k: v for k, v in rows.items() if "remat" not in k and "bfloat16" not in k}
      best = max(plain, key=lambda k: plain[k]["tokens_per_s"])
      fastest.append(f"{mixer}: {best}")
    lines += ["", wrap("Fastest float32 backend for the full train step on this CPU: "
                       + "; ".join(fastest) + ".")]
  if out["compile"]:
    depths = sorted({n for times in out["compile"].values() for n in times})
    lines += ["", wrap("Lower + compile seconds of the train step by depth (`python "
                       "bench/train_step.py compile-time --layers N ...`, other "
                       "sizes as above; by default layers run under `nnx.scan`):"), "",
              "| mixer | " + " | ".join(f"{n} layers" for n in depths) + " |",
              "|---|" + "---|" * len(depths)]
    for mixer, times in out["compile"].items():
      lines.append(f"| {mixer} | " + " | ".join(
          f"{times[n]:.1f}" if n in times else "" for n in depths) + " |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="our timed steps")
  parser.add_argument("--peer-steps", type=int, default=3, help="the peers' timed steps")
  parser.add_argument("--no-backends", action="store_true", help="skip the per-backend table")
  parser.add_argument("--compile-layers", type=int, nargs="*", default=[12, 24, 48])
  parser.add_argument("--write", action="store_true",
                      help=f"write the '{HEADING}' section of bench/RESULTS.md")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes, to check the script runs (cannot --write)")
  args = parser.parse_args()
  if args.smoke:
    if args.write:
      parser.error("--smoke figures are not results: drop --write")
    SIZES.update(d_model=32, layers=1, seq_len=64, batch=2, vocab=100)
  if args.steps < 1 or args.peer_steps < 1:
    parser.error("--steps and --peer-steps need >= 1")
  t0 = time.perf_counter()
  out = run(args.steps, args.peer_steps, not args.no_backends, args.compile_layers)
  text = section(out, time.perf_counter() - t0, args.steps, args.peer_steps)
  print()
  print(text)
  if args.write:
    results.write_section(HEADING, text)


if __name__ == "__main__":
  main()
