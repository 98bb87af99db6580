"""Data preparation: gene medians and vocabularies, and tokenization into shards.

    python -m genemamba_jax.prepare medians --input DATA/ --out vocab/ \\
        [--gene-table grch38_genes.tsv.gz --biotypes protein_coding,miRNA] [--log1p]
    python -m genemamba_jax.prepare import-geneformer --token-dictionary token_dictionary.pkl \\
        --median-dictionary gene_median_dictionary.pkl --out vocab/
    python -m genemamba_jax.prepare merge-medians --input vocab_a/ vocab_b/ --out vocab/
    python -m genemamba_jax.prepare demo [--out runs/demo_data]   # scanpy's pbmc68k_reduced
    python -m genemamba_jax.prepare tokenize --input DATA/ --vocab vocab/ --out tokens/ \\
        [--max-len 2048] [--cls] [--eos] [--label-column cell_type] [--workers 4]

`medians` and `tokenize` run their work units in --workers local processes, or on
a Dask cluster with --dask-scheduler tcp://HOST:8786 (README, "Scaling out").

Inputs are .h5ad files, 10x Cell Ranger outputs (a filtered_feature_bc_matrix/
folder or .h5 file), SOMA experiments (a folder or URI, e.g. the CELLxGENE Census:
--measurement RNA --x-layer raw --obs-filter "is_primary_data == True") or
directories of them. Bad input ends the command with a
one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from genemamba_jax import cli
from genemamba_jax.data import jobs, soma_reader


def _input_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                 help=".h5ad files, 10x outputs (folder or .h5), SOMA experiments (folder or "
                      "URI), or directories of them")
  p.add_argument("--layer", "--x-layer", default=None,
                 help="counts from this layer ('raw' = .raw.X) instead of X, e.g. --layer counts; "
                      "of a SOMA experiment: its X layer (default raw)")
  p.add_argument("--gene-column", default=None,
                 help="var column holding gene ids (default: the var index)")
  p.add_argument("--gene-map", default=None, metavar="FILE",
                 help="symbol -> Ensembl id table: Geneformer's gene_name_id_dict.pkl or a TSV")
  p.add_argument("--min-genes", type=int, default=200,
                 help="drop cells with fewer expressed vocabulary genes (default 200)")
  p.add_argument("--keep-non-primary", action="store_true",
                 help="keep cells with obs.is_primary_data == False (dropped by default)")
  p.add_argument("--log1p", action="store_true",
                 help="use log1p(counts / total * 1e4) before dividing by the median "
                      "(the paper's section-4 reading; the default is Geneformer's, without log1p)")
  p.add_argument("--workers", type=int, default=1,
                 help="local worker processes (default 1; unused with --dask-scheduler)")
  p.add_argument("--dask-scheduler", default=None, metavar="tcp://HOST:PORT",
                 help="run the work units on this Dask cluster's workers (pip install -e "
                      "\".[dask]\"); inputs, vocabulary and --out must be on storage they share")
  p.add_argument("--cells-per-shard", type=int, default=50_000,
                 help="cells per work unit / output shard (default 50,000)")
  p.add_argument("--in-memory", action="store_true",
                 help="read each .h5ad whole with anndata instead of streaming it in chunks")
  soma_reader.add_arguments(p)


def _absolute(path: str | None) -> str | None:
  """Paths as the units see them wherever they run (Dask workers have their own cwd)."""
  return None if path is None else os.path.abspath(path)


def _input_config(a: argparse.Namespace) -> jobs.InputConfig:
  return jobs.InputConfig(a.layer, a.gene_column, _absolute(a.gene_map), a.in_memory,
                          soma_reader.options(a))


def _check_scheduler(a: argparse.Namespace) -> None:
  if a.dask_scheduler is not None:
    from genemamba_jax.data import cluster
    cluster.check_address(a.dask_scheduler)


def _medians(a: argparse.Namespace) -> list[str]:
  from genemamba_jax.data import prepare_medians
  _check_scheduler(a)
  config = prepare_medians.MedianConfig(
      min_genes=a.min_genes, primary_only=not a.keep_non_primary, log1p=a.log1p,
      gene_table=_absolute(a.gene_table), biotypes=tuple(b for b in a.biotypes.split(",") if b))
  vocab, meds, info = prepare_medians.compute_medians(a.input, a.out, config, _input_config(a),
                                                      a.workers, a.cells_per_shard,
                                                      a.dask_scheduler)
  return (jobs.summary_lines(_counter(info["summary"]), info["summary"]["genes_matched"])
          + [f"vocabulary: {len(vocab):,} tokens ({len(meds):,} genes with a median)",
             f"written: {Path(a.out) / 'vocab.json'}, medians.json, digests.json"])


def _counter(summary: dict):
  import collections
  return collections.Counter({k: v for k, v in summary.items() if isinstance(v, int)})


def _tokenize(a: argparse.Namespace) -> list[str]:
  from genemamba_jax.data import prepare_tokens
  _check_scheduler(a)
  from genemamba_jax.data.tokenizer import TokenizeConfig
  config = TokenizeConfig(max_len=a.max_len, cls=a.cls, eos=a.eos, log1p=a.log1p,
                          min_genes=a.min_genes, primary_only=not a.keep_non_primary)
  columns = prepare_tokens.Columns(a.label_column, a.batch_column)
  manifest = prepare_tokens.tokenize_corpus(a.input, a.vocab, a.out, config, _input_config(a),
                                            columns, a.workers, a.cells_per_shard,
                                            a.dask_scheduler)
  s = manifest["summary"]
  lengths = f"{s['seconds']:.1f} s, {s['cells_read'] / max(s['seconds'], 1e-9):,.0f} cells/s"
  return (jobs.summary_lines(_counter(s), s["genes_matched"])
          + [f"labels: {len(manifest['labels'])}, batches: {len(manifest['batches'])}",
             f"written: {len(manifest['shards'])} shard(s) and manifest.json in {a.out} "
             f"({lengths})"])


def _import_geneformer(a: argparse.Namespace) -> list[str]:
  from genemamba_jax.data import vocab
  v, meds = vocab.import_geneformer(a.token_dictionary, a.median_dictionary, a.out)
  return [f"vocabulary: {len(v):,} tokens, {len(meds):,} gene medians; <pad>={v.pad_id} "
          f"<mask>={v.mask_id} <cls>={v.cls_id} <eos>={v.eos_id}", f"written: {a.out}"]


def _merge(a: argparse.Namespace) -> list[str]:
  from genemamba_jax.data import prepare_medians
  v, meds, _ = prepare_medians.merge_vocab_dirs(a.input, a.out)
  return [f"merged {len(a.input)} digest sets: {len(v):,} tokens, {len(meds):,} genes",
          f"written: {a.out}"]


def _demo(a: argparse.Namespace) -> list[str]:
  from genemamba_jax.data import demo
  paths = demo.prepare_demo(a.out)
  return demo.describe(paths) + [
      f"next: read it with genemamba_jax.data.read_tokenized('{paths['tokens']}'), or batch it "
      "for training with genemamba_jax.data.pipeline.make_dataset"]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m genemamba_jax.prepare",
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("medians", help="vocabulary + per-gene non-zero medians (t-digests)",
                     description="A vocabulary and the non-zero median of every gene's normalized "
                                 "expression over a corpus (t-digests, mergeable across runs).")
  _input_args(p)
  p.add_argument("--out", required=True, metavar="VOCAB_DIR",
                 help="the vocabulary directory to write (vocab.json, medians.json, digests.json)")
  p.add_argument("--gene-table", default=None, metavar="TSV",
                 help="tab-separated gene table with Ensembl ids and biotypes, to restrict the "
                      "vocabulary (e.g. an Ensembl BioMart export; see docs/commands.md)")
  p.add_argument("--biotypes", default="protein_coding,miRNA",
                 help="biotypes kept with --gene-table (default protein_coding,miRNA)")
  p.set_defaults(run=_medians)

  p = sub.add_parser("tokenize", help="rank-tokenize cells into ArrayRecord shards",
                     description="Cells -> rank-token sentences (Geneformer's ranking with the "
                                 "vocabulary's medians) in ArrayRecord shards + manifest.json; a "
                                 "re-run skips finished shards.")
  _input_args(p)
  p.add_argument("--vocab", required=True, metavar="VOCAB_DIR",
                 help="a vocabulary directory (prepare medians / import-geneformer, or a run's "
                      "vocab/)")
  p.add_argument("--out", required=True, metavar="DIR", help="the tokenized directory to write")
  p.add_argument("--max-len", type=int, default=2048,
                 help="tokens per cell, special tokens included (default 2048; 4096 supported)")
  p.add_argument("--cls", action="store_true", help="put <cls> first")
  p.add_argument("--eos", action="store_true", help="put <eos> last")
  p.add_argument("--label-column", default=None, help="obs column stored as each cell's label")
  p.add_argument("--batch-column", default=None, help="obs column stored as each cell's batch")
  p.set_defaults(run=_tokenize, on_interrupt="finished shards are kept; re-run the same command "
                                            "to continue")

  p = sub.add_parser("import-geneformer", help="vocabulary from Geneformer's dictionaries",
                     description="A vocabulary directory from Geneformer's token and median "
                                 "dictionaries (its ids kept; <cls> and <eos> appended).")
  p.add_argument("--token-dictionary", required=True, metavar="PKL",
                 help="Geneformer's token_dictionary_gc30M.pkl (see docs/commands.md for where)")
  p.add_argument("--median-dictionary", required=True, metavar="PKL",
                 help="Geneformer's gene_median_dictionary_gc30M.pkl")
  p.add_argument("--out", required=True, metavar="VOCAB_DIR",
                 help="the vocabulary directory to write")
  p.set_defaults(run=_import_geneformer)

  p = sub.add_parser("demo", help="the embedded demo: scanpy's pbmc68k_reduced -> vocab + tokens",
                     description="The embedded demo data set: scanpy's bundled pbmc68k_reduced "
                                 "(700 PBMCs) -> exact counts, medians, vocabulary and tokens.")
  p.add_argument("--out", default="runs/demo_data", metavar="DIR",
                 help="where to write (default runs/demo_data); finished parts are reused")
  p.set_defaults(run=_demo)

  p = sub.add_parser("merge-medians", help="merge the digests of several `medians` outputs",
                     description="One vocabulary from the t-digests of several `prepare medians` "
                                 "outputs (other nodes, or new data later).")
  p.add_argument("--input", nargs="+", required=True, metavar="VOCAB_DIR",
                 help="vocabulary directories written by `prepare medians`")
  p.add_argument("--out", required=True, metavar="VOCAB_DIR",
                 help="the merged vocabulary directory to write")
  p.set_defaults(run=_merge)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(build_parser(), argv)


if __name__ == "__main__":
  sys.exit(main())
