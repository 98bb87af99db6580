"""The classifier on top of GeneMamba: pooled cell state -> cell type logits."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
from flax import nnx

from genemamba_jax.model import GeneMamba, cell_embedding


class ClassifierHead(nnx.Module):
  """The original's MLP: len(hidden) x [Linear, BatchNorm, Dropout, LeakyReLU] + Linear.

  With `hidden=()` it is a linear probe (one Linear). BatchNorm momentum 0.9
  is PyTorch's default (0.1 there: the weight of the new batch).
  """

  def __init__(self, d_in: int, num_classes: int, hidden: Sequence[int] = (), *,
               dropout: float = 0.5, negative_slope: float = 0.1, rngs: nnx.Rngs):
    dims = [d_in, *hidden]
    self.blocks = nnx.List([
        nnx.Dict(linear=nnx.Linear(a, b, rngs=rngs),
                 norm=nnx.BatchNorm(b, momentum=0.9, epsilon=1e-5, rngs=rngs),
                 dropout=nnx.Dropout(dropout, rngs=rngs))
        for a, b in itertools.pairwise(dims)])
    self.out = nnx.Linear(dims[-1], num_classes, rngs=rngs)
    self.negative_slope = negative_slope

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, d_in] -> logits [B, num_classes]."""
    for block in self.blocks:
      x = block["dropout"](block["norm"](block["linear"](x)))
      x = jax.nn.leaky_relu(x, self.negative_slope)
    return self.out(x)


class CellTypeClassifier(nnx.Module):
  """GeneMamba backbone + pooling + ClassifierHead. `model.train()` / `model.eval()` switch
  dropout and BatchNorm (batch statistics vs running averages)."""

  def __init__(self, backbone: GeneMamba, head: ClassifierHead, pooling: str = "cls"):
    self.backbone, self.head, self.pooling = backbone, head, pooling

  def embed(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """tokens, mask [B, L] -> cell representation [B, d_model]."""
    return cell_embedding(self.backbone.encode(tokens, mask), mask, self.pooling)

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """tokens, mask [B, L] -> logits [B, num_classes]."""
    return self.head(self.embed(tokens, mask))
