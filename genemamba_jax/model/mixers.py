"""Mamba-1 and Mamba-2 mixers (Flax NNX), parameter for parameter mamba_ssm's.

Attribute names, shapes and inits follow mamba_ssm's `Mamba` and `Mamba2`, so a
PyTorch state dict maps one to one (see `convert.py`). Parameters are float32;
matmuls and the conv run in `config.dtype`; dt, A, softplus, the scan state,
the gating and the RMSNorm statistics stay float32, as in mamba_ssm, because
bf16 cannot hold decays close to 1 nor small state increments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from genemamba_jax.model.config import SAVED_ACTIVATIONS, GeneMambaConfig
from genemamba_jax.model.layers import (GatedRMSNorm, causal_conv1d, dt_bias_init, linear,
                                        uniform_init)
from genemamba_jax.ops import selective_scan, ssd


# Activation names the default remat policy saves (config.SAVED_ACTIVATIONS); a no-op otherwise.
_IN_PROJ, _SCAN_OUTPUT = SAVED_ACTIVATIONS


def _f32(a: jax.Array) -> jax.Array:
  return a.astype(jnp.float32)


class Mamba1Mixer(nnx.Module):
  """mamba_ssm `Mamba` (selective scan, per-channel A [d_inner, N]).

  x -> in_proj -> [x, z]; x -> causal conv -> silu -> x_proj -> [dt, B, C];
  dt = softplus(dt_proj(dt)) (bias added in float32); y = scan(x, dt, A, B, C)
  + D * x; out_proj(y * silu(z)).

  Parameters (PyTorch shapes in parentheses):
    in_proj.kernel [d_model, 2 d_inner]     (in_proj.weight [2 d_inner, d_model])
    conv1d.kernel [d_conv, 1, d_inner]      (conv1d.weight [d_inner, 1, d_conv]), conv1d.bias
    x_proj.kernel [d_inner, R + 2N]         (x_proj.weight), no bias
    dt_proj.kernel [R, d_inner], dt_proj.bias [d_inner]
    A_log [d_inner, N], D [d_inner]
    out_proj.kernel [d_inner, d_model]
  with R = config.time_step_rank, N = config.state_size.
  """

  def __init__(self, config: GeneMambaConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, di, n, r = config.d_model, config.d_inner, config.state_size, config.time_step_rank
    self.d_inner, self.d_state, self.dt_rank = di, n, r
    dtype = jnp.dtype(config.dtype)
    self.dtype = dtype

    self.in_proj = linear(d, 2 * di, ("embed", "inner"), use_bias=config.proj_bias,
                          dtype=dtype, rngs=rngs)
    self.conv1d = causal_conv1d(di, config.d_conv, use_bias=config.conv_bias, dtype=dtype,
                                rngs=rngs)
    self.x_proj = linear(di, r + 2 * n, ("inner", None), use_bias=False, dtype=dtype, rngs=rngs)
    # mamba_ssm: dt_proj weight ~ U(+-R^-0.5) (dt_scale 1), bias = softplus^-1(dt).
    cfg = config
    self.dt_proj = linear(
        r, di, ("dt_rank", "inner"), use_bias=True, dtype=dtype, rngs=rngs,
        kernel_init=uniform_init(r ** -0.5),
        bias_init=lambda key, shape, dtype=jnp.float32: dt_bias_init(
            key, shape, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
    # S4D-real init: A = -(1..N) for every channel.
    a = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (di, n))
    self.A_log = nnx.Param(jnp.log(a), out_sharding=("inner", "state"), eager_sharding=False)
    self.D = nnx.Param(jnp.ones((di,), jnp.float32), out_sharding=("inner",),
                       eager_sharding=False)
    self.out_proj = linear(di, d, ("inner", "embed"), use_bias=config.proj_bias, dtype=dtype,
                           rngs=rngs)

  def __call__(self, u: jax.Array) -> jax.Array:
    """u: [B, L, d_model] -> [B, L, d_model] in config.dtype."""
    cfg = self.config
    xz = checkpoint_name(self.in_proj(u.astype(self.dtype)), _IN_PROJ)  # [B, L, 2 d_inner]
    x, z = jnp.split(xz, 2, axis=-1)
    x = jax.nn.silu(self.conv1d(x))  # [B, L, d_inner]
    dt, B, C = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
    # dt_proj's matmul in compute dtype, its bias in float32 before the
    # softplus (mamba_ssm passes it to the scan as delta_bias).
    dt = dt @ self.dt_proj.kernel[...].astype(self.dtype)  # [B, L, d_inner]
    dt = jax.nn.softplus(_f32(dt) + self.dt_proj.bias[...])
    A = -jnp.exp(self.A_log[...])  # [d_inner, N]
    # float32 x keeps y in float32 for the gating, as mamba_ssm's reference does.
    y = selective_scan(_f32(x), dt, A, B, C, self.D[...], backend=cfg.scan_backend,
                       chunk_size=cfg.scan_chunk_size)  # [B, L, d_inner] f32
    y = checkpoint_name(y, _SCAN_OUTPUT)
    y = y * jax.nn.silu(_f32(z))
    return self.out_proj(y.astype(self.dtype))


class Mamba2Mixer(nnx.Module):
  """mamba_ssm `Mamba2` (SSD: scalar A per head, grouped B/C, gated RMSNorm).

  u -> in_proj -> [z, xBC, dt]; xBC -> causal conv -> silu -> [x, B, C];
  dt = softplus(dt + dt_bias); y = ssd(x, dt, A, B, C) + D * x;
  out_proj(norm(y * silu(z))). No dt clamping (mamba_ssm's default
  dt_limit = (0, inf)); RMSNorm groups of d_inner / ngroups channels.

  Parameters, H = nheads, G = ngroups, conv_dim = d_inner + 2 G N:
    in_proj.kernel [d_model, 2 d_inner + 2 G N + H]   (PyTorch weight transposed)
    conv1d.kernel [d_conv, 1, conv_dim], conv1d.bias [conv_dim]
    dt_bias [H], A_log [H], D [H], norm.weight [d_inner]
    out_proj.kernel [d_inner, d_model]
  """

  def __init__(self, config: GeneMambaConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, di, n = config.d_model, config.d_inner, config.state_size
    h, g = config.nheads, config.ngroups
    self.d_inner, self.d_state, self.nheads, self.ngroups = di, n, h, g
    self.headdim = config.headdim
    self.conv_dim = di + 2 * g * n
    dtype = jnp.dtype(config.dtype)
    self.dtype = dtype

    self.in_proj = linear(d, 2 * di + 2 * g * n + h, ("embed", "inner"),
                          use_bias=config.proj_bias, dtype=dtype, rngs=rngs)
    self.conv1d = causal_conv1d(self.conv_dim, config.d_conv, use_bias=config.conv_bias,
                                dtype=dtype, rngs=rngs)
    self.dt_bias = nnx.Param(
        dt_bias_init(rngs.params(), (h,), config.dt_min, config.dt_max, config.dt_init_floor),
        out_sharding=("heads",), eager_sharding=False)
    lo, hi = config.A_init_range
    a = jax.random.uniform(rngs.params(), (h,), jnp.float32, lo, hi)
    self.A_log = nnx.Param(jnp.log(a), out_sharding=("heads",), eager_sharding=False)
    self.D = nnx.Param(jnp.ones((h,), jnp.float32), out_sharding=("heads",),
                       eager_sharding=False)
    self.norm = GatedRMSNorm(di, di // g, eps=config.norm_eps, dtype=dtype)
    self.out_proj = linear(di, d, ("inner", "embed"), use_bias=config.proj_bias, dtype=dtype,
                           rngs=rngs)

  def __call__(self, u: jax.Array) -> jax.Array:
    """u: [B, L, d_model] -> [B, L, d_model] in config.dtype."""
    cfg = self.config
    b, length, _ = u.shape
    di, gn = self.d_inner, self.ngroups * self.d_state
    # [B, L, 2 di + 2 G N + H]
    zxbcdt = checkpoint_name(self.in_proj(u.astype(self.dtype)), _IN_PROJ)
    z, xbc, dt = jnp.split(zxbcdt, [di, di + self.conv_dim], axis=-1)
    xbc = jax.nn.silu(self.conv1d(xbc))  # [B, L, conv_dim]
    x, B, C = jnp.split(xbc, [di, di + gn], axis=-1)
    dt = jax.nn.softplus(_f32(dt) + self.dt_bias[...])  # [B, L, H] f32
    A = -jnp.exp(self.A_log[...])  # [H]
    y = ssd(_f32(x).reshape(b, length, self.nheads, self.headdim), dt, A,
            B.reshape(b, length, self.ngroups, self.d_state),
            C.reshape(b, length, self.ngroups, self.d_state), self.D[...],
            backend=cfg.scan_backend, chunk_size=cfg.scan_chunk_size)  # [B, L, H, P] f32
    y = checkpoint_name(y, _SCAN_OUTPUT)
    y = self.norm(y.reshape(b, length, di), z)  # [B, L, di] in compute dtype
    return self.out_proj(y)
