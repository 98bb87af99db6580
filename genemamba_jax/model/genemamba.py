"""GeneMamba: token embedding -> N BiMamba layers -> final RMSNorm -> LM head.

The layers are created stacked (`nnx.vmap`, one leading "layers" axis on every
parameter) and applied with `nnx.scan`, so compile time does not grow with
depth; `config.remat` (default on) keeps only what `config.remat_policy` names of a
layer's activations for the backward and recomputes the rest. The residual
stream is float32; mixers compute in `config.dtype`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from genemamba_jax.model.bimamba import BiMambaLayer, Combine, reverse_valid_index
from genemamba_jax.model.config import REMAT_POLICIES, SAVED_ACTIVATIONS, GeneMambaConfig
from genemamba_jax.model.layers import named


class GeneMambaOutput(NamedTuple):
  hidden: jax.Array  # [B, L, d_model] float32, after the final norm
  logits: jax.Array  # [B, L, vocab_size] float32


class GeneMamba(nnx.Module):
  """The GeneMamba model (paper section 3.2; original `MambaModel`).

  Called as `model(tokens [B, L] int32, mask [B, L] bool)`; mask marks valid
  tokens and must be right-padded (valid tokens first), as the data pipeline
  makes it. `mask=None` means `tokens != config.pad_id`.
  """

  def __init__(self, config: GeneMambaConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, vocab = config.d_model, config.vocab_size
    self.embeddings = nnx.Embed(
        vocab, d, rngs=rngs,
        embedding_init=named(nnx.initializers.normal(0.02), ("vocab", "embed")))

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create_layers(rngs: nnx.Rngs) -> BiMambaLayer:
      return BiMambaLayer(config, rngs=rngs)

    self.layers = create_layers(rngs)
    # The model-level combination: shared by all layers (original code), or, with
    # separate streams, the one place where the two streams meet.
    weighted = config.combine in ("concat", "gate")
    top = config.streams == "separate" or (weighted and config.shared_combine)
    self.aggr = Combine(config, rngs=rngs) if top else None
    self.norm_f = nnx.RMSNorm(
        d, epsilon=config.norm_eps, rngs=rngs,
        scale_init=named(nnx.initializers.ones_init(), ("embed",)))
    if config.tie_embeddings:
      self.lm_head = None
      self.lm_head_bias = (nnx.Param(jnp.zeros((vocab,)), out_sharding=("vocab",),
                                       eager_sharding=False)
                           if config.lm_head_bias else None)
    else:
      self.lm_head = nnx.Linear(
          d, vocab, use_bias=config.lm_head_bias, dtype=jnp.dtype(config.dtype), rngs=rngs,
          kernel_init=named(nnx.initializers.lecun_normal(), ("embed", "vocab")),
          bias_init=named(nnx.initializers.zeros_init(), ("vocab",)))

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> GeneMambaOutput:
    hidden = self.encode(tokens, mask)
    return GeneMambaOutput(hidden, self.logits(hidden))

  def encode(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """tokens [B, L] -> final hidden states [B, L, d_model] (float32).

    The state at t has read both directions, t itself included: what cell and
    gene embeddings use. With separate streams it combines the forward state at
    t (tokens 0..t) and the reverse state at t (tokens t..n-1); for the leak-free
    prediction of the token at t, use `encode_next_gene`.
    """
    if self.config.streams == "separate":
      return self.encode_next_gene(tokens, mask)[1]
    mask = self._mask(tokens, mask)
    x = self.embeddings(tokens).astype(jnp.float32)
    x = self._run_layers(lambda layer, x, reverse_index, shared: layer(x, reverse_index, shared),
                         x, reverse_valid_index(mask))
    return self.norm_f(x).astype(jnp.float32)

  def encode_next_gene(self, tokens: jax.Array, mask: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """Separate streams only, one pass: (next_gene, same_position) states, each [B, L, d].

    next_gene[t] combines the forward state at t - 1 and the reverse state at
    t + 1 (zeros beyond the row's valid tokens), so nothing at t itself is seen:
    it predicts the token at t, leak-free. same_position[t] is `encode`'s.
    """
    if self.config.streams != "separate":
      raise ValueError("encode_next_gene needs GeneMambaConfig(streams='separate')")
    mask = self._mask(tokens, mask)
    x = self.embeddings(tokens).astype(jnp.float32)
    # forward[t] depends on tokens 0..t, backward[t] on tokens t..n-1 (before the final norm).
    forward, backward = self._run_layers(
        lambda layer, streams, reverse_index, _: layer.streams(*streams, reverse_index),
        (x, x), reverse_valid_index(mask))
    previous = jnp.pad(forward, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    following = jnp.pad(backward, ((0, 0), (0, 1), (0, 0)))[:, 1:]
    next_valid = jnp.pad(mask, ((0, 0), (0, 1)))[:, 1:]
    following = jnp.where(next_valid[..., None], following, 0.0)
    next_gene = self.norm_f(self.aggr(previous, following)).astype(jnp.float32)
    return next_gene, self.norm_f(self.aggr(forward, backward)).astype(jnp.float32)

  def _run_layers(self, step, carry, reverse_index: jax.Array):
    """`carry = step(layer, carry, reverse_index, self.aggr)` through every layer, under
    `nnx.scan` (the layers are stacked, so compile time is flat in depth) and `config.remat`.
    `self.aggr` (the original's one combination for all layers) goes in as an argument: NNX
    transforms take modules as arguments, not from a closure."""
    if self.config.remat:
      step = nnx.remat(step, policy=layer_remat_policy(self.config.remat_policy))

    @nnx.scan(in_axes=(0, nnx.Carry, None, None), out_axes=nnx.Carry)
    def run(layer, carry, reverse_index, shared):
      return step(layer, carry, reverse_index, shared)

    return run(self.layers, carry, reverse_index, self.aggr)

  def _mask(self, tokens: jax.Array, mask: jax.Array | None) -> jax.Array:
    return tokens != self.config.pad_id if mask is None else mask.astype(bool)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [B, L, d] -> logits [B, L, vocab] (float32)."""
    dtype = jnp.dtype(self.config.dtype)
    if self.lm_head is not None:
      return self.lm_head(hidden.astype(dtype)).astype(jnp.float32)
    table = self.embeddings.embedding[...].astype(dtype)
    logits = jnp.einsum("bld,vd->blv", hidden.astype(dtype), table).astype(jnp.float32)
    return logits + self.lm_head_bias[...] if self.lm_head_bias is not None else logits


def layer_remat_policy(name: str):
  """A `jax.checkpoint` policy from a `GeneMambaConfig.remat_policy` name.

  "in_proj_and_scan_saveable" saves the activations the mixers tag with
  `checkpoint_name` (`config.SAVED_ACTIVATIONS`); other names are
  `jax.checkpoint_policies` attributes.
  """
  if name == "in_proj_and_scan_saveable":
    return jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATIONS)
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={name!r}; use one of {REMAT_POLICIES}")
  return getattr(jax.checkpoint_policies, name)


def cell_embedding(hidden: jax.Array, mask: jax.Array, pooling: str = "cls") -> jax.Array:
  """[B, L, d] -> [B, d]: the state at position 0 (`cls`) or the masked mean (`mean`)."""
  if pooling == "cls":
    return hidden[:, 0]
  if pooling == "mean":
    weights = mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  raise ValueError(f"pooling={pooling!r}; use 'cls' or 'mean'")


def count_params(config: GeneMambaConfig) -> int:
  """Number of parameters of `GeneMamba(config)`, from shapes only (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: GeneMamba(config, rngs=nnx.Rngs(0)))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
