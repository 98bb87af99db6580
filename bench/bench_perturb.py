"""In silico perturbation on Kang's CD14+ monocytes: do interferon genes move control cells toward
the stimulated ones?

The small GeneMamba pretrained on Kang (tests/kang.py; the same run as
bench_label_transfer.py, kept in --work) and `genemamba_jax.perturb` on Kang's
CD14+ monocytes, control and IFN-beta stimulated (the monocytes respond the most):

  A  control monocytes, target = the stimulated monocytes' mean embedding:
     overexpress the interferon-stimulated genes ISG15 and IFI6, beside the
     housekeeping gene ACTB and a random gene (overexpressed and deleted) as controls
  B  stimulated monocytes, target = the control monocytes' mean embedding:
     delete ISG15 and IFI6, beside ACTB and the random gene

The random gene is drawn (seed 0) from the vocabulary genes in the sentences of at
least half the control monocytes, so that deleting it changes most cells too.
Per row, over the group's cells: the share whose sentence holds the gene and its
median position there (1 = the first gene; the <cls> embedding leans on the first
genes), the share whose sentence the perturbation changed, the mean shift
(1 - cosine of the cell embedding before and after), the mean toward_target
(cos(after, T) - cos(before, T); 0 for an unchanged cell) and the share of the
changed cells that move toward the target.

    python bench/bench_perturb.py [--steps 1500] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

HEADING = "## In silico perturbation (Kang)"
SHARED = ROOT.parent / "shared" / "data"
KANG = SHARED / "kang_pbmc_ifnb.h5ad"
INTERFERON = ("ISG15", "IFI6")
HOUSEKEEPING = "ACTB"


def monocytes():
  """Kang's CD14+ monocytes, control and stimulated (AnnData, file order)."""
  import anndata  # pylint: disable=g-import-not-at-top
  adata = anndata.read_h5ad(KANG)
  return adata[adata.obs["cell_type"].astype(str) == "CD14+ Monocytes"].copy()


def random_gene(model, cells, exclude, seed: int = 0) -> tuple[str, float]:
  """A vocabulary gene in the sentences of >= half of `cells`, drawn with `seed`; and that share."""
  from genemamba_jax import inference  # pylint: disable=g-import-not-at-top
  from genemamba_jax.data.readers import AnnDataSource  # pylint: disable=g-import-not-at-top
  sentences, _, _ = inference.tokenize_all(model.tokenizer(), AnnDataSource(cells), desc=None)
  share = np.zeros(model.config.vocab_size)
  for sentence in sentences:
    share[np.unique(sentence)] += 1 / len(sentences)
  candidates = sorted(g for g in model.vocab.gene_ids
                      if share[model.vocab.token_to_id[g]] >= 0.5 and g not in exclude)
  gene = candidates[np.random.default_rng(seed).integers(len(candidates))]
  return gene, float(share[model.vocab.token_to_id[gene]])


def positions(model, cells, genes) -> dict[str, tuple[float, float]]:
  """{gene: (share of `cells` whose sentence holds it, its median position there, 1 = the first
  gene)}: the cell embedding (<cls>) leans on the first genes, which explains much of a shift."""
  from genemamba_jax import embed, inference  # pylint: disable=g-import-not-at-top
  from genemamba_jax.data.readers import AnnDataSource  # pylint: disable=g-import-not-at-top
  cls = embed.default_pooling(model) == "cls"
  sentences, _, _ = inference.tokenize_all(model.tokenizer(cls=cls or None), AnnDataSource(cells),
                                           desc=None)
  out = {}
  for gene in genes:
    token = model.vocab.token_to_id[gene]
    found = [int(np.flatnonzero(s == token)[0]) + (0 if cls else 1) for s in sentences
             if token in s]
    out[gene] = (len(found) / len(sentences), float(np.median(found)) if found else float("nan"))
  return out


def summarize(frame: pd.DataFrame, cells: np.ndarray, part: str, role: dict,
              where: dict) -> list[dict]:
  """One row per gene of `frame` over the obs names `cells`; `where`: `positions` of those cells."""
  frame = frame[frame["obs_name"].isin(set(cells))]
  out = []
  for gene, rows in frame.groupby("gene", sort=False):
    toward = rows["toward_target"].to_numpy()
    changed = rows["shift"].to_numpy() != 0  # exactly 0: the sentence stayed as it was
    out.append({"part": part, "gene": gene, "role": role[gene], "mode": rows["mode"].iloc[0],
                "present": where[gene][0], "position": where[gene][1],
                "cells": len(rows), "changed": float(np.mean(changed)),
                "shift": float(rows["shift"].mean()), "toward": float(toward.mean()),
                "toward_positive": float(np.mean(toward[changed] > 0)) if changed.any()
                                   else float("nan")})
  return out


