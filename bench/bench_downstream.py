"""Downstream results on real cells (Kang PBMCs): annotation, integration, reconstruction, gene pairs.

    python bench/bench_downstream.py [--steps 400] [--out bench/_work/downstream]
    python bench/bench_downstream.py --only annotation [--data D] [--seeds 0 1 2] [--set KEY=VALUE ...]

`--only annotation`: fine-tunes the demo backbone (`python -m genemamba_jax.train
--config configs/demo.py`, pretrained here once) with the DEFAULT finetune config
(configs/finetune.py; `--set` overrides a key) on Kang (`cell_type`) and on
scanpy's pbmc68k_reduced (exact counts, `bulk_labels`), each beside two logistic
regressions on the same split: on the log-normalized counts of the backbone's
vocabulary, and on the model's input (which genes are in each cell's rank
tokens); with `--seeds`, on several splits (the mean, and the
accuracy's standard deviation). Writes OUT/annotation*.md for bench/RESULTS.md
("Cell type annotation").

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
import functools
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
from genemamba_jax import cli
from genemamba_jax.finetune import config as finetune_config
from genemamba_jax.finetune import run as finetune_run
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


def _finetune(run: Path, out: Path, preset: str = "", data: Path = KANG, label: str = "cell_type",
              max_len: int = 256, sets=(), **changes) -> tuple[dict, float]:
  c = finetune_config.get(preset)
  c.init_checkpoint, c.data.input, c.label_column = str(run), str(data), label
  c.data.max_len = max_len
  for key, value in changes.items():
    c[key] = value
  for item in sets:
    key, _, value = item.partition("=")
    cli.apply_override(c, key, value)
  start = time.time()
  return finetune_run.finetune(c, out), time.time() - start


def annotation_table(run: Path, out: Path) -> tuple[pd.DataFrame, Path]:
  linear, linear_s = _finetune(run, out / "linear")
  mlp, mlp_s = _finetune(run, out / "mlp", preset="original")
  pred = pd.read_csv(out / "linear" / "predictions.csv")
  adata = anndata.read_h5ad(KANG)
  sc.pp.normalize_total(adata, target_sum=1e4)
  sc.pp.log1p(adata)
  x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
  y = adata.obs["cell_type"].astype(str).to_numpy()
  train, test = pred.split.to_numpy() == "train", pred.split.to_numpy() == "test"
  logreg = LogisticRegression(max_iter=3000).fit(x[train], y[train]).predict(x[test])
  rows = {
      "GeneMamba fine-tuned, default config": {
          "accuracy": linear["test"]["accuracy"], "macro_f1": linear["test"]["macro_f1"],
          "val_accuracy": linear["val"]["accuracy"], "seconds": linear_s},
      "GeneMamba fine-tuned, original protocol (configs/finetune.py:original)": {
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


def _fit_logistic_regression(x: np.ndarray, y: np.ndarray, split: np.ndarray, genes) -> dict:
  """A table row: fitted on the rows whose `split` is train, scored on those whose split is test."""
  train, test = split == "train", split == "test"
  start = time.time()
  guess = LogisticRegression(max_iter=3000).fit(x[train], y[train]).predict(x[test])
  return {"accuracy": skm.accuracy_score(y[test], guess),
          "macro_f1": skm.f1_score(y[test], guess, average="macro"),
          "val_macro_f1": float("nan"), "steps": float("nan"), "seconds": time.time() - start,
          "genes": genes}


def logistic_regression(data: Path, label: str, predictions: Path, genes: set[str]) -> dict:
  """Accuracy and macro-F1 on the test split of `predictions` (its train split to fit), on the
  log-normalized counts of the genes in `genes`."""
  adata = anndata.read_h5ad(data)
  adata = adata[:, [g in genes for g in adata.var_names]].copy()
  sc.pp.normalize_total(adata, target_sum=1e4)
  sc.pp.log1p(adata)
  x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
  y = adata.obs[label].astype(str).to_numpy()
  return _fit_logistic_regression(x, y, pd.read_csv(predictions).split.to_numpy(), adata.n_vars)


@functools.lru_cache
def _token_indicators(run: Path, data: Path, label: str, max_len: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(x [cells, vocab] 1 where the gene is among the cell's top `max_len` rank tokens, labels
  [cells], obs names [cells]): the same for every split, so tokenized once per data set."""
  base = rundir.load_pretrained(run)
  sentences, names, obs = inference.tokenize_all(
      base.tokenizer(max_len=max_len, cls=False), open_source(data), [label], desc=None)
  x = np.zeros((len(sentences), base.model.config.vocab_size), np.float32)
  for row, tokens in enumerate(sentences):
    x[row, tokens] = 1.0
  return x, obs[label].astype(str).to_numpy(), names


