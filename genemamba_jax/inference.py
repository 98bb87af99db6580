"""Batched, deterministic inference over tokenized cells: cell embeddings, gene contexts, logits.

Cells are taken in input order, `batch_size` at a time; each batch is padded
to a power-of-two length bucket (at most a few compiled shapes) and a short last
batch is filled with empty rows, so every call sees one of a few fixed shapes.
Results do not depend on the batch size beyond float rounding (the model is
padding invariant; rows never mix).

Every local device works: the parameters are replicated and each batch's rows
are split over the devices (`local_mesh`), a batch padded with empty rows to a
multiple of the device count. Results equal one device's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from genemamba_jax import progress
from genemamba_jax.model import GeneMamba, cell_embedding

POOLINGS = ("cls", "mean")


def bucket_length(longest: int, cap: int, minimum: int = 16) -> int:
  """The padded length for a batch whose longest row has `longest` tokens: a power of two, <= cap."""
  length = minimum
  while length < longest:
    length *= 2
  return max(min(length, cap), 1)


def padded_batches(sentences: Sequence[np.ndarray], batch_size: int, pad_id: int,
                   ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
  """Yields (start, stop, tokens [batch_size, L] int32, mask [batch_size, L] bool) in input order.

  Rows stop - start .. batch_size - 1 of the last batch are empty (all padding).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  cap = bucket_length(max((len(s) for s in sentences), default=1), 1 << 30)
  for start in range(0, len(sentences), batch_size):
    rows = sentences[start:start + batch_size]
    length = bucket_length(max(max(len(s) for s in rows), 1), cap)
    tokens = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), bool)
    for i, row in enumerate(rows):
      tokens[i, :len(row)] = row
      mask[i, :len(row)] = True
    yield start, start + len(rows), tokens, mask


