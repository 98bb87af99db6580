"""Small pieces shared by the Mamba mixers: PyTorch-like inits, projections,
the causal depthwise conv, the gated RMSNorm and the step-size init.

Every parameter carries logical axis names (`out_sharding` metadata) for later
sharding rules. `eager_sharding=False` keeps them as names only: flax would
otherwise shard a variable at creation and then demand a mesh, so a mixer could
not be built on one CPU device. The trainer
turns names into shardings (`nnx.get_partition_spec` + logical axis rules).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axis names of the model's parameters. None marks a dimension that is
# never sharded (the conv kernel's size-1 input-per-group axis; x_proj's
# [dt_rank | B | C] output, a concatenation no single name describes).
AXIS_NAMES = ("embed", "inner", "state", "heads", "dt_rank", "conv_kernel", "vocab")


def named(init, names: tuple[str | None, ...]):
  """`init` with logical axis names, metadata only (see module docstring)."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def torch_kernel_init():
  """PyTorch's default Linear/Conv weight init: U(+-1/sqrt(fan_in)).

  kaiming_uniform(a=sqrt(5)) has bound sqrt(6 / ((1 + 5) fan_in)), which is
  variance scaling 1/3, fan_in, uniform. Conv kernels [K, 1, C] get fan_in = K,
  as PyTorch's depthwise conv does.
  """
  return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def uniform_init(bound: float):
  """U(-bound, bound): PyTorch's bias init with bound 1/sqrt(fan_in)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def linear(in_features: int, out_features: int, names: tuple, *, use_bias: bool, dtype,
           rngs: nnx.Rngs, kernel_init=None, bias_init=None) -> nnx.Linear:
  """nnx.Linear with float32 params, compute in `dtype`, PyTorch-default init.

  Kernel [in, out] named `names`; bias [out] named `names[1:]`.
  """
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=named(kernel_init or torch_kernel_init(), names),
      bias_init=named(bias_init or uniform_init(in_features ** -0.5), names[1:]),
      rngs=rngs)


def unfused_copy(a: jax.Array) -> jax.Array:
  """a [M, ...] unchanged, computed as identity [M, M] @ a: an exact copy in its own buffer.

  Why: under the layer scan, XLA takes each layer's parameters out of the stacked
  [n_layers, ...] arrays with dynamic slices and fuses those into the elementwise loops
  that read them. For the causal conv's taps (static slices of that dynamic slice) the
  fused conv + silu loop then ran several times slower on CPU, and with it the whole
  Mamba-2 train step (bench/NOTES.md, fourth pass). XLA does not fuse a matmul
  into an elementwise loop (and drops `optimization_barrier`s before fusing), so a matmul
  by the identity gives the taps their own buffer. HIGHEST precision keeps the product
  exact on every backend (1 * x + 0 * y, no TF32 or bf16 passes).
  """
  eye = jnp.eye(a.shape[0], dtype=a.dtype)
  return jnp.tensordot(eye, a, axes=1, precision=jax.lax.Precision.HIGHEST)


class CausalConv1d(nnx.Module):
  """Depthwise causal conv over time: [B, L, C] -> [B, L, C].

  Output t sees inputs t-K+1..t (left zero padding K-1), like mamba_ssm's
  Conv1d(padding=K-1) truncated to the first L outputs. Parameters as
  nnx.Conv's: kernel [K, 1, C] (PyTorch: [C, 1, K]) and bias [C].

  Computed as K shifted multiply-adds rather than a grouped convolution:
  XLA fuses them into one pass, where its CPU grouped convolution (and its
  gradient) ran an order of magnitude slower at these sizes; and under some meshes
  (batch split over part of the mesh, channels not split) XLA returned the grouped
  conv's kernel gradient multiplied by a mesh-axis size. Do
  not switch back to `feature_group_count` without re-running
  tests/train/test_sharding.py.
  """

  def __init__(self, channels: int, kernel_size: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
    self.kernel_size, self.dtype = kernel_size, dtype
    self.kernel = nnx.Param(named(torch_kernel_init(), ("conv_kernel", None, "inner"))(
        rngs.params(), (kernel_size, 1, channels), jnp.float32))
    self.bias = nnx.Param(named(uniform_init(kernel_size ** -0.5), ("inner",))(
        rngs.params(), (channels,), jnp.float32)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    x = x.astype(self.dtype)
    padded = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
    # Own buffer for the taps, not a dynamic slice of the stacked layers' (see unfused_copy).
    kernel = unfused_copy(self.kernel[...][:, 0, :].astype(self.dtype))  # [K, C]
    length = x.shape[1]
    y = sum(padded[:, i:i + length] * kernel[i] for i in range(k))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def causal_conv1d(channels: int, kernel_size: int, *, use_bias: bool, dtype,
                  rngs: nnx.Rngs) -> CausalConv1d:
  """The mixers' depthwise causal conv (see `CausalConv1d`)."""
  return CausalConv1d(channels, kernel_size, use_bias=use_bias, dtype=dtype, rngs=rngs)


def dt_bias_init(key, shape, dt_min: float, dt_max: float, dt_init_floor: float) -> jax.Array:
  """mamba_ssm's step-size bias: inverse softplus of dt ~ logU(dt_min, dt_max).

  dt is floored at dt_init_floor; softplus(bias) == dt at init.
  """
  u = jax.random.uniform(key, shape, jnp.float32)
  dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  dt = jnp.maximum(dt, dt_init_floor)
  # inverse softplus: log(exp(dt) - 1) = dt + log(1 - exp(-dt)), stable for small dt
  return dt + jnp.log(-jnp.expm1(-dt))


class GatedRMSNorm(nnx.Module):
  """mamba_ssm RMSNormGated(norm_before_gate=False): norm(x * silu(z)) * weight.

  The RMS is taken per group of `group_size` channels (Mamba-2: d_inner /
  ngroups), statistics in float32 whatever the compute dtype.
  """

  def __init__(self, features: int, group_size: int, *, eps: float = 1e-5, dtype=jnp.float32):
    if features % group_size:
      raise ValueError(f"features={features} is not a multiple of group_size={group_size}")
    self.group_size = group_size
    self.eps = eps
    self.dtype = dtype
    self.weight = nnx.Param(jnp.ones((features,), jnp.float32), out_sharding=("inner",),
                            eager_sharding=False)

  def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
    """x, z: [..., features] -> [..., features] in self.dtype."""
    h = x.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    g = h.reshape(*h.shape[:-1], -1, self.group_size)
    g = g * jax.lax.rsqrt(jnp.mean(jnp.square(g), axis=-1, keepdims=True) + self.eps)
    return (g.reshape(h.shape) * self.weight[...]).astype(self.dtype)
