"""Reference mapping on Kang: control cells label the interferon-stimulated ones, GeneMamba vs PCA.

Reference: Kang's control PBMCs (obs.condition == "ctrl"), labels obs.cell_type;
query: the stimulated PBMCs ("stim") of the same two patients, whose true cell
types are only used to score. IFN-beta moves every stimulated cell's expression
(hundreds of interferon genes up), so the query is a shifted domain, as
reference mapping meets it in practice.

  GeneMamba  `genemamba_jax.label_transfer` with a small GeneMamba pretrained on
             Kang (tests/kang.py: d 64, 2 Mamba-2 layers, <cls> + 127 genes,
             leak-free objective; pretrained once into --work and reused): the
             run's default pooling (<cls>), and the mean pooling beside it
  PCA        the same kNN (`transfer_labels`, cosine, same k) on the PCA of
             log-normalized counts: scanpy normalize_total 1e4 + log1p, PCA 50 fit
             on the reference, the query projected into it (its centring and axes)

Scores against the query's true cell types: accuracy and macro-F1 of all
predictions, then the share labelled "unknown" at confidence < --threshold and
the accuracy of the cells that keep a label. `--write` puts the section in
bench/RESULTS.md.

    python bench/bench_label_transfer.py [--steps 1500] [--k 15] [--threshold 0.6] [--write]
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

HEADING = "## Label transfer (Kang: control -> stimulated)"
SHARED = ROOT.parent / "shared" / "data"
KANG = SHARED / "kang_pbmc_ifnb.h5ad"
PCA = "PCA 50 of log-normalized counts"


def split_kang():
  """(reference: control cells, query: stimulated cells) as AnnData, file order."""
  import anndata  # pylint: disable=g-import-not-at-top
  adata = anndata.read_h5ad(KANG)
  condition = adata.obs["condition"].astype(str)
  return adata[condition == "ctrl"].copy(), adata[condition == "stim"].copy()


def pca_embeddings(reference, query, n_comps: int = 50) -> tuple[np.ndarray, np.ndarray]:
  """[n_ref, 50], [n_q, 50]: PCA of log-normalized counts fit on the reference, query projected."""
  import scanpy as sc  # pylint: disable=g-import-not-at-top
  reference, query = reference.copy(), query.copy()
  for adata in (reference, query):
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
  sc.pp.pca(reference, n_comps=n_comps, random_state=0)
  dense = lambda x: x.toarray() if hasattr(x, "toarray") else np.asarray(x)
  mean = dense(reference.X).mean(axis=0)
  components = reference.varm["PCs"]  # [genes, 50]
  projected_reference = (dense(reference.X) - mean) @ components
  # The projection reproduces scanpy's own coordinates of the reference (a check of the centring).
  assert np.allclose(projected_reference, reference.obsm["X_pca"], atol=1e-3)
  return reference.obsm["X_pca"], (dense(query.X) - mean) @ components


def scores(truth: np.ndarray, result: pd.DataFrame, threshold: float) -> dict:
  """accuracy, macro-F1 (all predictions), unknown share and accuracy of the rest at `threshold`,
  and per-type recall."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  predicted = result["prediction"].astype(str).to_numpy()
  kept = result["confidence"].to_numpy() >= threshold
  out = {"accuracy": metrics.accuracy_score(truth, predicted),
         "macro_f1": metrics.f1_score(truth, predicted, average="macro"),
         "unknown": 1.0 - kept.mean(),
         "accuracy_kept": metrics.accuracy_score(truth[kept], predicted[kept])}
  for label in sorted(set(truth)):
    out[label] = float(np.mean(predicted[truth == label] == label))
  return out


def compare(model, reference, query, k: int, threshold: float) -> tuple[dict, dict]:
  """({method: scores}, {method: seconds}) of GeneMamba (both poolings) and PCA on one split."""
  from genemamba_jax import embed, label_transfer  # pylint: disable=g-import-not-at-top
  from genemamba_jax.data.readers import AnnDataSource  # pylint: disable=g-import-not-at-top
  labels = reference.obs["cell_type"].astype(str).to_numpy()
  truth = query.obs["cell_type"].astype(str).to_numpy()
  rows, seconds = {}, {}
  t0 = time.perf_counter()
  ours = label_transfer.label_transfer(model, reference, "cell_type", query, k=k, progress=False)
  seconds["genemamba"] = time.perf_counter() - t0
  assert list(ours.index) == list(query.obs_names)
  pooling = embed.default_pooling(model)
  rows[f"GeneMamba, {pooling} pooling"] = scores(truth, ours, threshold)
  other = "mean" if pooling == "cls" else "cls"
  if other == "mean" or model.tokenize.get("cls"):
    cells = [embed.embed_source(model, AnnDataSource(x), poolings=(other,), progress=False)
             .cells[other] for x in (reference, query)]
    rows[f"GeneMamba, {other} pooling"] = scores(
        truth, label_transfer.transfer_labels(cells[0], labels, cells[1], k), threshold)
  t0 = time.perf_counter()
  pca_reference, pca_query = pca_embeddings(reference, query)
  pca = label_transfer.transfer_labels(pca_reference, labels, pca_query, k)
  seconds["pca"] = time.perf_counter() - t0
  rows[PCA] = scores(truth, pca, threshold)
  return rows, seconds


