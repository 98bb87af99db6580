"""python -m genemamba_jax.embed --checkpoint DIR --input X.h5ad --output OUT.h5ad|OUT.npy|OUT.npz

Cell embeddings of a trained (or fine-tuned) GeneMamba, in the input's cell
order, deterministic and independent of the batch size:

  OUT.h5ad  a copy of the input with obsm['X_genemamba'] (the scanpy
            convention; with --pooling both, also obsm['X_genemamba_mean'])
  OUT.npy   the [cells, d_model] float32 matrix of the first pooling
  OUT.npz   cls and/or mean matrices and obs_names

--genes-output GENES.npz adds gene embeddings: the input embedding table
(`input`, every vocabulary gene) and the final hidden state averaged over every
occurrence of the gene in the given cells (`context`, genes seen at least once),
each with its gene ids. From Python, `embed_source` / `embed_file` return the
same arrays.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from genemamba_jax import cli, inference
from genemamba_jax import rundir
from genemamba_jax.files import atomic_paths, write_h5ad
from genemamba_jax.data import genes as genes_lib
from genemamba_jax.data import soma_reader
from genemamba_jax.errors import DataError
from genemamba_jax.data.readers import open_source

OBSM_KEY = "X_genemamba"


@dataclasses.dataclass
class EmbedResult:
  obs_names: np.ndarray  # [cells] str, input order
  cells: dict[str, np.ndarray]  # pooling -> [cells, d_model] float32
  gene_ids: np.ndarray  # [G] str: every vocabulary gene
  gene_input: np.ndarray  # [G, d_model] float32: the input embedding table
  context_gene_ids: np.ndarray | None = None  # [G'] str: genes seen in the cells
  gene_context: np.ndarray | None = None  # [G', d_model]: mean final state over occurrences
  gene_context_counts: np.ndarray | None = None  # [G'] int64: occurrences averaged


def default_pooling(model: rundir.Pretrained) -> str:
  """cls when the model was trained (or fine-tuned) with <cls> first, else mean."""
  if model.task is not None:
    return model.task.get("pooling", "cls")
  return "cls" if model.tokenize.get("cls") else "mean"


def embed_source(model: rundir.Pretrained, source, *, poolings: Sequence[str] = ("cls",),
                 batch_size: int = 64, max_len: int | None = None, gene_context: bool = False,
                 gene_map: Mapping[str, str] | None = None, progress: bool = True) -> EmbedResult:
  """Embeds every cell of a count source (see `genemamba_jax.data.readers`).

  `gene_map` maps the source's gene ids (e.g. symbols) onto the vocabulary's.
  """
  if "cls" in poolings and not (model.tokenize.get("cls") or model.task):
    raise DataError(f"{model.checkpoint.run_dir}: the model was trained without a <cls> token, "
                    "so its CLS state means nothing; use --pooling mean (or fine-tune first)")
  tokenizer = model.tokenizer(max_len=max_len, cls="cls" in poolings or None, gene_map=gene_map)
  sentences, obs_names, _ = inference.tokenize_all(tokenizer, source,
                                                   desc="tokenizing" if progress else None)
  vocab = model.vocab
  out = inference.embed_sentences(
      model.model, sentences, poolings=poolings, batch_size=batch_size, gene_context=gene_context,
      special_ids=vocab.special_ids,
      desc="embedding" if progress else None)
  gene_tokens = vocab.gene_token_ids(vocab.gene_ids)
  table = np.asarray(model.model.embeddings.embedding[...], np.float32)
  result = EmbedResult(np.asarray(obs_names, dtype=str), out.cells, np.asarray(vocab.gene_ids),
                       table[gene_tokens])
  if gene_context:
    ids, context = out.gene_context()
    names = np.asarray(vocab.id_to_token)
    result.context_gene_ids, result.gene_context = names[ids], context
    result.gene_context_counts = out.gene_counts[ids]
  return result


def embed_file(checkpoint: str | os.PathLike, input_path: str | os.PathLike, *,
               poolings: Sequence[str] | None = None, batch_size: int = 64,
               gene_column: str | None = None, gene_map: str | None = None,
               layer: str | None = None, max_len: int | None = None,
               gene_context: bool = False, progress: bool = True,
               soma: soma_reader.SomaOptions | None = None) -> EmbedResult:
  """Loads `checkpoint` and embeds the cells of `input_path` (.h5ad, 10x folder or .h5, or a
  SOMA experiment read as `soma` says)."""
  model = rundir.load_pretrained(checkpoint)
  source = open_source(input_path, layer, gene_column, soma=soma)
  return embed_source(model, source, poolings=tuple(poolings or (default_pooling(model),)),
                      batch_size=batch_size, max_len=max_len, gene_context=gene_context,
                      gene_map=genes_lib.load_gene_map(gene_map) if gene_map else None,
                      progress=progress)


def write_output(result: EmbedResult, output: str | os.PathLike, input_path=None,
                 layer_note: str = "", genes_output: str | os.PathLike | None = None) -> None:
  """Writes the cell embeddings to .h5ad (copy of the input + obsm), .npy or .npz, atomically.

  With `genes_output`, the gene embeddings too (`write_genes`): both files are
  replaced together (atomic.atomic_paths), so a failed or interrupted run never
  leaves new cell embeddings beside old gene embeddings, or one without the other.
  """
  output = Path(output)
  if output.suffix not in (".h5ad", ".npy", ".npz"):
    raise DataError(f"{output}: unsupported output; name it .h5ad, .npy or .npz")
  paths = [output]
  if genes_output is not None:
    paths.append(_genes_path(genes_output))
  with atomic_paths(paths) as temps:
    _write_cells(result, output.suffix, temps[0], input_path, layer_note)
    if genes_output is not None:
      _write_genes(result, temps[1])


def _write_cells(result: EmbedResult, suffix: str, tmp: Path, input_path, layer_note: str) -> None:
  first = next(iter(result.cells))
  if suffix == ".npy":
    np.save(tmp, result.cells[first])
  elif suffix == ".npz":
    np.savez(tmp, obs_names=result.obs_names, **result.cells)
  else:
    import anndata  # pylint: disable=g-import-not-at-top
    adata = anndata.read_h5ad(input_path)
    if list(adata.obs_names) != list(result.obs_names):
      raise DataError(f"{input_path}: its cells changed while embedding; run again")
    for i, (pooling, matrix) in enumerate(result.cells.items()):
      adata.obsm[OBSM_KEY if i == 0 else f"{OBSM_KEY}_{pooling}"] = matrix
    adata.uns["genemamba"] = {"pooling": first, "poolings": list(result.cells),
                              "note": layer_note}
    write_h5ad(adata, tmp)


def _genes_path(path: str | os.PathLike) -> Path:
  path = Path(path)
  if path.suffix != ".npz":
    raise DataError(f"{path}: gene embeddings are written as .npz; name it GENES.npz")
  return path


def write_genes(result: EmbedResult, path: str | os.PathLike) -> None:
  """gene embeddings -> .npz: gene_ids, input [, context_gene_ids, context, context_counts]."""
  with atomic_paths([_genes_path(path)]) as (tmp,):
    _write_genes(result, tmp)


def _write_genes(result: EmbedResult, tmp: Path) -> None:
  arrays = {"gene_ids": result.gene_ids, "input": result.gene_input}
  if result.gene_context is not None:
    arrays.update(context_gene_ids=result.context_gene_ids, context=result.gene_context,
                  context_counts=result.gene_context_counts)
  np.savez(tmp, **arrays)


def _run(args: argparse.Namespace) -> list[str]:
  if args.batch_size < 1:
    raise DataError(f"--batch-size {args.batch_size} must be >= 1")
  suffix = Path(args.output).suffix
  if suffix not in (".h5ad", ".npy", ".npz"):
    raise DataError(f"--output {args.output}: name it .h5ad, .npy or .npz")
  if suffix == ".h5ad" and Path(args.input).suffix != ".h5ad":
    raise DataError(f"--output {args.output}: an .h5ad output copies the input, which must be "
                    f".h5ad too; write .npy or .npz for {args.input}")
  if args.genes_output:
    _genes_path(args.genes_output)  # checked before the work, not after the cells are written
  model = rundir.load_pretrained(args.checkpoint)
  poolings = (("cls", "mean") if args.pooling == "both"
              else (args.pooling or default_pooling(model),))
  source = open_source(args.input, args.layer, args.gene_column, soma=soma_reader.options(args))
  result = embed_source(
      model, source, poolings=poolings, batch_size=args.batch_size, max_len=args.max_len,
      gene_context=args.genes_output is not None,
      gene_map=genes_lib.load_gene_map(args.gene_map) if args.gene_map else None)
  write_output(result, args.output, args.input, f"checkpoint {model.checkpoint.step_dir}",
               genes_output=args.genes_output)
  shape = result.cells[poolings[0]].shape
  return [f"wrote {shape[0]} cells x {shape[1]} ({', '.join(poolings)} pooling) to {args.output}"
          + (f"; gene embeddings to {args.genes_output}" if args.genes_output else "")]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m genemamba_jax.embed", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_model_arguments(parser)
  parser.add_argument("--input", required=True, help=cli.CELL_INPUT)
  parser.add_argument("--output", required=True, help="OUT.h5ad, OUT.npy or OUT.npz")
  parser.add_argument("--pooling", choices=("cls", "mean", "both"), default=None,
                      help="cell representation (default: cls if the model knows <cls>, else mean)")
  cli.add_input_arguments(parser)
  parser.add_argument("--genes-output", default=None,
                      help="also write gene embeddings (input table and context means) to this .npz")
  parser.set_defaults(run=_run)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(build_parser(), argv)


if __name__ == "__main__":
  sys.exit(main())
