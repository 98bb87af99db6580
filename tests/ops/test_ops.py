"""Tests of genemamba_jax.ops: every backend vs the sequential reference, the
reference vs a numpy loop, bf16 handling, chunked memory, dispatch errors."""

import functools
import importlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from genemamba_jax.ops import BACKENDS, selective_scan, ssd
from tests.conftest import fast_first

# The package re-exports the functions under the submodules' names, so the
# module itself comes from importlib.
selective_scan_module = importlib.import_module(
    "genemamba_jax.ops.selective_scan")

ARG_NAMES = ("x", "dt", "A", "B", "C", "D")
# Tests are dominated by XLA:CPU compile time; LLVM at -O0 roughly halves it
# and changes no float32 semantics (buffer assignment is decided before it).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled(fn, *args):
  """jit(fn) compiled for args' shapes/dtypes with FAST_COMPILE."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def mamba1_inputs(seed, b, length, d, n, dtype=jnp.float32, dt_range=(1e-3, 0.1),
                  a_range=(0.5, 8.0)):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.normal(size=(b, length, d)), dtype),
          jnp.asarray(r.uniform(*dt_range, (b, length, d)), jnp.float32),
          jnp.asarray(-r.uniform(*a_range, (d, n)), jnp.float32),
          jnp.asarray(r.normal(size=(b, length, n)), dtype),
          jnp.asarray(r.normal(size=(b, length, n)), dtype),
          jnp.asarray(r.normal(size=(d,)), jnp.float32))


def mamba2_inputs(seed, b, length, h, p, g, n, dtype=jnp.float32,
                  dt_range=(1e-3, 0.1), a_range=(1.0, 16.0)):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.normal(size=(b, length, h, p)), dtype),
          jnp.asarray(r.uniform(*dt_range, (b, length, h)), jnp.float32),
          jnp.asarray(-r.uniform(*a_range, (h,)), jnp.float32),
          jnp.asarray(r.normal(size=(b, length, g, n)) / np.sqrt(n), dtype),
          jnp.asarray(r.normal(size=(b, length, g, n)), dtype),
          jnp.asarray(r.normal(size=(h,)), jnp.float32))


# (b, L, d, N, chunk): L not a multiple of the chunk, batch 1, N = 16 and 64.
MAMBA1_CASES = [(2, 37, 6, 16, 8), (1, 40, 4, 64, 16)]
# (b, L, H, P, G, N, chunk): G > 1, P > 1.
MAMBA2_CASES = [(2, 37, 4, 3, 2, 16, 8), (1, 40, 2, 4, 1, 64, 16)]


def _value_and_vjp(op, backend, chunk_size, inputs, w):
  """y and the grads of sum(y * w) w.r.t. all six inputs."""
  def fn(*args):
    *inputs, w = args
    f = lambda *a: op(*a, backend=backend, chunk_size=chunk_size)
    y, vjp = jax.vjp(f, *inputs)
    return y, vjp(w)
  return compiled(fn, *inputs, w)(*inputs, w)


def _check_against_sequential(op, inputs, chunk_size):
  # y has x's shape; a random cotangent exercises every output element.
  w = jnp.asarray(np.random.default_rng(99).normal(size=inputs[0].shape),
                  jnp.float32)
  y_ref, g_ref = _value_and_vjp(op, "sequential", chunk_size, inputs, w)
  for backend in BACKENDS[1:]:
    y, g = _value_and_vjp(op, backend, chunk_size, inputs, w)
    # Outputs are O(1): absolute 1e-5. Gradients of A / D sum over batch*L
    # terms, so their tolerance scales with their magnitude.
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5, err_msg=backend)
    for name, gi, gr in zip(ARG_NAMES, g, g_ref):
      scale = max(1.0, float(jnp.max(jnp.abs(gr))))
      np.testing.assert_allclose(gi, gr, atol=1e-5 * scale, rtol=1e-5,
                                 err_msg=f"{backend} d{name}")


@fast_first("case", MAMBA1_CASES)
def test_selective_scan_backends_agree(case):
  b, length, d, n, chunk = case
  _check_against_sequential(selective_scan, mamba1_inputs(0, b, length, d, n),
                            chunk)


def test_selective_scan_chunked_inner_variants():
  """Both scans inside a chunk (the platform picks one) match sequential."""
  b, length, d, n, chunk = MAMBA1_CASES[0]
  inputs = mamba1_inputs(10, b, length, d, n)
  w = jnp.asarray(np.random.default_rng(98).normal(size=inputs[0].shape))
  def op(*a, backend, chunk_size, inner):
    del backend
    x, dt, A, B, C, D = a
    return selective_scan_module._chunked(x, dt, A, B, C, chunk_size,
                                          inner=inner) + D * x
  y_ref, g_ref = _value_and_vjp(selective_scan, "sequential", chunk, inputs, w)
  for inner in ("sequential", "associative"):
    y, g = _value_and_vjp(functools.partial(op, inner=inner), "chunked",
                          chunk, inputs, w)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5, err_msg=inner)
    for name, gi, gr in zip(ARG_NAMES, g, g_ref):
      scale = max(1.0, float(jnp.max(jnp.abs(gr))))
      np.testing.assert_allclose(gi, gr, atol=1e-5 * scale, rtol=1e-5,
                                 err_msg=f"{inner} d{name}")


@fast_first("case", MAMBA2_CASES)
def test_ssd_backends_agree(case):
  b, length, h, p, g, n, chunk = case
  _check_against_sequential(ssd, mamba2_inputs(1, b, length, h, p, g, n), chunk)


@pytest.mark.parametrize("op", ["selective_scan", "ssd"])
def test_no_d_default_backend_and_one_short_chunk(op):
  """D=None, the default backend, and a chunk longer than the whole sequence."""
  if op == "selective_scan":
    fn, inputs = selective_scan, mamba1_inputs(2, 1, 13, 3, 16)[:5]
  else:
    fn, inputs = ssd, mamba2_inputs(2, 1, 13, 2, 2, 1, 16)[:5]
  def all_backends(*a):
    return (fn(*a), fn(*a, backend="sequential"),
            fn(*a, backend="chunked", chunk_size=64))
  y_default, y_ref, y_chunked = compiled(all_backends, *inputs)(*inputs)
  np.testing.assert_allclose(y_default, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_chunked, y_ref, atol=1e-5, rtol=1e-5)


# --- the reference itself vs a plain numpy loop (float64) ---------------------

def numpy_selective_scan(x, dt, A, B, C, D):
  x, dt, A, B, C, D = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D))
  b, length, d = x.shape
  y = np.zeros((b, length, d))
  for i in range(b):
    h = np.zeros(A.shape)
    for t in range(length):
      for c in range(d):
        for s in range(A.shape[1]):
          h[c, s] = (np.exp(dt[i, t, c] * A[c, s]) * h[c, s]
                     + dt[i, t, c] * x[i, t, c] * B[i, t, s])
        y[i, t, c] = np.dot(h[c], C[i, t]) + D[c] * x[i, t, c]
  return y


def numpy_ssd(x, dt, A, B, C, D):
  x, dt, A, B, C, D = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D))
  b, length, n_heads, p = x.shape
  g, n = B.shape[2:]
  y = np.zeros(x.shape)
  for i in range(b):
    for hd in range(n_heads):
      grp = hd // (n_heads // g)
      h = np.zeros((p, n))
      for t in range(length):
        h = (np.exp(dt[i, t, hd] * A[hd]) * h
             + dt[i, t, hd] * np.outer(x[i, t, hd], B[i, t, grp]))
        y[i, t, hd] = h @ C[i, t, grp] + D[hd] * x[i, t, hd]
  return y


def test_sequential_matches_numpy_loop():
  inputs = mamba1_inputs(3, 2, 9, 3, 4)
  np.testing.assert_allclose(selective_scan(*inputs, backend="sequential"),
                             numpy_selective_scan(*inputs), atol=1e-5, rtol=1e-5)
  inputs = mamba2_inputs(4, 2, 9, 4, 2, 2, 3)
  np.testing.assert_allclose(ssd(*inputs, backend="sequential"),
                             numpy_ssd(*inputs), atol=1e-5, rtol=1e-5)


# --- bfloat16 -----------------------------------------------------------------

def _bf16(inputs):
  """x, B, C to bf16 (the compute dtype); dt, A, D stay float32."""
  x, dt, A, B, C, D = inputs
  return (x.astype(jnp.bfloat16), dt, A, B.astype(jnp.bfloat16),
          C.astype(jnp.bfloat16), D)


def _up(inputs):
  return tuple(a.astype(jnp.float32) for a in inputs)


# Long sequences whose decay exp(dt * A) ~ 1 - 1e-4 rounds to exactly 1.0 in
# bf16 (spacing 2^-8 below 1) and whose state sums ~2000 small increments: a
# bf16 state would be visibly wrong (no decay at all, increments swallowed).
LONG_M1 = dict(b=1, length=2048, d=4, n=16, dt_range=(0.005, 0.02),
               a_range=(0.005, 0.02))
LONG_M2 = dict(b=1, length=2048, h=2, p=2, g=1, n=16, dt_range=(0.005, 0.02),
               a_range=(0.005, 0.02))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["selective_scan", "ssd"])
def test_bf16_state_stays_float32(op, backend):
  if op == "selective_scan":
    fn, inputs = selective_scan, mamba1_inputs(5, **LONG_M1)
  else:
    fn, inputs = ssd, mamba2_inputs(6, **LONG_M2)
  run = functools.partial(fn, backend=backend, chunk_size=64)
  low = _bf16(inputs)
  y = compiled(run, *low)(*low)
  assert y.dtype == jnp.bfloat16
  # Same (bf16-rounded) inputs in float32: everything inside is float32 either
  # way, so the only difference allowed is the final rounding of y to bf16,
  # at most half a bf16 ulp = 2^-9 relative; 2^-8 leaves room for fusion order.
  run = compiled(run, *inputs)
  y32 = run(*_up(low))
  np.testing.assert_allclose(np.asarray(y, np.float32), y32,
                             rtol=2.0**-8, atol=1e-6)
  # Against the unrounded float32 inputs: x, B, C each carry <= 2^-9 relative
  # rounding and y is linear in each, so ~3 * 2^-9 = 0.6% relative in norm is
  # the expected scale; 2% bounds it without flakiness.
  y_full = run(*inputs)
  err = np.linalg.norm(np.asarray(y, np.float32) - y_full) / np.linalg.norm(y_full)
  assert err < 2e-2, err


def _all_avals(jaxpr):
  """Every output aval in a jaxpr, sub-jaxprs (scan, checkpoint, pjit) included."""
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield eqn.primitive.name, v.aval
    for param in eqn.params.values():
      subs = param if isinstance(param, (tuple, list)) else (param,)
      for sub in subs:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _all_avals(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _all_avals(sub)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_jaxpr_has_no_bf16_state(backend):
  """No bf16 value shaped like a state ([..., d, N] / [..., P, N]) in fwd+bwd."""
  cases = [(selective_scan, mamba1_inputs(7, 2, 24, 5, 16), (5, 16)),
           (ssd, mamba2_inputs(8, 2, 24, 4, 3, 2, 16), (3, 16))]
  for fn, inputs, state_tail in cases:
    def loss(*a, fn=fn):
      y = fn(*a, backend=backend, chunk_size=8)
      return jnp.sum(y.astype(jnp.float32))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*_bf16(inputs))
    avals = list(_all_avals(jaxpr.jaxpr))
    assert avals
    bad = [(prim, a) for prim, a in avals
           if getattr(a, "dtype", None) == jnp.bfloat16
           and tuple(a.shape[-2:]) == state_tail]
    assert not bad, bad[:5]
    for prim, a in avals:  # any scan carry / stacked state is float32
      if prim == "scan" and tuple(a.shape[-2:]) == state_tail:
        assert a.dtype == jnp.float32, (prim, a)


# --- memory -------------------------------------------------------------------

def _grad_temp_bytes(fn, shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  loss = lambda *a: jnp.sum(fn(*a))
  grad = compiled(jax.grad(loss, argnums=tuple(range(5))), *args)
  return grad.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # over ~5 s on 2 cores
@pytest.mark.parametrize("op", ["selective_scan", "ssd"])
def test_chunked_memory_does_not_hold_full_state(op):
  """fwd+bwd temp memory: associative holds several [b, L, d, N] tensors;
  chunked holds none, and doubling N only adds its chunk boundary states
  (L / chunk of a full tensor) and one chunk's work, not a B*L*d*N term."""
  b, length, chunk, d = 2, 1024, 16, 32
  def temp(backend, n):
    if op == "selective_scan":
      shapes = [(b, length, d), (b, length, d), (d, n), (b, length, n),
                (b, length, n)]
      fn = selective_scan
    else:  # H = 4 heads of P = 8: d = H * P
      shapes = [(b, length, 4, 8), (b, length, 4), (4,), (b, length, 1, n),
                (b, length, 1, n)]
      fn = ssd
    return _grad_temp_bytes(
        functools.partial(fn, backend=backend, chunk_size=chunk), shapes)
  full = lambda n: b * length * d * n * 4  # one float32 [b, L, d, N] tensor
  assoc, chunked16, chunked32 = (temp("associative", 32), temp("chunked", 16),
                                 temp("chunked", 32))
  sizes = dict(assoc=assoc, chunked16=chunked16, chunked32=chunked32,
               full32=full(32))
  assert assoc > 2 * full(32), sizes  # the measure does see full states
  # N doubled adds full(16) per [b, L, d, N] tensor held; chunked must add
  # well under one (observed: ~0.1-0.3 of one).
  assert chunked32 - chunked16 < 0.5 * full(16), sizes
  assert chunked32 < assoc / 4, sizes


# --- dispatch -----------------------------------------------------------------

@pytest.mark.parametrize("fn,inputs", [
    (selective_scan, mamba1_inputs(0, 1, 4, 2, 4)),
    (ssd, mamba2_inputs(0, 1, 4, 2, 2, 1, 4)),
])
def test_unknown_backend_raises(fn, inputs):
  with pytest.raises(ValueError, match="associative, auto, chunked, numba, pallas, sequential"):
    fn(*inputs, backend="cuda")
  with pytest.raises(ValueError, match="chunk_size"):
    fn(*inputs, backend="chunked", chunk_size=0)
