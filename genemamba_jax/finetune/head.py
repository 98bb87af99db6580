"""The classifier on top of GeneMamba: pooled cell state -> cell type logits."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from genemamba_jax.model import GeneMamba, cell_embedding


def pooled_width(d_model: int, pooling: str) -> int:
  """Width of the pooled cell representation: 2 d_model for cls_mean, else d_model."""
  return 2 * d_model if pooling == "cls_mean" else d_model


class ClassifierHead(nnx.Module):
  """The original's MLP: len(hidden) x [Linear, BatchNorm, Dropout, LeakyReLU] + Linear.

  With `hidden=()` it is a linear probe: Dropout then one Linear. BatchNorm
  momentum 0.9 is PyTorch's default (0.1 there: the weight of the new batch);
  its running statistics are nnx.BatchStat, not parameters. Dropout draws from
  the key passed to `__call__` (the training step's), so the head holds no RNG state.
  """

  def __init__(self, d_in: int, num_classes: int, hidden: Sequence[int] = (), *,
               dropout: float = 0.5, negative_slope: float = 0.1, rngs: nnx.Rngs):
    dims = [d_in, *hidden]
    self.blocks = nnx.List([
        nnx.Dict(linear=nnx.Linear(a, b, rngs=rngs),
                 norm=nnx.BatchNorm(b, momentum=0.9, epsilon=1e-5, rngs=rngs),
                 dropout=nnx.Dropout(dropout))
        for a, b in itertools.pairwise(dims)])
    self.input_dropout = nnx.Dropout(0.0 if hidden else dropout)
    self.out = nnx.Linear(dims[-1], num_classes, rngs=rngs)
    self.negative_slope = negative_slope

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """x [B, d_in] -> logits [B, num_classes]; `rng` is needed in train mode with dropout."""
    keys = list(jax.random.split(rng, len(self.blocks) + 1)) if rng is not None else None
    x = self.input_dropout(x, rngs=keys.pop() if keys else None)
    for block in self.blocks:
      x = block["norm"](block["linear"](x))
      x = block["dropout"](x, rngs=keys.pop() if keys else None)
      x = jax.nn.leaky_relu(x, self.negative_slope)
    return self.out(x)


class CellTypeClassifier(nnx.Module):
  """GeneMamba backbone + pooling + ClassifierHead. `model.train()` / `model.eval()` switch
  dropout and BatchNorm (batch statistics vs running averages)."""

  def __init__(self, backbone: GeneMamba, head: ClassifierHead, pooling: str = "mean"):
    self.backbone, self.head, self.pooling = backbone, head, pooling

  def embed(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """tokens, mask [B, L] -> cell representation [B, pooled_width(d_model, pooling)]."""
    hidden = self.backbone.encode(tokens, mask)
    if self.pooling == "cls_mean":
      return jnp.concatenate([cell_embedding(hidden, mask, "cls"),
                              cell_embedding(hidden, mask, "mean")], axis=-1)
    return cell_embedding(hidden, mask, self.pooling)

  def __call__(self, tokens: jax.Array, mask: jax.Array, rng: jax.Array | None = None
               ) -> jax.Array:
    """tokens, mask [B, L] -> logits [B, num_classes]."""
    return self.head(self.embed(tokens, mask), rng)