def run(args) -> dict:
  from tests.kang import pretrain_kang  # pylint: disable=g-import-not-at-top
  from genemamba_jax import rundir  # pylint: disable=g-import-not-at-top
  reused = (Path(args.work) / "run" / "checkpoints").is_dir()
  t0 = time.perf_counter()
  run_dir = pretrain_kang(SHARED, Path(args.work), args.steps)
  pretrain_s = None if reused else time.perf_counter() - t0
  model = rundir.load_pretrained(run_dir)
  reference, query = split_kang()
  rows, seconds = compare(model, reference, query, args.k, args.threshold)
  # The same methods without the stimulation: one patient's control cells label the other's.
  patient = reference.obs["patient"].astype(str).to_numpy()
  first, second = sorted(set(patient))[:2]
  within, _ = compare(model, reference[patient == first].copy(),
                      reference[patient == second].copy(), args.k, args.threshold)
  truth = query.obs["cell_type"].astype(str).to_numpy()
  return {"rows": rows, "seconds": seconds, "pretrain_s": pretrain_s,
          "n_ref": reference.n_obs, "n_query": query.n_obs, "run": run_dir,
          "types": sorted(set(truth)), "counts": pd.Series(truth).value_counts().to_dict(),
          "model": model, "within": within, "patients": (first, second),
          "within_cells": (int(np.sum(patient == first)), int(np.sum(patient == second)))}


def table(rows: dict, threshold: float, types=(), counts=None) -> list[str]:
  """Markdown: a row per method; per-type recall columns for `types`."""
  head = (["method", "accuracy", "macro-F1", f"unknown (conf < {threshold:g})",
           "accuracy of the rest"] + [f"{t} ({counts[t]})" for t in types])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, row in rows.items():
    values = [row["accuracy"], row["macro_f1"], row["unknown"], row["accuracy_kept"],
              *(row[t] for t in types)]
    lines.append("| " + " | ".join([name, *(f"{v:.3f}" for v in values)]) + " |")
  return lines


def pooling_note(result: dict) -> str:
  """The name of the row the command's default gives."""
  return next(name for name in result["rows"] if "GeneMamba" in name)


def conclusion(result: dict, threshold: float) -> str:
  """What the tables say, in words, from their numbers (GeneMamba = the command's default row)."""
  name = pooling_note(result)
  ours, pca = result["rows"][name], result["rows"][PCA]
  within = (result["within"][name]["accuracy"], result["within"][PCA]["accuracy"])
  better = "the PCA of the counts" if pca["accuracy"] > ours["accuracy"] else "GeneMamba"
  pooling = name.split(", ")[1]
  return (f"Control -> stimulated, {better} transfers labels better: GeneMamba ({pooling}) "
          f"accuracy {ours['accuracy']:.3f}, macro-F1 {ours['macro_f1']:.3f}; PCA "
          f"{pca['accuracy']:.3f}, {pca['macro_f1']:.3f}. Without the stimulation: "
          f"{within[0]:.3f} vs {within[1]:.3f}. GeneMamba's confidence sorts its errors: at "
          f"confidence < {threshold:g}, {ours['unknown']:.1%} of the query becomes unknown and "
          f"the rest is {ours['accuracy_kept']:.3f} correct (PCA: {pca['unknown']:.1%} unknown, "
          f"{pca['accuracy_kept']:.3f}). The model reads each cell as its 127 top-ranked genes, "
          "the PCA all 1,267 genes, and it is tiny (trained for minutes on these 1,556 cells): "
          "the table shows what the analysis measures, not GeneMamba at the paper's scale.")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500, help="pretraining steps (tests/kang.py)")
  parser.add_argument("--k", type=int, default=15, help="neighbours that vote")
  parser.add_argument("--threshold", type=float, default=0.6,
                      help="the unknown threshold the table reports")
  parser.add_argument("--work", default=None,
                      help="where the pretrained run is kept (default bench/_work/kang_next_gene_"
                           "<steps>, shared with bench_perturb.py)")
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
      f"`python bench/bench_label_transfer.py --write` ({stamp} UTC): "
      + " ".join(__doc__.split("\n\n")[1].split()), "",
      "- GeneMamba: `genemamba_jax.label_transfer` (the run's default pooling, <cls>) and the same "
      "kNN on the mean-pooled embedding",
      "- PCA: the same kNN (`transfer_labels`, cosine, same k) on the PCA of log-normalized "
      "counts: scanpy normalize_total 1e4 + log1p, PCA 50 fit on the reference, the query "
      "projected into it (its centring and axes)",
      "- " + " ".join(__doc__.split("\n\n")[3].split()).replace(
          " `--write` puts the section in bench/RESULTS.md.", ""),
      f"- reference {result['n_ref']:,} control cells, query {result['n_query']:,} stimulated "
      f"cells, {len(result['types'])} cell types; k {args.k}, cosine distance, unweighted votes",
      f"- GeneMamba: d_model {config.d_model}, {config.n_layers} {config.mixer} layers, pretrained "
      f"{args.steps} steps of 16 cells x 128 tokens on all 1,556 Kang cells, the query's "
      "included, without their labels ("
      + ("reused from --work" if result["pretrain_s"] is None else f"{result['pretrain_s']:.0f} s")
      + f"); embedding and transfer "
      f"{result['seconds']['genemamba']:.1f} s, PCA and transfer {result['seconds']['pca']:.1f} s",
      f"- machine: {results.machine()}", "",
      f"The row \"{pooling_note(result)}\" is what the command gives. Columns after the first "
      "five: recall per true cell type (its cells in the query).", "",
      *table(result["rows"], args.threshold, result["types"], result["counts"]), "",
      f"Without the stimulation, for comparison: control cells of patient "
      f"{result['patients'][0]} ({result['within_cells'][0]}) label those of patient "
      f"{result['patients'][1]} ({result['within_cells'][1]}), same methods:", "",
      *table(result["within"], args.threshold), "",
      conclusion(result, args.threshold),
  ])
  print(text)
  if args.write:
    results.write_section(HEADING, text)


if __name__ == "__main__":
  main()
