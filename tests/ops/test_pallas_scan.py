"""Tests of the Pallas selective scan (interpret mode on CPU) against the
sequential reference: outputs and gradients w.r.t. all five inputs, padding of
L / d / N, the availability probe, and that the kernels lower to Triton IR."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genemamba_jax.ops import pallas_scan
from genemamba_jax.ops.selective_scan import selective_scan_ref
from tests import oracles
from tests.conftest import fast_first

ARG_NAMES = ("x", "dt", "A", "B", "C")
# Interpret mode is XLA:CPU compile bound; -O0 roughly halves compile time
# and changes no float32 semantics.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# (b, L, d, N, chunk, block_d): L not a multiple of the chunk, d not a
# multiple of block_d, batch 1, N = 16 / 64 and a non power of 2 N (padded).
CASES = [
    (2, 37, 6, 16, 16, 4),
    (1, 40, 48, 64, 16, 32),
    (2, 23, 10, 12, 8, 8),
]


def _value_and_grads(scan, inputs, w):
  """y and the grads of sum(y * w) w.r.t. the five inputs, compiled."""
  def fn(*args):
    *ins, w = args
    y, vjp = jax.vjp(scan, *ins)
    return y, vjp(w)
  args = (*inputs, w)
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


@fast_first("b,length,d,n,chunk,block_d", CASES)
def test_matches_sequential(b, length, d, n, chunk, block_d):
  inputs = oracles.selective_scan_inputs(0, b, length, d, n)
  # A random cotangent exercises every output element.
  w = jnp.asarray(np.random.default_rng(1).normal(size=(b, length, d)),
                  jnp.float32)
  # interpret left at None: the CPU default must pick interpret mode.
  y, grads = _value_and_grads(
      lambda *a: pallas_scan.selective_scan_pallas(*a, chunk, block_d=block_d),
      inputs, w)
  y_ref, grads_ref = _value_and_grads(
      lambda *a: selective_scan_ref(*a, chunk), inputs, w)
  assert y.shape == y_ref.shape and y.dtype == jnp.float32
  # Tolerances relative to each quantity's scale: grads of A and dt sum over
  # up to L * N (or b * L) terms.
  scale = max(1.0, float(jnp.max(jnp.abs(y_ref))))
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * scale)
  for name, g, g_ref, a in zip(ARG_NAMES, grads, grads_ref, inputs):
    assert g.shape == a.shape, name
    scale = max(1.0, float(jnp.max(jnp.abs(g_ref))))
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5 * scale,
                               err_msg=name)


def test_single_chunk_longer_than_sequence():
  """chunk > L: one chunk, mostly padding; forward only, default block_d."""
  inputs = oracles.selective_scan_inputs(2, 1, 9, 5, 16)
  y = jax.jit(lambda *a: pallas_scan.selective_scan_pallas(*a, 64))(*inputs)
  np.testing.assert_allclose(y, selective_scan_ref(*inputs, 64), rtol=0, atol=1e-5)


def test_pallas_available_cpu():
  usable, reason = pallas_scan.pallas_available("cpu")
  assert not usable
  assert "cpu" in reason


def test_pallas_available_default_platform():
  usable, reason = pallas_scan.pallas_available()
  assert isinstance(reason, str) and reason
  if jax.default_backend() == "cpu":
    assert not usable


@pytest.mark.parametrize("kwargs", [{"block_d": 12}, {"block_d": 0},
                                    {"chunk_size": 0}])
def test_invalid_arguments(kwargs):
  inputs = oracles.selective_scan_inputs(3, 1, 4, 3, 4)
  with pytest.raises(ValueError):
    pallas_scan.selective_scan_pallas(*inputs, **kwargs)


def _jaxlib_version() -> tuple[int, ...]:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return tuple(int(p) for p in re.findall(r"\d+", jaxlib.__version__)[:3])


def test_lowers_to_triton_for_cuda():
  """Forward and backward lower to Triton IR (no GPU needed for lowering).

  Guards the kernels against ops the Triton lowering lacks and against
  non power-of-2 loads; compiling the IR to PTX still needs a GPU.
  """
  sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  b, length, d, n = 2, 37, 40, 12
  args = (sd(b, length, d), sd(b, length, d), sd(d, n), sd(b, length, n),
          sd(b, length, n))

  def fn(*a):
    scan = lambda *a: pallas_scan.selective_scan_pallas(
        *a, 16, block_d=32, interpret=False)
    y, vjp = jax.vjp(scan, *a)
    return vjp(y)

  # jaxlib <= 0.10.2 hands the Triton IR to XLA as is; later ones compile it
  # to PTX while lowering, which needs a GPU.
  if _jaxlib_version() > (0, 10, 2) and jax.default_backend() != "gpu":
    pytest.skip("this jaxlib compiles Triton IR while lowering: needs a GPU")
  try:
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  except ImportError as e:  # a jaxlib built without the Triton bindings
    pytest.skip(f"no Triton lowering in this jaxlib: {e}")
  calls = re.findall(r"custom_call @([\w$.]+)", lowered.as_text())
  triton_calls = [c for c in calls if "triton" in c]
  assert len(triton_calls) == 2, calls  # the forward and the backward kernel