def run(args) -> dict:
  from tests.kang import pretrain_kang  # pylint: disable=g-import-not-at-top
  from genemamba_jax import perturb, rundir  # pylint: disable=g-import-not-at-top
  run_dir = pretrain_kang(SHARED, Path(args.work), args.steps)
  model = rundir.load_pretrained(run_dir)
  cells = monocytes()
  condition = cells.obs["condition"].astype(str).to_numpy()
  ctrl, stim = cells.obs_names[condition == "ctrl"], cells.obs_names[condition == "stim"]
  gene, share = random_gene(model, cells[condition == "ctrl"],
                            {*INTERFERON, HOUSEKEEPING})
  role = {**{g: "interferon" for g in INTERFERON}, HOUSEKEEPING: "housekeeping",
          gene: "random"}
  genes = [*INTERFERON, HOUSEKEEPING, gene]
  where = {"ctrl": positions(model, cells[condition == "ctrl"], genes),
           "stim": positions(model, cells[condition == "stim"], genes)}
  t0 = time.perf_counter()
  rows = []
  for mode, genes, target, group, part in (
      ("overexpress", [*INTERFERON, HOUSEKEEPING, gene], "stim", ctrl, "A: ctrl -> stim"),
      ("delete", [HOUSEKEEPING, gene], "stim", ctrl, "A: ctrl -> stim"),
      ("delete", [*INTERFERON, HOUSEKEEPING, gene], "ctrl", stim, "B: stim -> ctrl")):
    frame = perturb.perturb(model, cells, genes, mode, "condition", target, progress=False)
    own = "ctrl" if target == "stim" else "stim"
    rows.extend(summarize(frame, np.asarray(group), part, role, where[own]))
  seconds = time.perf_counter() - t0
  return {"rows": rows, "seconds": seconds, "random": gene, "random_share": share,
          "n_ctrl": len(ctrl), "n_stim": len(stim), "model": model}


def table(rows: list[dict]) -> list[str]:
  head = ["cells (target)", "gene", "in sentences (median position)", "mode", "cells changed",
          "mean shift", "mean toward_target", "changed cells moving toward"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    where = (f"{row['present']:.0%}" + ("" if np.isnan(row["position"])
                                         else f" ({row['position']:g})"))
    lines.append(f"| {row['part']} | {row['gene']} ({row['role']}) | {where} | {row['mode']} | "
                 f"{row['changed']:.0%} | {row['shift']:.3g} | {row['toward']:+.3g} | "
                 f"{row['toward_positive']:.0%} |")
  return lines


def reading(rows: list[dict], random: str) -> str:
  """What the table says, in words, from its numbers."""
  get = lambda part, gene, mode: next(r for r in rows if r["part"].startswith(part)
                                      and r["gene"] == gene and r["mode"] == mode)["toward"]
  up = " / ".join(f"{get('A', g, 'overexpress'):+.3g}" for g in INTERFERON)
  up_controls = ", ".join(f"{g} {get('A', g, 'overexpress'):+.3g}" for g in (HOUSEKEEPING, random))
  down = " / ".join(f"{get('B', g, 'delete'):+.3g}" for g in INTERFERON)
  down_controls = ", ".join(f"{g} {get('B', g, 'delete'):+.3g}" for g in (HOUSEKEEPING, random))
  return (f"Mean toward_target: overexpressing {' / '.join(INTERFERON)} in control monocytes "
          f"gives {up} toward the stimulated monocytes, the controls {up_controls}; deleting "
          f"them from stimulated monocytes gives {down} toward the control monocytes, the "
          f"controls {down_controls}. Deletions far down the sentence barely move the <cls> "
          "embedding (see the position column). A shift measures how the model's view of a cell "
          "moves, not what the cell would do; with a model this small (trained for minutes on "
          "1,556 cells, each read as its top 127 genes) the table shows what the analysis "
          "measures.")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500, help="pretraining steps (tests/kang.py)")
  parser.add_argument("--work", default=None,
                      help="where the pretrained run is kept (default bench/_work/kang_next_gene_"
                           "<steps>, shared with bench_label_transfer.py)")
  parser.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
  args = parser.parse_args()
  args.work = args.work or str(ROOT / "bench" / "_work" / f"kang_next_gene_{args.steps}")
  if not KANG.is_file():
    sys.exit(f"error: {KANG}: the Kang PBMCs (shared data folder) are needed")
  import results  # pylint: disable=g-import-not-at-top
  result = run(args)
  config = result["model"].config
  stamp = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"
  text = "\n".join([
      HEADING, "",
      f"`python bench/bench_perturb.py --write` ({stamp} UTC): "
      + " ".join(__doc__.split("\n\n")[1].split()), "",
      "- A: control monocytes, target = the stimulated monocytes' mean embedding: overexpress the "
      "interferon-stimulated genes ISG15 and IFI6, beside the housekeeping gene ACTB and a random "
      "gene (overexpressed and deleted) as controls",
      "- B: stimulated monocytes, target = the control monocytes' mean embedding: delete ISG15 and "
      "IFI6, beside ACTB and the random gene",
      "- " + " ".join(__doc__.split("\n\n")[3].split()),
      f"- cells: {result['n_ctrl']} control and {result['n_stim']} stimulated CD14+ monocytes; "
      f"random gene {result['random']} (in {result['random_share']:.0%} of the control "
      "monocytes' sentences)",
      f"- GeneMamba: d_model {config.d_model}, {config.n_layers} {config.mixer} layers, "
      f"pretrained {args.steps} steps on Kang (tests/kang.py), <cls> pooling, sentences of "
      f"<cls> + 127 genes; the perturbations took {result['seconds']:.0f} s",
      f"- machine: {results.machine()}", "",
      *table(result["rows"]), "",
      reading(result["rows"], result["random"]),
  ])
  print(text)
  if args.write:
    results.write_section(HEADING, text)


if __name__ == "__main__":
  main()
