"""Tests of the numba CPU selective-scan kernels against the sequential reference:
outputs and gradients w.r.t. all five inputs over several shapes, the kernel's exp,
jit / vmap / concurrent calls, the model end to end, and bad arguments."""

import threading

import jax
import jax.numpy as jnp
import numba
import numpy as np
import pytest

from genemamba_jax.ops import cpu_scan
from genemamba_jax.ops.selective_scan import selective_scan, selective_scan_ref
from tests import oracles

ARG_NAMES = ("x", "dt", "A", "B", "C")

# (b, L, d, N, chunk): L not a multiple of the chunk, batch 1, N = 16 / 64 and an odd N,
# d not a multiple of the backward's channel block (64), a chunk longer than L, L = 1.
CASES = [
    (2, 37, 6, 16, 16),
    (1, 40, 48, 64, 16),
    (2, 23, 70, 5, 8),
    (3, 9, 5, 16, 64),
    (1, 1, 3, 16, 4),
    (2, 130, 17, 16, 64),
]


def _value_and_grads(scan, inputs, w):
  """y and the grads of sum(y * w) w.r.t. the five inputs, jitted."""
  def fn(*args):
    y, vjp = jax.vjp(scan, *args)
    return y, vjp(w)
  return jax.jit(fn)(*inputs)


def _assert_close(actual, expected, err_msg=""):
  """Within 1e-5 of the reference's scale: grads of A and dt sum over up to L * N terms."""
  assert actual.shape == expected.shape and actual.dtype == jnp.float32, err_msg
  scale = max(1.0, float(jnp.max(jnp.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale, err_msg=err_msg)


@pytest.mark.parametrize("b,length,d,n,chunk", CASES)
def test_outputs_and_gradients_match_sequential(b, length, d, n, chunk):
  inputs = oracles.selective_scan_inputs(0, b, length, d, n)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(b, length, d)), jnp.float32)
  y, grads = _value_and_grads(lambda *a: cpu_scan.selective_scan_cpu(*a, chunk), inputs, w)
  y_ref, grads_ref = _value_and_grads(lambda *a: selective_scan_ref(*a, chunk), inputs, w)
  _assert_close(y, y_ref, "y")
  for name, g, g_ref in zip(ARG_NAMES, grads, grads_ref):
    _assert_close(g, g_ref, name)


def test_forward_without_gradient_equals_forward_of_the_gradient_pass():
  """The primal call (no states saved) and the vjp's forward are the same numbers."""
  inputs = oracles.selective_scan_inputs(2, 2, 29, 7, 16)
  y = jax.jit(lambda *a: cpu_scan.selective_scan_cpu(*a, 8))(*inputs)
  y_vjp, _ = jax.vjp(lambda *a: cpu_scan.selective_scan_cpu(*a, 8), *inputs)
  np.testing.assert_array_equal(y, y_vjp)


def test_long_decays_and_tiny_steps_stay_finite():
  """dt * A down to -1e4 (decay underflows to 0) and dt ~ 1e-6 (decay ~ 1)."""
  x, dt, a, b, c = oracles.selective_scan_inputs(3, 1, 50, 4, 16)
  dt = dt.at[:, ::2].set(1e-6).at[:, 1::7].set(50.0)
  a = a.at[0].set(-200.0)
  w = jnp.ones_like(x)
  y, grads = _value_and_grads(lambda *args: cpu_scan.selective_scan_cpu(*args, 16),
                              (x, dt, a, b, c), w)
  y_ref, grads_ref = _value_and_grads(lambda *args: selective_scan_ref(*args, 16), (x, dt, a, b, c), w)
  _assert_close(y, y_ref, "y")
  for name, g, g_ref in zip(ARG_NAMES, grads, grads_ref):
    assert bool(jnp.all(jnp.isfinite(g))), name
    _assert_close(g, g_ref, name)


@numba.njit
def _exp_all(values):
  out = np.empty_like(values)
  for i in range(values.shape[0]):
    out[i] = cpu_scan._exp(values[i])
  return out


def test_kernel_exp_is_within_a_few_ulp_of_float64_exp():
  values = np.concatenate([
      -np.geomspace(1e-12, 87.0, 200_000), np.linspace(-87.0, 88.0, 200_000),
      [0.0, -0.0, -0.34657359, 0.34657359, -87.0, 88.0]]).astype(np.float32)
  got = _exp_all(values)
  want = np.exp(values.astype(np.float64))
  ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
  assert np.max(np.abs(got - want) / ulp) <= 5.0
  # Below the clamp the result is exp(-87), not a denormal or garbage; above, exp(88).
  clamped = _exp_all(np.array([-1e4, -90.0, 1e4], np.float32))
  np.testing.assert_allclose(clamped, np.exp(np.array([-87.0, -87.0, 88.0])), rtol=1e-6)


def test_vmap_and_concurrent_calls():
  """A vmapped call (one kernel call per element) and calls from two threads at once."""
  stacked = [jnp.stack([a, a * 0.5]) for a in oracles.selective_scan_inputs(4, 2, 21, 6, 16)]
  stacked[2] = -jnp.abs(stacked[2])
  y = jax.vmap(lambda *a: cpu_scan.selective_scan_cpu(*a, 8))(*stacked)
  for i in range(2):
    _assert_close(y[i], selective_scan_ref(*(a[i] for a in stacked), 8))

  inputs = oracles.selective_scan_inputs(5, 4, 64, 32, 16)
  fn = jax.jit(jax.grad(lambda *a: jnp.sum(cpu_scan.selective_scan_cpu(*a, 16) ** 2),
                        argnums=(0, 1, 2, 3, 4)))
  expected = fn(*inputs)
  results = [None] * 4

  def run(i):
    results[i] = fn(*inputs)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for got in results:
    for g, e in zip(got, expected):
      np.testing.assert_array_equal(g, e)


def test_selective_scan_numba_backend_adds_d():
  x, dt, a, b, c = oracles.selective_scan_inputs(6, 2, 19, 12, 16)
  d = jnp.linspace(0.5, 1.5, 12)
  _assert_close(selective_scan(x, dt, a, b, c, d, backend="numba", chunk_size=8),
                selective_scan(x, dt, a, b, c, d, backend="sequential"))


@pytest.mark.slow  # over ~10 s on 2 cores
def test_grad_through_a_genemamba_with_the_kernel_matches_the_reference():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from genemamba_jax.model import GeneMamba, GeneMambaConfig  # pylint: disable=g-import-not-at-top

  def value_and_grads(backend, streams):
    config = GeneMambaConfig(vocab_size=40, d_model=16, n_layers=2, mixer="mamba1",
                             scan_backend=backend, scan_chunk_size=8, streams=streams)
    graphdef, params = nnx.split(GeneMamba(config, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (2, 21), 1, 40)
    mask = jnp.arange(21)[None] < jnp.array([[21], [13]])  # one padded row

    def loss(params):
      out = nnx.merge(graphdef, params)(tokens, mask)
      return jnp.sum(jnp.where(mask[..., None], out.logits, 0.0) ** 2) / 100

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return value, jax.tree.leaves(grads)

  for streams in ("mixed", "separate"):
    ref_value, ref_grads = value_and_grads("sequential", streams)
    value, grads = value_and_grads("numba", streams)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
      _assert_close(g, r, streams)


@pytest.mark.parametrize("chunk", [0, -3, 2.5])
def test_bad_chunk_size_is_refused(chunk):
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    cpu_scan.selective_scan_cpu(*oracles.selective_scan_inputs(7, 1, 4, 3, 4), chunk)
