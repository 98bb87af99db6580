"""Downstream results on real cells (Kang PBMCs): annotation, integration, reconstruction, gene pairs.

    python bench/bench_downstream.py [--steps 400] [--out bench/_work/downstream]

Pretrains two small GeneMambas on Kang (d 64, 2 Mamba-2 layers, top 128 genes):
one with the leak-free `next_gene` objective, one with the original's
`next_gene_faithful`. Then, in one run, with the baselines beside them:

  annotation      fine-tuned GeneMamba vs logistic regression on log-normalized counts
                  (same split)
  integration     GeneMamba embeddings (pretrained, and fine-tuned) vs PCA and Harmony
  reconstruction  both models under both protocols, vs the model-free dataset order
  gene pairs      input embeddings of both models vs random, on the Gene2Vec train pairs

Prints markdown tables; writes them to OUT/downstream.md for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import anndata
import jax
import numpy as np
import pandas as pd
import scanpy as sc
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genemamba_jax import embed, inference, rundir
from genemamba_jax.annotation import loop as annotation
from genemamba_jax.annotation.config import default_config
from genemamba_jax.data.readers import open_source
from genemamba_jax.evaluate import gene_pairs, integration, reconstruction
from tests.kang import pretrain_kang

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KANG = DATA / "kang_pbmc_ifnb.h5ad"


def _md(frame: pd.DataFrame, digits: int = 4) -> str:
  """A markdown table (pandas' to_markdown needs `tabulate`, which is not a dependency)."""
  def cell(v):
    if isinstance(v, float):
      if np.isnan(v):
        return "n/a"
      return f"{int(v)}" if v.is_integer() and abs(v) >= 10 else f"{v:.{digits}f}"
    return str(v)
  names = frame.index.names if any(frame.index.names) else [""]
  lines = ["| " + " | ".join([*map(str, names), *frame.columns]) + " |",
           "|" + "---|" * (len(names) + len(frame.columns))]
  for key, row in frame.iterrows():
    keys = key if isinstance(key, tuple) else (key,)
    lines.append("| " + " | ".join([*map(str, keys), *(cell(v) for v in row)]) + " |")
  return "\n".join(lines)


def _finetune(run: Path, out: Path, **changes) -> tuple[dict, float]:
  c = default_config()
  c.init_checkpoint, c.data.input, c.label_column = str(run), str(KANG), "cell_type"
  c.data.max_len, c.pooling, c.lr, c.batch_size, c.epochs = 256, "mean", 1e-3, 32, 4
  for key, value in changes.items():
    c[key] = value
  start = time.time()
  return annotation.finetune(c, out), time.time() - start


def annotation_table(run: Path, out: Path) -> tuple[pd.DataFrame, Path]:
  linear, linear_s = _finetune(run, out / "linear", head="linear")
  mlp, mlp_s = _finetune(run, out / "mlp", head="mlp", weight_decay=0.05)
  pred = pd.read_csv(out / "linear" / "predictions.csv")
  adata = anndata.read_h5ad(KANG)
  sc.pp.normalize_total(adata, target_sum=1e4)
  sc.pp.log1p(adata)
  x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
  y = adata.obs["cell_type"].astype(str).to_numpy()
  train, test = pred.split.to_numpy() == "train", pred.split.to_numpy() == "test"
  logreg = LogisticRegression(max_iter=3000).fit(x[train], y[train]).predict(x[test])
  rows = {
      "GeneMamba fine-tuned, linear head": {
          "accuracy": linear["test"]["accuracy"], "macro_f1": linear["test"]["macro_f1"],
          "val_accuracy": linear["val"]["accuracy"], "seconds": linear_s},
      "GeneMamba fine-tuned, original MLP head (+ weight decay 0.05)": {
          "accuracy": mlp["test"]["accuracy"], "macro_f1": mlp["test"]["macro_f1"],
          "val_accuracy": mlp["val"]["accuracy"], "seconds": mlp_s},
      "logistic regression, log-normalized counts": {
          "accuracy": skm.accuracy_score(y[test], logreg),
          "macro_f1": skm.f1_score(y[test], logreg, average="macro"),
          "val_accuracy": float("nan"), "seconds": float("nan")}}
  return pd.DataFrame(rows).T, out / "linear" / "predictions.h5ad"


def integration_table(run: Path, finetuned_h5ad: Path) -> pd.DataFrame:
  adata = anndata.read_h5ad(finetuned_h5ad)
  zero_shot = embed.embed_file(run, KANG, poolings=("mean",), max_len=256, progress=False)
  adata.obsm["X_pretrained"] = zero_shot.cells["mean"]
  table = integration.integration_table(adata, "X_genemamba", "patient", "cell_type")
  pre = integration.integration_metrics(adata.obsm["X_pretrained"], adata.obs["cell_type"],
                                        adata.obs["patient"])
  table = table.rename(index={"genemamba": "GeneMamba fine-tuned"})
  table.loc["GeneMamba pretrained (zero-shot)"] = pd.Series(pre)
  return table[["avg_bio", "avg_batch", "nmi", "ari", "asw_label", "asw_batch",
                "graph_connectivity", "ilisi", "clisi"]]


def reconstruction_table(runs: dict[str, Path], cells: int) -> pd.DataFrame:
  rows = []
  for name, run in runs.items():
    model = rundir.load_pretrained(run)
    sentences, _, _ = inference.tokenize_all(model.tokenizer(), open_source(KANG), desc=None)
    chosen = reconstruction.sample_cells(len(sentences), cells, 0)
    sentences = [sentences[i] for i in chosen]
    summary, _, _ = reconstruction.reconstruct(model.model, sentences,
                                               [model.vocab.cls_id, model.vocab.eos_id])
    for method, row in summary.iterrows():
      rows.append({"model": name if method != "dataset_order" else "none", "protocol": method,
                   **{k: row.get(k) for k in ("l_dist", "nl_dist", "bleu1", "bleu4", "spearman")}})
  frame = pd.DataFrame(rows).drop_duplicates(subset=["model", "protocol"])
  return frame.set_index(["model", "protocol"])


def gene_pair_table(runs: dict[str, Path]) -> pd.DataFrame:
  pairs = gene_pairs.load_pairs(DATA / "gene2vec_pairs", "train")
  rows = {}
  for name, run in runs.items():
    model = rundir.load_pretrained(run)
    vocab = model.vocab
    table = np.asarray(model.model.embeddings.embedding[...], np.float32)
    bench = gene_pairs.pair_benchmark(vocab.gene_ids, table[vocab.gene_token_ids(vocab.gene_ids)],
                                      pairs)
    rows[f"{name} input embeddings"] = bench.loc["embedding"]
    rows.setdefault("random embeddings (same shape)", bench.loc["random"])
  return pd.DataFrame(rows).T[["pairs_used", "auc", "mean_pos", "mean_neg", "euclidean", "kl",
                               "js"]]


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--cells", type=int, default=100)
  parser.add_argument("--out", default="bench/_work/downstream")
  a = parser.parse_args()
  out = Path(a.out)
  runs = {"leak-free (next_gene)": pretrain_kang(DATA, out / "leak_free", a.steps, "next_gene"),
          "faithful (next_gene_faithful)": pretrain_kang(DATA, out / "faithful", a.steps,
                                                         "next_gene_faithful")}
  sections = [(f"Machine: {platform.processor() or platform.machine()}, "
              f"{jax.devices()[0].platform}, JAX {jax.__version__}; pretraining {a.steps} steps "
              "of 16 cells x 128 tokens on Kang (1,556 PBMCs, 5 types, 2 patients).")]
  ann, finetuned = annotation_table(runs["leak-free (next_gene)"], out / "annotate")
  sections += ["### Annotation (Kang, held-out 10% stratified test split)", _md(ann)]
  sections += ["### Integration (Kang; batch = patient, label = cell_type)",
               _md(integration_table(runs["leak-free (next_gene)"], finetuned))]
  sections += [f"### Reconstruction ({a.cells} random Kang cells)",
               _md(reconstruction_table(runs, a.cells))]
  sections += ["### Gene pairs (Gene2Vec train split, pairs with both genes in Kang)",
               _md(gene_pair_table(runs))]
  text = "\n\n".join(sections) + "\n"
  (out / "downstream.md").write_text(text, encoding="utf-8")
  print(text)


if __name__ == "__main__":
  main()
