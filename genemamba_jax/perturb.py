"""python -m genemamba_jax.perturb --checkpoint RUN --input X.h5ad --genes G1,G2
    --mode delete|overexpress --output OUT.csv [--target-column COL --target VALUE]

In silico perturbation (Geneformer's modes) on the rank sentences a trained
GeneMamba reads: each cell is tokenized as the run tokenizes, edited, and
embedded again; how far its embedding moves says how much the model's view of
the cell depends on that gene.

  delete       the gene's token is removed (the sentence gets one shorter; no
               other token moves, none comes in from beyond the cut-off). A cell
               without the gene keeps its sentence: shift exactly 0.
  overexpress  the gene's token moves to the front (just after <cls> when the
               model uses one), or is put there when the cell lacks it; the
               sentence is then cut to the model's length (the last gene drops out).

OUT.csv has one row per (cell, gene), cells in input order and each cell's genes
in the order given: obs_name, gene, mode, shift, where shift = 1 - cosine
similarity of the cell's embedding (the run's default pooling) before and after.
With --target-column/--target, also toward_target = cos(after, T) - cos(before, T),
T the mean embedding of the unperturbed cells whose obs[COL] == VALUE: positive
means the perturbation moves the cell toward that group.

Genes are named as the input names them (its var index or --gene-column);
with --gene-map, symbols map to the vocabulary's ids as the tokenizer maps the
input's. A gene the vocabulary lacks is an error (--skip-unknown: skip it with a
warning).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from genemamba_jax import cell_inputs, cli, embed, inference
from genemamba_jax import rundir
from genemamba_jax import progress as progress_lib
from genemamba_jax.data import genes as genes_lib
from genemamba_jax.data import soma_reader
from genemamba_jax.errors import DataError

MODES = ("delete", "overexpress")
COLUMNS = ("obs_name", "gene", "mode", "shift")
TOWARD = "toward_target"

_log = logging.getLogger(__name__)


def delete_gene(sentence: np.ndarray, token: int) -> np.ndarray:
  """[L] tokens -> [L - 1] without `token` (the same [L] when the cell lacks it)."""
  sentence = np.asarray(sentence)
  return sentence[sentence != token]


def overexpress_gene(sentence: np.ndarray, token: int, max_len: int, cls_id: int | None = None,
                     eos_id: int | None = None) -> np.ndarray:
  """[L] tokens -> [min(L or L + 1, max_len)] with `token` the first gene.

  The gene leaves its place (or is new to the cell) and goes before every other
  gene: after `<cls>` when the sentence starts with `cls_id`. The genes are then
  cut to the `max_len` the sentence may have, `<eos>` (a last `eos_id`) kept last.
  """
  sentence = np.asarray(sentence)
  head = int(cls_id is not None and len(sentence) > 0 and sentence[0] == cls_id)
  tail = int(eos_id is not None and len(sentence) > head and sentence[-1] == eos_id)
  genes = sentence[head:len(sentence) - tail]
  genes = np.concatenate([np.asarray([token], sentence.dtype), genes[genes != token]])
  genes = genes[:max(max_len - head - tail, 0)]
  return np.concatenate([sentence[:head], genes, sentence[len(sentence) - tail:]])


def edit(sentence: np.ndarray, token: int, mode: str, max_len: int, cls_id: int | None = None,
         eos_id: int | None = None) -> np.ndarray:
  """The perturbed sentence (`delete_gene` or `overexpress_gene`)."""
  if mode == "delete":
    return delete_gene(sentence, token)
  if mode == "overexpress":
    return overexpress_gene(sentence, token, max_len, cls_id, eos_id)
  raise DataError(f"--mode {mode!r}: use one of {', '.join(MODES)}")


def gene_tokens(genes: Sequence[str], vocab, gene_map: Mapping[str, str] | None = None,
                skip_unknown: bool = False) -> dict[str, int]:
  """{gene as given: its token id}, in the given order (repeats once).

  Genes are mapped like the input's gene ids (`genes.map_gene_ids` with
  `gene_map`). DataError naming the genes the vocabulary lacks, unless
  `skip_unknown` (then a warning; still an error when none is known).
  """
  genes = list(dict.fromkeys(str(g).strip() for g in genes if str(g).strip()))
  if not genes:
    raise DataError("--genes: no gene given; name one or more, comma-separated (e.g. ISG15,IFI6)")
  ids = genes_lib.map_gene_ids(genes, gene_map) if gene_map is not None else genes
  known = set(vocab.gene_ids)
  tokens = {g: vocab.token_to_id[i] for g, i in zip(genes, ids) if i is not None and i in known}
  unknown = [g for g in genes if g not in tokens]
  if unknown:
    found = f"{len(tokens)} of {len(genes)} found"
    named = f"gene{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
    verb = "are" if len(unknown) > 1 else "is"
    example = ", ".join(vocab.gene_ids[:3])
    hint = (f"name genes as the vocabulary does (e.g. {example})"
            + ("" if gene_map is not None else ", or map symbols to its ids with --gene-map"))
    if not tokens or not skip_unknown:
      raise DataError(f"{named} {verb} not in the model's vocabulary ({found}); {hint}"
                      + ("" if not tokens else "; or pass --skip-unknown to perturb the others"))
    _log.warning("skipping %s: not in the model's vocabulary (%s)", named, found)
  return tokens


def target_group(column: pd.Series, value: str, where: str) -> np.ndarray:
  """[cells] bool: the cells whose obs `column` [cells] holds `value` (compared as text, so
  --target 101 finds an integer 101); DataError listing the values there when none has it."""
  values = column.astype(str).to_numpy()
  chosen = values == str(value)
  if not chosen.any():
    present = pd.unique(values)
    listed = ", ".join(map(str, present[:20])) + (", ..." if len(present) > 20 else "")
    raise DataError(f"{where}: no cell has obs[{column.name!r}] == {value!r} (--target); values "
                    f"there are: {listed}")
  return chosen


def _unit(x: np.ndarray) -> np.ndarray:
  """Rows scaled to length 1 ([..., d], float64); zero rows stay zero."""
  x = np.asarray(x, np.float64)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.where(norm > 0, norm, 1.0)


def _pairs(sentences: Sequence[np.ndarray], tokens: Sequence[int], mode: str, max_len: int,
           cls_id: int | None, eos_id: int | None) -> Iterator[tuple[int, int, np.ndarray | None]]:
  """(cell, gene index, perturbed sentence, or None when it equals the cell's) cell-major."""
  for cell, sentence in enumerate(sentences):
    for j, token in enumerate(tokens):
      new = edit(sentence, token, mode, max_len, cls_id, eos_id)
      yield cell, j, None if np.array_equal(new, sentence) else new


def perturb_sentences(model: rundir.Pretrained, sentences: Sequence[np.ndarray],
                      tokens: Sequence[int], mode: str, *, pooling: str, max_len: int,
                      target_cells: np.ndarray | None = None, batch_size: int = 64,
                      desc: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Embeds the cells and every (cell, gene) perturbation of them; compares.

  Args:
    model: the loaded run.
    sentences: [cells] token arrays, as the run's tokenizer makes them.
    tokens: [genes] token ids to perturb.
    mode: "delete" or "overexpress".
    pooling: the cell embedding ("cls": the sentences start with <cls>; "mean").
    max_len: the sentence length overexpress cuts to.
    target_cells: [cells] bool, the target group (its mean original embedding is the
      target), or None.
    batch_size: sentences per forward pass; the results do not depend on it.

  Returns:
    (original embeddings [cells, d] float32, shift [cells, genes] float64,
    toward [cells, genes] float64 or None). Pairs whose sentence the
    perturbation leaves as it was are not embedded: their shift and toward are 0.0.
  """
  vocab = model.vocab
  # One compiled step for the cells and their perturbations alike (a jit per pass would
  # compile again).
  step = inference.batch_step(inference.embedding_fn((pooling,), model.config.vocab_size,
                                                     vocab.special_ids), model.model)

  def embed_batch(rows: Sequence[np.ndarray], what: str | None = None) -> np.ndarray:
    return _embed(step, rows, pooling, batch_size, model.config.pad_id, model.config.d_model,
                  what)

  before = embed_batch(sentences, desc and "embedding")
  unit_before = _unit(before)
  unit_target = None if target_cells is None else _unit(before[target_cells].mean(axis=0))
  shift = np.zeros((len(sentences), len(tokens)), np.float64)
  toward = None if target_cells is None else np.zeros_like(shift)
  pending: list[tuple[int, int, np.ndarray]] = []

  def flush() -> None:
    if not pending:
      return
    cells = np.asarray([c for c, _, _ in pending])
    genes = np.asarray([j for _, j, _ in pending])
    after = _unit(embed_batch([s for _, _, s in pending]))
    shift[cells, genes] = 1.0 - np.sum(after * unit_before[cells], axis=1)
    if toward is not None:
      toward[cells, genes] = after @ unit_target - unit_before[cells] @ unit_target
    pending.clear()

  with progress_lib.bar(len(sentences) * len(tokens), desc, "perturbations") as bar:
    done = 0
    for cell, j, new in _pairs(sentences, tokens, mode, max_len, vocab.cls_id, vocab.eos_id):
      done += 1
      if new is not None:
        pending.append((cell, j, new))
      if len(pending) == batch_size:
        flush()
        bar.update(done)
        done = 0
    flush()
    bar.update(done)
  return before, shift, toward


def _embed(step, sentences: Sequence[np.ndarray], pooling: str, batch_size: int, pad_id: int,
           d_model: int, desc: str | None = None) -> np.ndarray:
  """[len(sentences), d] float32 cell embeddings through the compiled `step`, in order."""
  out = [np.zeros((0, d_model), np.float32)]
  with progress_lib.bar(len(sentences), desc, "cells") as bar:
    for start, stop, tokens, mask in inference.padded_batches(sentences, batch_size, pad_id):
      cells, _ = step(tokens, mask, None)
      out.append(np.asarray(cells[pooling][:stop - start], np.float32))
      bar.update(stop - start)
  return np.concatenate(out)


def perturb(checkpoint_or_loaded_run: str | os.PathLike | rundir.Pretrained,
            adata_or_path, genes: Sequence[str], mode: str, target_column: str | None = None,
            target: str | None = None, batch_size: int = 64,
            gene_map: str | os.PathLike | Mapping[str, str] | None = None,
            gene_column: str | None = None, layer: str | None = None, progress: bool = True,
            skip_unknown: bool = False, soma: soma_reader.SomaOptions | None = None
            ) -> pd.DataFrame:
  """In silico deletion or overexpression of `genes` in every cell (see the module docstring).

  Args:
    checkpoint_or_loaded_run: a run directory, a checkpoints/<step> directory, or a
      `Pretrained` (`pretrained.load_pretrained`).
    adata_or_path: the cells, an AnnData object or a path (.h5ad, 10x folder or .h5, or a SOMA
      experiment, read as `soma` says).
    genes: genes named as the input names them (symbols or Ensembl ids).
    mode: "delete" or "overexpress".
    target_column, target: both or neither; adds `toward_target`.
    gene_map: symbol -> vocabulary id (a table's path or a dict), applied to the
      input's genes and to `genes` alike.
    skip_unknown: perturb the known genes and warn about the others, instead of an error.

  Returns:
    DataFrame, one row per (cell, gene), cells in input order and each cell's
    genes in the given order: obs_name, gene, mode, shift [, toward_target].
  """
  if mode not in MODES:
    raise DataError(f"--mode {mode!r}: use one of {', '.join(MODES)}")
  if (target_column is None) != (target is None):
    raise DataError("--target-column and --target go together: give both (the obs column and "
                    "the value of the target group) or neither")
  if batch_size < 1:
    raise DataError(f"--batch-size {batch_size} must be >= 1")
  model = cell_inputs.load_run(checkpoint_or_loaded_run)
  gene_map = cell_inputs.as_gene_map(gene_map)
  tokens = gene_tokens(genes, model.vocab, gene_map, skip_unknown)
  source = cell_inputs.as_source(adata_or_path, "<AnnData>", layer, gene_column, soma)
  group = None  # everything that can be refused is, before the cells are tokenized
  if target_column is not None:
    group = target_group(cell_inputs.obs_column(source, target_column, "--target-column"),
                         target, source.path)
  pooling = embed.default_pooling(model)
  tokenizer = model.tokenizer(cls=pooling == "cls" or None, gene_map=gene_map)
  cell_inputs.check_gene_overlap(tokenizer, source)
  sentences, obs_names, _ = inference.tokenize_all(tokenizer, source,
                                                   desc="tokenizing" if progress else None)
  _, shift, toward = perturb_sentences(
      model, sentences, list(tokens.values()), mode, pooling=pooling,
      max_len=tokenizer.config.max_len, target_cells=group, batch_size=batch_size,
      desc=mode if progress else None)
  if mode == "delete":
    _warn_unchanged(list(tokens), shift)
  frame = pd.DataFrame({
      "obs_name": np.repeat(np.asarray(obs_names, dtype=str), len(tokens)),
      "gene": np.tile(np.asarray(list(tokens), dtype=object), len(sentences)),
      "mode": mode,
      "shift": shift.reshape(-1)})
  if toward is not None:
    frame[TOWARD] = toward.reshape(-1)
  return frame


def _warn_unchanged(genes: Sequence[str], shift: np.ndarray) -> None:
  """Warns about deleted genes that changed no cell: they are in no sentence ([cells, genes] shift,
  exactly 0 where a sentence stayed as it was)."""
  absent = [g for g, zero in zip(genes, np.all(shift == 0.0, axis=0)) if zero]
  if absent and len(shift):
    _log.warning("%s: in no cell's sentence (not expressed, or ranked below the model's length "
                 "in every cell); deleting %s changed nothing (shift 0)", ", ".join(absent),
                 "it" if len(absent) == 1 else "them")


def _run(args: argparse.Namespace) -> list[str]:
  cell_inputs.check_output(args.output, (".csv",))
  genes = args.genes.split(",")
  result = perturb(args.checkpoint, args.input, genes, args.mode, args.target_column,
                   args.target, args.batch_size, args.gene_map, args.gene_column, args.layer,
                   skip_unknown=args.skip_unknown, soma=soma_reader.options(args))
  cell_inputs.write_csv(result, args.output)
  lines = []
  for gene, rows in result.groupby("gene", sort=False):
    line = (f"{gene}: mean shift {rows['shift'].mean():.4g} over {len(rows):,} cells "
            f"({(rows['shift'] != 0).mean():.0%} changed)")
    if TOWARD in rows:
      line += f", mean toward_target {rows[TOWARD].mean():+.4g}"
    lines.append(line)
  lines.append(f"wrote {len(result):,} rows to {args.output}")
  return lines


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m genemamba_jax.perturb", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_model_arguments(parser, unit="sentences", max_len=None)
  parser.add_argument("--input", required=True, help=cli.CELL_INPUT)
  parser.add_argument("--genes", required=True,
                      help="genes to perturb, comma-separated, named as the input names them")
  parser.add_argument("--mode", required=True, choices=MODES,
                      help="delete: remove the gene's token; overexpress: move (or add) it first")
  parser.add_argument("--output", required=True,
                      help="OUT.csv: obs_name, gene, mode, shift [, toward_target]")
  parser.add_argument("--target-column", default=None,
                      help="obs column defining a target group (with --target): adds toward_target")
  parser.add_argument("--target", default=None,
                      help="the value of --target-column that marks the target group's cells")
  parser.add_argument("--skip-unknown", action="store_true",
                      help="perturb the genes the vocabulary knows, warn about the others "
                           "(default: an error)")
  cli.add_input_arguments(parser)
  parser.set_defaults(run=_run)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(build_parser(), argv)


if __name__ == "__main__":
  sys.exit(main())
