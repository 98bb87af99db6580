"""The bidirectional layer: one mixer, shared weights, run on a sequence and on its reverse.

Only the valid tokens of a row are reversed: with `n` valid tokens, position
t < n reads position n - 1 - t, and padding stays where it is. For right-padded
rows (what the data pipeline produces) both streams are causal over valid
tokens first, so padding never influences a valid position, in either
direction. The two streams are combined per layer (paper: a learned gate; the
original code: mean by default), then added to the residual stream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from genemamba_jax.model.config import GeneMambaConfig
from genemamba_jax.model.layers import named
from genemamba_jax.model.mixers import Mamba1Mixer, Mamba2Mixer


def reverse_valid_index(mask: jax.Array) -> jax.Array:
  """[B, L] bool -> [B, L] int32 gather index that reverses each row's valid tokens.

  Valid positions map onto the valid positions in reverse order; padding maps
  to itself. The map is its own inverse, so it also undoes the reversal.
  """
  mask = mask.astype(bool)
  positions = jnp.arange(mask.shape[1], dtype=jnp.int32)
  rank = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1  # index among valid tokens
  count = jnp.sum(mask, axis=1, dtype=jnp.int32, keepdims=True)
  # Valid positions in order (padding pushed after them by a stable sort).
  valid_positions = jnp.argsort(~mask, axis=1, stable=True).astype(jnp.int32)
  mirrored = jnp.take_along_axis(valid_positions, jnp.clip(count - 1 - rank, 0), axis=1)
  return jnp.where(mask, mirrored, positions[None, :])


def take_positions(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, L, ...] gathered along L by index [B, L]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


class Combine(nnx.Module):
  """Merges the forward and reverse streams, each [B, L, d] -> [B, L, d].

  mean: (f + b) / 2; sum: f + b; concat: W [f, b] + c; gate: z = sigmoid(W [f, b]
  + c), z * f + (1 - z) * b. W is `aggr` ([2d, d], the original's
  `mamba_mixer.aggr`), present for concat and gate only.
  """

  def __init__(self, config: GeneMambaConfig, *, rngs: nnx.Rngs):
    self.mode = config.combine
    self.dtype = jnp.dtype(config.dtype)
    d = config.d_model
    self.aggr = nnx.Linear(
        2 * d, d, use_bias=True, dtype=self.dtype, rngs=rngs,
        kernel_init=named(nnx.initializers.lecun_normal(), ("embed_pair", "embed")),
        bias_init=named(nnx.initializers.zeros_init(), ("embed",))
    ) if self.mode in ("concat", "gate") else None

  def __call__(self, forward: jax.Array, backward: jax.Array) -> jax.Array:
    if self.mode == "mean":
      return (forward + backward) * 0.5
    if self.mode == "sum":
      return forward + backward
    mixed = self.aggr(jnp.concatenate([forward, backward], axis=-1).astype(self.dtype))
    if self.mode == "concat":
      return mixed
    gate = jax.nn.sigmoid(mixed.astype(jnp.float32))
    return gate * forward + (1.0 - gate) * backward


class BiMambaLayer(nnx.Module):
  """x + combine(mixer(h), reverse(mixer(reverse(h)))), h = x or RMSNorm(x).

  `combine` is this layer's own `Combine` unless the model passes a shared one
  (`shared_combine`, as the original code does). `config.residual` moves the
  residual inside the combination (the original's arithmetic) or drops the
  mixer (the original's public code); see GeneMambaConfig.
  """

  def __init__(self, config: GeneMambaConfig, *, rngs: nnx.Rngs):
    self.norm = (nnx.RMSNorm(config.d_model, epsilon=config.norm_eps, rngs=rngs,
                             scale_init=named(nnx.initializers.ones_init(), ("embed",)))
                 if config.prenorm else None)
    mixer_cls = Mamba1Mixer if config.mixer == "mamba1" else Mamba2Mixer
    self.mixer = mixer_cls(config, rngs=rngs)
    shared = config.shared_combine and config.combine in ("concat", "gate")
    own = config.streams == "mixed" and not shared
    self.combine = Combine(config, rngs=rngs) if own else None
    self.dtype = jnp.dtype(config.dtype)
    self.residual = config.residual

  def __call__(self, x: jax.Array, reverse_index: jax.Array,
               shared_combine: Combine | None = None) -> jax.Array:
    """x: [B, L, d] float32 residual stream; reverse_index: [B, L] from `reverse_valid_index`."""
    combine = self.combine if self.combine is not None else shared_combine
    if self.residual == "identity":  # both directions return x unchanged
      return combine(x, x)
    h = self.norm(x) if self.norm is not None else x
    h = h.astype(self.dtype)
    # One mixer call on [2B, L, d]: both directions share weights and the work.
    both = self.mixer(jnp.concatenate([h, take_positions(h, reverse_index)], axis=0))
    forward, backward = jnp.split(both.astype(jnp.float32), 2, axis=0)
    backward = take_positions(backward, reverse_index)
    if self.residual == "inside":
      return combine(x + forward, x + backward)
    return x + combine(forward, backward)

  def streams(self, forward: jax.Array, backward: jax.Array,
              reverse_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Separate streams: each [B, L, d] float32 gets its own residual update.

    `backward` is kept in sequence order; its mixer reads it reversed, so state
    at t has seen positions t..n-1 only, and `forward` state at t positions 0..t.
    """
    if self.residual == "identity":
      return forward, backward
    hf, hb = forward, backward
    if self.norm is not None:
      hf, hb = self.norm(hf), self.norm(hb)
    both = self.mixer(jnp.concatenate([hf.astype(self.dtype),
                                       take_positions(hb.astype(self.dtype), reverse_index)], axis=0))
    f, b = jnp.split(both.astype(jnp.float32), 2, axis=0)
    return forward + f, backward + take_positions(b, reverse_index)