def local_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh ("rows",) over `devices` (default: all of this process's)."""
  return Mesh(np.asarray(list(devices or jax.local_devices())), ("rows",))


def batch_step(fn: Callable, model: nnx.Module,
               devices: Sequence[jax.Device] | None = None) -> Callable:
  """`fn(model, tokens, mask, carry) -> (per-row outputs, carry)`, jitted over the split model.

  Returns `step(tokens [B, L], mask [B, L], carry) -> (outputs [B, ...], carry)`:
  the model replicated on `devices` (default: every local device), the rows split
  over them; B is padded with empty rows (mask False) to a multiple of the device
  count and the outputs cut back to B rows. The carry is replicated.
  """
  graphdef, state = nnx.split(model)
  mesh = local_mesh(devices)
  rows, whole = NamedSharding(mesh, P("rows")), NamedSharding(mesh, P())
  state = jax.device_put(state, whole)

  @functools.partial(jax.jit, in_shardings=(whole, rows, rows, whole))
  def run(state, tokens, mask, carry):
    return fn(nnx.merge(graphdef, state), tokens, mask, carry)

  def step(tokens, mask, carry):
    n = tokens.shape[0]
    extra = -n % mesh.size
    if extra:
      tokens = np.concatenate([np.asarray(tokens), np.zeros((extra,) + tokens.shape[1:],
                                                            np.asarray(tokens).dtype)])
      mask = np.concatenate([np.asarray(mask), np.zeros((extra,) + mask.shape[1:], bool)])
    outputs, carry = run(state, tokens, mask, carry)
    if extra:
      outputs = jax.tree.map(lambda x: x[:n], outputs)
    return outputs, carry

  step.mesh = mesh
  return step


def _map_batches(fn: Callable, model: GeneMamba, sentences: Sequence[np.ndarray], batch_size: int,
                 desc: str | None, carry=None, devices=None):
  """Runs `batch_step(fn, model)` over all cells (`map_batches`)."""
  return map_batches(batch_step(fn, model, devices), sentences, batch_size, model.config.pad_id,
                     desc, carry)


def map_batches(step: Callable, sentences: Sequence[np.ndarray], batch_size: int, pad_id: int,
                desc: str | None, carry=None):
  """Runs a `batch_step` over all cells, in input order (a step made once can serve many calls
  without compiling again).

  Returns ([per-batch outputs, padding rows dropped, as numpy], final carry).
  """
  batch_size = -(-batch_size // step.mesh.size) * step.mesh.size  # no padding rows to split
  outputs = []
  # `with`: an error mid-way closes the bar before the command prints it.
  with progress.bar(len(sentences), desc, "cells") as bar:
    for start, stop, tokens, mask in padded_batches(sentences, batch_size, pad_id):
      rows, carry = step(tokens, mask, carry)
      outputs.append(jax.tree.map(lambda x, n=stop - start: np.asarray(x[:n]), rows))
      bar.update(stop - start)
  return outputs, carry


@dataclasses.dataclass
class Embeddings:
  """What one pass over the cells gives."""
  cells: dict[str, np.ndarray]  # pooling -> [cells, d_model] float32
  gene_sums: np.ndarray | None = None  # [vocab, d_model] float64: sum of final states per token
  gene_counts: np.ndarray | None = None  # [vocab] int64: positions summed

  def gene_context(self, min_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [G], mean final state [G, d]) of tokens seen at least `min_count` times."""
    ids = np.flatnonzero(self.gene_counts >= max(min_count, 1))
    return ids, (self.gene_sums[ids] / self.gene_counts[ids, None]).astype(np.float32)


def embedding_fn(poolings: Sequence[str], vocab_size: int, special_ids: Sequence[int] = ()
                 ) -> Callable:
  """The per-batch work of `embed_sentences`, for `batch_step`.

  `fn(model, tokens, mask, carry) -> ({pooling: [B, d]}, carry)`; carry None,
  or (sums [V, d], counts [V]) to add each token's final states to.
  """
  specials = jnp.asarray(list(special_ids) or [-1], jnp.int32)

  def fn(model, tokens, mask, carry):
    hidden = model.encode(tokens, mask)
    cells = {p: cell_embedding(hidden, mask, p) for p in poolings}
    if carry is None:
      return cells, None
    sums, counts = carry
    genes = mask & ~jnp.isin(tokens, specials)
    # Out-of-range ids (masked positions) are dropped by segment_sum.
    ids = jnp.where(genes, tokens, vocab_size).reshape(-1)
    sums = sums + jax.ops.segment_sum(hidden.reshape(-1, hidden.shape[-1]), ids, vocab_size)
    counts = counts + jax.ops.segment_sum(jnp.ones_like(ids), ids, vocab_size)
    return cells, (sums, counts)

  return fn


def embed_sentences(model: GeneMamba, sentences: Sequence[np.ndarray], *,
                    poolings: Sequence[str] = ("cls",), batch_size: int = 64,
                    gene_context: bool = False, special_ids: Sequence[int] = (),
                    desc: str | None = "embedding",
                    devices: Sequence[jax.Device] | None = None) -> Embeddings:
  """Cell embeddings (and optionally context-averaged gene states) of tokenized cells.

  Args:
    model: the backbone.
    sentences: token arrays (cells in order); `cls` pooling needs <cls> first in each.
    poolings: any of "cls" (final state at position 0) and "mean" (masked mean over tokens).
    batch_size: cells per call.
    gene_context: also sum the final state at every position per token id.
    special_ids: tokens left out of the gene sums (<cls>, <eos>, ...).
    desc: progress bar label; None hides it.
    devices: where the batches run, split by rows (default: every local device).
  """
  for pooling in poolings:
    if pooling not in POOLINGS:
      raise ValueError(f"pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
  vocab = model.config.vocab_size
  fn = embedding_fn(poolings, vocab, special_ids)
  carry = None
  if gene_context:  # float32 per batch, accumulated across batches in float32 on device
    carry = (jnp.zeros((vocab, model.config.d_model), jnp.float32), jnp.zeros((vocab,), jnp.int32))
  outputs, carry = _map_batches(fn, model, sentences, batch_size, desc, carry, devices)
  empty = np.zeros((0, model.config.d_model), np.float32)
  out = Embeddings({p: np.concatenate([empty] + [o[p] for o in outputs]) for p in poolings})
  if carry is not None:
    out.gene_sums = np.asarray(carry[0], np.float64)
    out.gene_counts = np.asarray(carry[1], np.int64)
  return out


def predict_tokens(model: GeneMamba, sentences: Sequence[np.ndarray], *, protocol: str,
                   batch_size: int = 32, desc: str | None = None,
                   devices: Sequence[jax.Device] | None = None) -> list[np.ndarray]:
  """Argmax token per position of each cell, under one reconstruction protocol.

  protocol:
    "same_position": argmax of the logits of the final state at t (the
      original's protocol; the state at t has seen token t, so this can copy).
    "next_gene": argmax of the leak-free prediction of position t from
      positions < t and > t (needs a model trained with separate streams).
  Returns one [len(cell)] int32 array per cell. `devices`: as for `embed_sentences`.
  """
  if protocol not in ("same_position", "next_gene"):
    raise ValueError(f"protocol {protocol!r}; use 'same_position' or 'next_gene'")
  if protocol == "next_gene" and model.config.streams != "separate":
    raise ValueError("the leak-free next_gene protocol needs a model trained with the next_gene "
                     "objective (separate streams); this one mixes the directions in every layer")

  def fn(model, tokens, mask, carry):
    hidden = (model.encode_next_gene(tokens, mask)[0] if protocol == "next_gene"
              else model.encode(tokens, mask))
    return jnp.argmax(model.logits(hidden), axis=-1).astype(jnp.int32), carry

  outputs, _ = _map_batches(fn, model, sentences, batch_size, desc, devices=devices)
  rows = [row for batch in outputs for row in batch]
  return [row[:len(s)] for row, s in zip(rows, sentences)]


def tokenize_all(tokenizer, source, columns: Sequence[str] = (), desc: str | None = "tokenizing"
                 ) -> tuple[list[np.ndarray], np.ndarray, pd.DataFrame]:
  """Every cell of `source`, in order: (sentences, obs_names [cells], obs with `columns`).

  `tokenizer` must keep every cell (min_genes=0, primary_only=False, as
  `Pretrained.tokenizer` makes it), so row i of any output is cell i of the input.
  """
  sentences, names, frames = [], [], []
  with progress.bar(source.n_cells, desc, "cells") as bar:
    for cells in tokenizer.tokenize_source(source, columns=columns):
      sentences.extend(cells.sentences())
      names.append(cells.obs_names)
      frames.append(cells.obs)
      bar.update(len(cells))
  obs_names = np.concatenate(names) if names else np.zeros((0,), str)
  if len(obs_names) != source.n_cells:  # would misalign rows with the input's cells
    raise RuntimeError(f"{source.path}: {len(obs_names)} of {source.n_cells} cells tokenized")
  obs = pd.concat(frames) if frames else pd.DataFrame(columns=list(columns))
  return sentences, obs_names, obs.set_axis(obs_names, axis=0)
