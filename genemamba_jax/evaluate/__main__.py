"""python -m genemamba_jax.evaluate {integration,reconstruction,gene-pairs} ...

  integration     scib-metrics on an embedding in obsm (e.g. embed's X_genemamba) of
                  an .h5ad or SOMA experiment beside PCA and Harmony baselines:
                  DIR/metrics.csv, metrics.json, umap.png
  reconstruction  gene rank reconstruction of a checkpoint on real cells, under the
                  original same-position protocol and the leak-free one, beside a
                  model-free baseline: DIR/reconstruction.csv, .json, _cells.csv, .png
  gene-pairs      Gene2Vec positive/negative pairs scored with a checkpoint's gene
                  embeddings beside random ones: DIR/gene_pairs.csv, .json,
                  similarity.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd

from genemamba_jax import cli, progress
from genemamba_jax.data import soma_reader  # light: tiledbsoma is imported on first use
from genemamba_jax.errors import DataError


def _integration(a) -> list[str]:
  # A first line before the imports: scanpy, scib-metrics and JAX take ~20 s to load.
  progress.status(f"integration: obsm[{a.embedding!r}] of {a.input} beside PCA and Harmony; "
                  "loading scanpy, scib-metrics and JAX")
  from genemamba_jax.evaluate import integration  # pylint: disable=g-import-not-at-top
  table = integration.run_integration(a.input, a.embedding, a.batch_column, a.label_column,
                                      a.out, layer=a.layer, n_pcs=a.n_pcs, seed=a.seed,
                                      plots=not a.no_plots, log=_step("integration"),
                                      soma=soma_reader.options(a))
  return [_show(table[["avg_bio", "avg_batch", "nmi", "ari", "asw_label", "asw_batch",
                       "graph_connectivity", "ilisi", "clisi"]]),
          *_written(integration.output_files(a.out, plots=not a.no_plots))]


def _reconstruction(a) -> list[str]:
  progress.status(f"reconstruction: gene ranks of {a.input} rebuilt by {a.checkpoint}; "
                  "loading JAX and the model")
  log = _step("reconstruction")
  from genemamba_jax import inference, rundir  # pylint: disable=g-import-not-at-top
  from genemamba_jax.data import genes  # pylint: disable=g-import-not-at-top
  from genemamba_jax.data.readers import open_source  # pylint: disable=g-import-not-at-top
  from genemamba_jax.evaluate import reconstruction  # pylint: disable=g-import-not-at-top
  model = rundir.load_pretrained(a.checkpoint)
  tokenizer = model.tokenizer(max_len=a.max_len,
                              gene_map=genes.load_gene_map(a.gene_map) if a.gene_map else None)
  log(f"tokenizing {a.input} with the checkpoint's vocabulary")
  source = open_source(a.input, a.layer, a.gene_column, soma=soma_reader.options(a))
  sentences, _, _ = inference.tokenize_all(tokenizer, source)
  chosen = reconstruction.sample_cells(len(sentences), a.cells, a.seed)
  sentences = [sentences[i] for i in chosen if len(sentences[i])]
  vocab = model.vocab
  log(f"predicting the gene ranks of {len(sentences)} random cells under each protocol")
  summary, per_cell, hyps = reconstruction.reconstruct(
      model.model, sentences, vocab.special_ids, batch_size=a.batch_size, progress=True)
  references = [s[~np.isin(s, vocab.special_ids)] for s in sentences]
  files = reconstruction.write_outputs(summary, per_cell, a.out, references, hyps)
  cols = [c for c in ("l_dist", "nl_dist", "bleu1", "bleu4", "spearman", "exact_match")
          if c in summary]
  return [f"{len(sentences)} cells of {a.input} (nl_dist: lower is better, the rest higher)",
          _show(summary[cols]), *_written(files)]


def _gene_pairs(a) -> list[str]:
  source = f" of {a.genes or a.checkpoint}" if a.genes or a.checkpoint else ""
  progress.status(f"gene-pairs: Gene2Vec {a.split} pairs of {a.pairs} scored with the gene "
                  f"embeddings{source}")
  from genemamba_jax.evaluate import gene_pairs  # pylint: disable=g-import-not-at-top
  names, vectors = _gene_vectors(a)
  if a.gene_map:  # vocabulary ids (e.g. Ensembl) -> the pair files' symbols
    from genemamba_jax.data import genes  # pylint: disable=g-import-not-at-top
    to_symbol = {v: k for k, v in genes.load_gene_map(a.gene_map).items()}
    names = [to_symbol.get(n, n) for n in names]
    names, first = np.unique(names, return_index=True)  # one row per symbol
    vectors = vectors[first]
  table = gene_pairs.run_gene_pairs(list(names), vectors, a.pairs, a.out, split=a.split,
                                    seed=a.seed, metric=a.metric)
  return [_show(table), *_written(gene_pairs.output_files(a.out))]


def _gene_vectors(a) -> tuple[list[str], np.ndarray]:
  """(gene ids, [genes, d]) from --genes (embed's .npz) or the checkpoint's input embeddings."""
  if a.genes:
    try:
      data = np.load(a.genes)
    except (OSError, ValueError) as e:
      raise DataError(f"{a.genes}: cannot read it as .npz ({e})") from None
    key = {"input": ("gene_ids", "input"), "context": ("context_gene_ids", "context")}[a.which]
    if key[1] not in data:
      raise DataError(f"{a.genes}: holds no {key[1]!r} array (has {sorted(data)}); write it with "
                      "`embed --genes-output`")
    return [str(g) for g in data[key[0]]], np.asarray(data[key[1]], np.float32)
  if not a.checkpoint:
    raise DataError("give --checkpoint (input embeddings) or --genes GENES.npz from "
                    "`embed --genes-output`")
  from genemamba_jax import rundir  # pylint: disable=g-import-not-at-top
  model = rundir.load_pretrained(a.checkpoint)
  vocab = model.vocab
  table = np.asarray(model.model.embeddings.embedding[...], np.float32)
  return vocab.gene_ids, table[vocab.gene_token_ids(vocab.gene_ids)]


def _show(frame: pd.DataFrame) -> str:
  return frame.to_string(float_format=lambda v: f"{v:.4f}")


def _step(command: str):
  """A `log(line)` for the run functions: `<command>: <line>` on stderr, beside the bars."""
  return lambda line: progress.status(f"{command}: {line}")


def _written(paths) -> list[str]:
  """One `written: <path>` line per file the command wrote."""
  return [f"written: {p}" for p in paths]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m genemamba_jax.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("integration", help="batch integration metrics (scib) vs PCA / Harmony")
  p.add_argument("--input", required=True,
                 help=".h5ad with counts and the embedding in obsm, or a SOMA experiment (folder "
                      "or URI) with them in a measurement's X and obsm")
  p.add_argument("--embedding", default="X_genemamba", help="obsm key (default X_genemamba)")
  p.add_argument("--batch-column", required=True,
                 help="obs column with the batch (donor, sample, technology) to integrate over")
  p.add_argument("--label-column", required=True, help="obs column with the cell types")
  p.add_argument("--out", required=True, help="folder for metrics.csv/.json and umap.png")
  p.add_argument("--layer", "--x-layer", default=None,
                 help="counts for the baselines from this layer (default X); of a SOMA "
                      "experiment: its X layer (default raw)")
  p.add_argument("--n-pcs", type=int, default=50,
                 help="principal components of the PCA and Harmony baselines (default 50)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of k-means, the neighbour graph and UMAP (default 0)")
  p.add_argument("--no-plots", action="store_true",
                 help="skip umap.png (the methods' UMAPs side by side)")
  soma_reader.add_arguments(p)
  p.set_defaults(run=_integration)

  p = sub.add_parser("reconstruction", help="gene rank reconstruction, original and leak-free")
  cli.add_model_arguments(p, batch_size=32)
  p.add_argument("--input", required=True, help=cli.CELL_INPUT)
  p.add_argument("--out", required=True, help="folder for reconstruction.csv/.json and the plot")
  p.add_argument("--cells", type=int, default=100,
                 help="random cells to score (default 100; the original used 10; <= 0: all)")
  p.add_argument("--seed", type=int, default=0, help="which random cells (default 0)")
  cli.add_input_arguments(p)
  p.set_defaults(run=_reconstruction)

  p = sub.add_parser("gene-pairs", help="Gene2Vec pair benchmark on gene embeddings")
  p.add_argument("--checkpoint", default=None, help="use its input embedding table")
  p.add_argument("--genes", default=None, help="or an .npz from `embed --genes-output`")
  p.add_argument("--which", choices=("input", "context"), default="input",
                 help="with --genes: the input table or the context-averaged states "
                      "(default input)")
  p.add_argument("--pairs", required=True, help="folder with {split}_text.txt / _label.txt")
  p.add_argument("--split", default="test", choices=("train", "valid", "test"),
                 help="which pair files, {split}_text.txt / {split}_label.txt (default test)")
  p.add_argument("--metric", default="cosine", choices=("cosine", "pearson"),
                 help="similarity of two gene embeddings (default cosine)")
  p.add_argument("--gene-map", default=None,
                 help="symbol -> vocabulary id table when the vocabulary is not symbols")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the random-embedding baseline (default 0)")
  p.add_argument("--out", required=True, help="folder for gene_pairs.csv/.json and the plot")
  p.set_defaults(run=_gene_pairs)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(build_parser(), argv)


if __name__ == "__main__":
  sys.exit(main())