def token_logistic_regression(run: Path, data: Path, label: str, predictions: Path,
                              max_len: int) -> dict:
  """`logistic_regression` on what the model sees instead of the counts: for each cell, which of
  the vocabulary's genes are among its top `max_len` rank tokens (1) or not (0). The gap to the
  counts' regression is what the tokens alone lose, whatever model reads them."""
  x, y, names = _token_indicators(run, data, label, max_len)
  split = pd.read_csv(predictions).set_index("obs_name").loc[names, "split"].to_numpy()
  return _fit_logistic_regression(x, y, split, float("nan"))


def demo_backbone(out: Path) -> Path:
  """The demo model (configs/demo.py), pretrained once into OUT/demo."""
  import subprocess  # pylint: disable=g-import-not-at-top
  run = out / "demo"
  if not (run / "checkpoints").is_dir() or not rundir.finished_steps(run / "checkpoints"):
    subprocess.run([sys.executable, "-m", "genemamba_jax.train", "--config", "configs/demo.py",
                    "--workdir", str(run)], check=True)
  return run


def annotation_bench(out: Path, sets: list[str], only_data: str | None = None,
                     seeds: tuple[int, ...] = (0,)) -> str:
  """The default finetune config vs logistic regression on Kang and pbmc68k (markdown).

  One stratified 80/10/10 split per seed (the finetune config's `seed`: split and
  initialization); both methods see the same split. With several seeds the table holds the
  mean over them and the accuracy's standard deviation (`accuracy_sd`).
  """
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from genemamba_jax.data import demo  # pylint: disable=g-import-not-at-top
  run = demo_backbone(out)
  genes = set(rundir.load_pretrained(run).vocab.gene_ids)
  pbmc = demo.prepare_demo(out / "demo_data", announce=False)["counts"]
  rows, tag = {}, "-".join(x.replace("=", "_") for x in sets) or "default"
  for name, data, label in (("Kang", KANG, "cell_type"), ("pbmc68k_reduced", pbmc, "bulk_labels")):
    if only_data and name != only_data:
      continue
    ours, baseline, tokens = [], [], []
    for seed in seeds:
      work = out / "annotation" / tag / name / f"seed{seed}"
      if work.exists():
        shutil.rmtree(work)
      metrics, seconds = _finetune(run, work, data=data, label=label, max_len=0,
                                   sets=[f"seed={seed}", *sets], write_h5ad=False)
      task = json.loads((work / "task.json").read_text())
      tokens.append(token_logistic_regression(run, data, label, work / "predictions.csv",
                                              task["data"]["max_len"]))
      ours.append({"accuracy": metrics["test"]["accuracy"], "macro_f1": metrics["test"]["macro_f1"],
                   "val_macro_f1": metrics["val"]["macro_f1"], "steps": task["num_steps"],
                   "seconds": seconds, "genes": float("nan")})
      baseline.append(logistic_regression(data, label, work / "predictions.csv", genes))
    method = "GeneMamba fine-tuned (" + (", ".join(sets) or "default config") + ")"
    for key, runs in ((method, ours), ("logistic regression, log-normalized counts", baseline),
                      ("logistic regression, the model's input (genes in each cell's tokens)",
                       tokens)):
      frame = pd.DataFrame(runs)
      rows[(name, key)] = {**frame.mean().to_dict(),
                           "accuracy_sd": frame["accuracy"].std(ddof=1) if len(runs) > 1
                           else float("nan")}
  frame = pd.DataFrame(rows).T
  frame.index.names = ["data", "method"]
  return _md(frame[["accuracy", "accuracy_sd", "macro_f1", "val_macro_f1", "steps", "seconds",
                    "genes"]])


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--cells", type=int, default=100)
  parser.add_argument("--out", default="bench/_work/downstream")
  parser.add_argument("--only", choices=["annotation"], help="run one section only")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="--only annotation: a finetune config override (repeatable)")
  parser.add_argument("--data", choices=["Kang", "pbmc68k_reduced"],
                      help="--only annotation: this data set only")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                      help="--only annotation: one split (and initialization) per seed; the table "
                           "gives the mean over them")
  a = parser.parse_args()
  out = Path(a.out)
  if a.only == "annotation":
    text = (f"Machine: {platform.processor() or platform.machine()}, {jax.devices()[0].platform}, "
            f"JAX {jax.__version__}\n\n" + annotation_bench(out, a.set, a.data, tuple(a.seeds)) + "\n")
    name = "-".join(["annotation", *a.set, *(f"seed{s}" for s in a.seeds)]).replace("=", "_")
    (out / f"{name}.md").write_text(text, encoding="utf-8")
    print(text)
    return
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
