"""Mamba-1 selective scan (mamba_ssm `selective_scan_ref` semantics) in JAX.

Three interchangeable backends compute the same recurrence

  h_t = exp(dt_t * A) * h_{t-1} + (dt_t * x_t)[:, None] * B_t[None, :]
  y_t = h_t @ C_t (+ D * x_t)

with the state h: [batch, d, N] in float32:

  sequential   `lax.scan` over time; the reference and test oracle. Its
               backward keeps every h_t: [L, batch, d, N].
  associative  `lax.associative_scan` over (decay, input) pairs: log-depth,
               but materialises several [batch, L, d, N] tensors.
  chunked      `lax.scan` over chunks of `chunk_size` steps carrying h, a
               scan inside each chunk, `jax.checkpoint` per chunk: the
               backward recomputes a chunk at a time, so memory holds the
               chunk boundary states [L / chunk, batch, d, N] plus O(batch*L*d)
               activations instead of a [batch, L, d, N] tensor.

The scan inside a chunk is sequential on CPU, where a step is cheap and the
associative scan's extra passes over [batch, T, d, N] cost more than they save
(bench/RESULTS.md, "Selective scan backends"), and associative elsewhere, where log-depth parallelism
pays. `INNER_SCAN` holds that choice per platform.

Two kernels compute the same with the same memory bound as `chunked`: `pallas`
(GPU, `pallas_scan.py`) and `numba` (CPU, `cpu_scan.py`: faster than `chunked` for
forward+backward, whose autodiff'ed while loop is the bottleneck on CPU; bench/RESULTS.md).
`auto` picks pallas on GPU, numba on CPU and chunked on TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genemamba_jax.ops import scan_utils


def _inputs(x, dt, A, B):
  """Per-step decay exp(dt * A) and input dt * x * B, both [batch, T, d, N]."""
  decay = jnp.exp(dt[..., None] * A)
  inp = (dt * x)[..., None] * B[:, :, None, :]
  return decay, inp


def _scan_steps(h0, x, dt, A, B, C):
  """Sequential recurrence from state h0 over axis 1.

  Args:
    h0: [b, d, N]; x, dt: [b, T, d]; A: [d, N]; B, C: [b, T, N]. All float32.
  Returns:
    (h at the last step [b, d, N], y [b, T, d]).
  """
  def step(h, xs):
    x_t, dt_t, b_t, c_t = xs  # [b, d], [b, d], [b, N], [b, N]
    h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * x_t)[..., None] * b_t[:, None]
    return h, jnp.einsum("bdn,bn->bd", h, c_t)

  time_major = [jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C)]
  h, y = jax.lax.scan(step, h0, time_major)
  return h, jnp.moveaxis(y, 0, 1)


def _associative_steps(h0, x, dt, A, B, C):
  """Same contract as `_scan_steps`, by an associative scan over the T axis."""
  decay, inp = _inputs(x, dt, A, B)  # [b, T, d, N]
  decay_cum, h_local = jax.lax.associative_scan(
      scan_utils.linear_combine, (decay, inp), axis=1)
  h = decay_cum * h0[:, None] + h_local
  return h[:, -1], jnp.einsum("btdn,btn->btd", h, C)


def _zero_state(x, A):
  return jnp.zeros((x.shape[0],) + A.shape, jnp.float32)


def selective_scan_ref(x, dt, A, B, C, chunk_size=None):
  """The reference scan (one `lax.scan` step per token), the other backends' test oracle.

  All inputs float32; x, dt: [b, L, d], A: [d, N], B, C: [b, L, N] -> y [b, L, d]
  (no D term); `chunk_size` is ignored (the backends' common signature).
  """
  del chunk_size
  return _scan_steps(_zero_state(x, A), x, dt, A, B, C)[1]


def _associative(x, dt, A, B, C, chunk_size):
  del chunk_size
  decay, inp = _inputs(x, dt, A, B)
  _, h = jax.lax.associative_scan(scan_utils.linear_combine, (decay, inp), axis=1)
  return jnp.einsum("bldn,bln->bld", h, C)


INNER_SCAN = {"cpu": "sequential"}  # platform -> scan inside a chunk
_INNER_DEFAULT = "associative"
_INNER_IMPLS = {"sequential": _scan_steps, "associative": _associative_steps}


def _chunked(x, dt, A, B, C, chunk_size, inner=None):
  """Chunked backend; `inner` ("sequential" / "associative") defaults by platform."""
  scan_utils.check_chunk_size(chunk_size)
  if inner is None:
    inner = INNER_SCAN.get(jax.default_backend(), _INNER_DEFAULT)
  steps = _INNER_IMPLS[inner]
  length = x.shape[1]
  (x, dt, B, C), _ = scan_utils.pad_time([x, dt, B, C], chunk_size)

  def chunk(h0, xs):
    """h0: [b, d, N]; xs: one chunk of (x, dt, B, C), time length T."""
    x_c, dt_c, b_c, c_c = xs
    # Decays and inputs are built in here, not before the scan, so no
    # [b, L, d, N] tensor ever exists.
    return steps(h0, x_c, dt_c, A, b_c, c_c)

  # Saves only the chunk's inputs (h0 and O(b*T*d) slices) for the backward;
  # prevent_cse is unneeded under scan and only blocks optimisations.
  chunk = jax.checkpoint(chunk, prevent_cse=False)
  xs = [scan_utils.to_chunks(a, chunk_size) for a in (x, dt, B, C)]
  _, y = jax.lax.scan(chunk, _zero_state(x, A), xs)
  return scan_utils.from_chunks(y)[:, :length]


def _pallas(x, dt, A, B, C, chunk_size):
  """The Pallas kernel (ops/pallas_scan.py) where it compiles (or in its interpreter under
  `pallas_scan.interpreted()`); else `chunked`, with the reason logged."""
  from genemamba_jax.ops import pallas_scan  # pylint: disable=g-import-not-at-top
  interpret = pallas_scan.interpret_forced()
  if not interpret:
    usable, reason = pallas_scan.pallas_available()
    if not usable:
      scan_utils.log_fallback("pallas", "chunked", reason)
      return _chunked(x, dt, A, B, C, chunk_size)
  return pallas_scan.selective_scan_pallas(x, dt, A, B, C, chunk_size, interpret=interpret)


def _numba(x, dt, A, B, C, chunk_size):
  """The compiled CPU kernels (ops/cpu_scan.py) on the CPU backend; else `chunked`, logged."""
  if jax.default_backend() != "cpu":
    scan_utils.log_fallback("numba", "chunked",
                            f"the numba kernels run on the CPU backend, not {jax.default_backend()}")
    return _chunked(x, dt, A, B, C, chunk_size)
  from genemamba_jax.ops import cpu_scan  # pylint: disable=g-import-not-at-top
  return cpu_scan.selective_scan_cpu(x, dt, A, B, C, chunk_size)


def _auto(x, dt, A, B, C, chunk_size):
  """GPU: the Pallas kernel. CPU: the numba kernels, the fastest for training there
  (bench/RESULTS.md). TPU: `chunked`. All with bounded memory."""
  platform = jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    return _pallas(x, dt, A, B, C, chunk_size)
  if platform == "cpu":
    return _numba(x, dt, A, B, C, chunk_size)
  return _chunked(x, dt, A, B, C, chunk_size)


_IMPLS = {
    "sequential": selective_scan_ref,
    "associative": _associative,
    "chunked": _chunked,
    "pallas": _pallas,
    "numba": _numba,
    "auto": _auto,
}


def selective_scan(x, dt, A, B, C, D=None, *, backend="associative",
                   chunk_size=64):
  """Mamba-1 selective scan (mamba_ssm selective_scan_ref semantics).

  dt is the final step size: softplus and dt bias already applied.

  h_t = exp(dt_t * A) * h_{t-1} + (dt_t * x_t)[:, None] * B_t[None, :]
  (state [batch, d, N], float32, h_{-1} = 0);
  y_t = sum_n C_t[n] * h_t[:, n] (+ D * x_t).

  Args:
    x: [batch, L, d], compute dtype (float32 or bfloat16).
    dt: [batch, L, d], float32, > 0.
    A: [d, N], float32, negative.
    B: [batch, L, N], compute dtype.
    C: [batch, L, N], compute dtype.
    D: [d] or None, skip connection.
    backend: one of `scan_utils.SELECTABLE`: "sequential", "associative",
      "chunked", "pallas" (GPU kernel; elsewhere falls back to chunked with a
      logged reason; in Pallas's interpreter under `pallas_scan.interpreted()`),
      "numba" (compiled CPU kernels; elsewhere falls back to chunked with a
      logged reason) or "auto" (pallas on GPU, numba on CPU, chunked on TPU).
    chunk_size: time steps per chunk (chunked, Pallas and numba backends); L
      need not be a multiple of it.

  Returns:
    y: [batch, L, d] in x.dtype, accumulated in float32.
  """
  impl = scan_utils.get_backend(_IMPLS, backend)
  # Everything in float32 whatever x's dtype: a bf16 state cannot represent
  # decays close to 1 or accumulate small increments over long sequences.
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  xf = f32(x)
  y = impl(xf, f32(dt), f32(A), f32(B), f32(C), chunk_size)
  if D is not None:
    y = y + f32(D) * xf
  return y.astype(x.dtype)
