"""Backend dispatch: `pallas` through the whole model (interpret mode on CPU), `auto`, fallbacks."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.ops import pallas_scan, scan_utils, selective_scan, ssd


def _model_grads(backend: str, mixer: str = "mamba1"):
  config = GeneMambaConfig(vocab_size=40, d_model=16, n_layers=2, mixer=mixer, d_state=16,
                           headdim=8, scan_backend=backend, scan_chunk_size=8)
  model = GeneMamba(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 21), 1, 40)
  mask = jnp.arange(21)[None] < jnp.array([[21], [13]])  # one padded row
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    out = nnx.merge(graphdef, params)(tokens, mask)
    return jnp.sum(jnp.where(mask[..., None], out.logits, 0.0) ** 2) / 100

  value, grads = jax.value_and_grad(loss)(params)
  return value, jax.tree.leaves(grads)


@pytest.mark.slow  # over ~10 s on 2 cores
def test_grad_through_bimamba_layers_with_the_pallas_kernel_matches_the_reference():
  ref_value, ref_grads = _model_grads("sequential")
  with pallas_scan.interpreted():  # the kernel itself, in Pallas's interpreter on CPU
    value, grads = _model_grads("pallas")
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    scale = max(1.0, float(jnp.max(jnp.abs(r))))
    np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(r) / scale, atol=1e-5)


def _inputs(key, b=2, length=19, d=12, n=16):
  ks = jax.random.split(key, 5)
  x = jax.random.normal(ks[0], (b, length, d))
  dt = jax.nn.softplus(0.5 * jax.random.normal(ks[1], (b, length, d)) - 2)
  a = -jnp.exp(jax.random.normal(ks[2], (d, n)))
  return x, dt, a, jax.random.normal(ks[3], (b, length, n)), jax.random.normal(ks[4], (b, length, n))


@pytest.mark.slow  # over ~10 s on 2 cores
def test_auto_is_the_numba_kernel_on_cpu_and_pallas_falls_back_with_a_logged_reason(caplog):
  args = _inputs(jax.random.key(0))
  np.testing.assert_array_equal(selective_scan(*args, backend="auto", chunk_size=8),
                                selective_scan(*args, backend="numba", chunk_size=8))
  chunked = selective_scan(*args, backend="chunked", chunk_size=8)
  scan_utils.log_fallback.cache_clear()
  with caplog.at_level(logging.WARNING, logger="genemamba_jax.ops"):
    fallback = selective_scan(*args, backend="pallas", chunk_size=8)
  np.testing.assert_array_equal(fallback, chunked)
  assert "scan backend pallas unavailable (platform cpu" in caplog.text
  assert "using chunked" in caplog.text


@pytest.mark.slow  # over ~5 s on 2 cores
def test_numba_off_cpu_falls_back_to_chunked_with_a_logged_reason(caplog, monkeypatch):
  args = _inputs(jax.random.key(2))
  chunked = selective_scan(*args, backend="chunked", chunk_size=8)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  scan_utils.log_fallback.cache_clear()
  with caplog.at_level(logging.WARNING, logger="genemamba_jax.ops"):
    fallback = selective_scan(*args, backend="numba", chunk_size=8)
  # Not bit-equal: off CPU the chunked backend's inner scan is the associative one.
  np.testing.assert_allclose(fallback, chunked, rtol=0, atol=1e-5)
  assert "scan backend numba unavailable (the numba kernels run on the CPU backend, not tpu)" \
      in caplog.text
  assert "using chunked" in caplog.text


@pytest.mark.slow  # over ~5 s on 2 cores
def test_mamba2_auto_is_the_chunked_ssd():
  ks = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(ks[0], (1, 17, 4, 8))
  dt = jax.nn.softplus(jax.random.normal(ks[1], (1, 17, 4)) - 2)
  a = -jnp.exp(jax.random.normal(ks[2], (4,)))
  b, c = (jax.random.normal(k, (1, 17, 1, 16)) for k in ks[3:])
  np.testing.assert_array_equal(ssd(x, dt, a, b, c, backend="auto", chunk_size=8),
                                ssd(x, dt, a, b, c, backend="chunked", chunk_size=8))


def test_the_model_default_is_auto():
  assert GeneMambaConfig().scan_backend == "auto"
